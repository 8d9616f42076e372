"""The DALI graph: the shared `AugSpec` translated into DALI operators, read once, decoded once,
then two independent views.

Where DALI's operators differ from torchvision's (the reference, `torch_loader.view_transform`):

- Colour jitter. torchvision applies brightness, contrast, saturation and hue one after another in
  a random order, each clamped to [0, 255]. DALI's `color_twist` applies all four as one fused linear
  transform (a 3x4 matrix per sample), in a fixed order, clamped once at the end. Contrast pivots
  on mid-grey (128), torchvision's on the image's mean luma. Hue turns the colour around the grey axis
  in YIQ space (luma kept), torchvision shifts H in HSV (value kept); the spec's hue is a fraction
  of a turn (0.1 = 36 degrees), DALI takes degrees. Brightness is the same multiplication in both.
- Grayscale is `color_twist` with saturation 0: the luma 0.299 R + 0.587 G + 0.114 B in all three
  channels, as PIL's `convert("L")` gives (within one level). Because DALI's hue and saturation act
  only on the two chroma axes, grey-then-jitter (v1) and jitter-then-grey (v2) give the same image
  up to clamping, so the spec's `gray_before_jitter` needs no second order here: grey is folded into
  the jitter's saturation factor, and one `color_twist` pass does jitter and grey together.
- Blur: the same kernel (a Gaussian sampled at integer offsets, `spec.blur_kernel_size` taps, one
  sigma for both axes drawn from `spec.blur_sigma`) and the same mirrored border ("reflect 101").
  A view that is not blurred gets a 1-tap window, which is the identity, so one `gaussian_blur` call
  serves the whole batch without splitting it.
- Random resized crop: the same scale/ratio sampling with 10 attempts and antialiased linear resize;
  after 10 misses both fall back to the largest crop within the ratio range (checked by hand: the same
  size; torchvision centres it, DALI may place it a few pixels off centre).
- Decoding: EXIF orientation is not applied (DALI's default would rotate such photos; PIL, and so the
  torch loader and the FFCV conversion, keep the stored pixel order).
- Flip and normalisation are fused into `crop_mirror_normalize`, which writes the trainer's dtype
  (float16 or float32; DALI has no bfloat16, see `dali.py`) in NHWC or NCHW.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

from moco_fast.augment import AugSpec

# nvJPEG scratch padding (NVIDIA's ResNet-50 DALI example): big enough for ImageNet-sized images,
# so that the decoder does not reallocate (and stall) when a larger image turns up.
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512
# RGB, and the stored pixel order: EXIF orientation is not applied, as PIL's decode in the torch
# loader and `moco-fast convert` (the FFCV path) do not apply it, so every backend sees the same image.
DECODE = {"output_type": types.RGB, "adjust_orientation": False}

# What `fn.decoders.image` reads, by the kind PIL gives a file ("FORMAT": {modes}, see
# `moco_fast.data.check_image`): the image folder's files of other kinds are left out up front. Found
# by experiment on DALI 2.4's CPU decoder (one file of each kind decoded with DECODE and compared with
# PIL's `to_rgb`; tests/test_dali_inputs.py keeps doing it): only kinds that decode to PIL's pixels are
# listed. Not read: GIF, TGA, ICO, PCX, SGI, QOI, DDS, ... (any format not listed), 1-bit TIFF
# (uncompressed ones without a BitsPerSample tag, as PIL writes them, fail DALI's parser; all are left
# out), 32-bit integer TIFF, grey JPEG 2000 with alpha. Read, but not as PIL reads them, so left out
# too: TIFF LA (DALI takes grey and alpha for colour channels), float TIFF (DALI clips values above 1,
# PIL's `to_rgb` scales them), TIFF LAB. The GPU ("mixed") decoder has not been measured (no GPU
# here; the `mixed` case of tests/test_dali_inputs.py checks it against this list, in the `tests`
# phase of bench/gpu_check.sh), so a GPU run uses this measured CPU list too; a file that still
# fails in the decoder is found and skipped during the run, as a corrupt one is.
DECODABLE = {
    "JPEG": {"L", "RGB", "CMYK"},
    "MPO": {"RGB"},  # a camera's JPEG with extra frames: the first is decoded
    "PNG": {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"},
    "BMP": {"1", "L", "P", "RGB"},
    "TIFF": {"L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16"},
    "JPEG2000": {"L", "RGB", "RGBA", "I;16"},
    "WEBP": {"RGB", "RGBA"},
    "PPM": {"1", "L", "RGB", "I"},  # PBM, PGM (8 and 16 bits), PPM
}


def decodable(kind: str) -> bool:
    """Whether DALI's decoder reads a file of this kind ("FORMAT/mode", see DECODABLE)."""
    fmt, _, mode = kind.partition("/")
    return mode in DECODABLE.get(fmt, ())


@dataclass(frozen=True)
class PipelineSettings:
    batch_size: int
    device_id: int | None  # None: DALI's CPU-only mode, every operator on the CPU
    threads: int
    prefetch: int  # batches DALI prepares ahead of the one being consumed
    seed: int
    gpu_decode: bool  # the "mixed" decoder (nvJPEG, hardware decoder where the card has one)
    hw_decoder_load: float
    half: bool  # emit float16 instead of float32
    channels_last: bool  # emit NHWC (a channels-last NCHW tensor once permuted in torch)


def _uniform(lo: float, hi: float):
    """A per-sample draw from [lo, hi], or the constant when the range is empty (DALI rejects lo == hi)."""
    return fn.random.uniform(range=[lo, hi]) if hi > lo else float(lo)


def _coin(p: float):
    """Per-sample 0.0/1.0 with P(1) = p; a plain number when p is 0 or 1."""
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)


def _jitter_factor(strength: float, on):
    """torchvision's factor range [max(0, 1 - s), 1 + s], applied where `on` is 1."""
    if strength <= 0 or (isinstance(on, float) and on == 0):
        return 1.0
    return on * (_uniform(max(0.0, 1 - strength), 1 + strength) - 1.0) + 1.0


def _colour(x, spec: AugSpec):
    """Jitter with p=jitter_prob and grey with p=gray_prob, in one fused pass (see the module notes)."""
    if spec.jitter_prob <= 0 and spec.gray_prob <= 0:
        return x
    on = _coin(spec.jitter_prob)
    keep_colour = 1.0 - _coin(spec.gray_prob)
    hue = on * _uniform(-spec.hue, spec.hue) * 360.0 if spec.hue > 0 and spec.jitter_prob > 0 else 0.0
    return fn.color_twist(
        x,
        brightness=_jitter_factor(spec.brightness, on),
        contrast=_jitter_factor(spec.contrast, on),
        saturation=_jitter_factor(spec.saturation, on) * keep_colour,
        hue=hue,
    )


def _blur(x, spec: AugSpec):
    if spec.blur_prob <= 0:
        return x
    k = spec.blur_kernel_size
    on = _coin(spec.blur_prob)
    # k taps where blurred, 1 tap (the identity) elsewhere
    window = k if isinstance(on, float) else fn.cast(on * float(k - 1) + 1.0, dtype=types.INT32)
    return fn.gaussian_blur(x, window_size=window, sigma=_uniform(*spec.blur_sigma))


def one_view(images, spec: AugSpec, s: PipelineSettings):
    """Decoded HWC uint8 images -> one augmented, normalised view (HWC or CHW, float16/32)."""
    x = fn.random_resized_crop(
        images,
        size=[spec.image_size, spec.image_size],
        random_area=list(spec.crop_scale),
        random_aspect_ratio=list(spec.crop_ratio),
        num_attempts=10,
        antialias=True,
    )
    x = _blur(_colour(x, spec), spec)
    mirror = fn.random.coin_flip(probability=spec.flip_prob) if spec.flip_prob > 0 else 0
    return fn.crop_mirror_normalize(
        x,
        mirror=mirror,
        mean=[m * 255 for m in spec.mean],
        std=[v * 255 for v in spec.std],
        dtype=types.FLOAT16 if s.half else types.FLOAT,
        output_layout="HWC" if s.channels_last else "CHW",
    )


def decode(encoded, s: PipelineSettings):
    """Encoded bytes (CPU) -> HWC uint8 RGB, on the GPU ("mixed"), or on the CPU and then moved to
    the device where the augmentations run (`decoder=cpu` on a GPU run)."""
    if s.gpu_decode:
        return fn.decoders.image(
            encoded,
            device="mixed",
            hw_decoder_load=s.hw_decoder_load,
            device_memory_padding=DEVICE_MEMORY_PADDING,
            host_memory_padding=HOST_MEMORY_PADDING,
            **DECODE,
        )
    return _on_device(fn.decoders.image(encoded, device="cpu", **DECODE), s)


def _pipeline(s: PipelineSettings) -> Pipeline:
    # exec_dynamic: outputs stay valid while referenced, which the zero-copy DLPack hand-over needs.
    return Pipeline(
        batch_size=s.batch_size,
        num_threads=s.threads,
        device_id=s.device_id,
        seed=s.seed,
        prefetch_queue_depth=s.prefetch,
        exec_dynamic=True,
    )


def _on_device(node, s: PipelineSettings):
    return node.gpu() if s.device_id is not None else node


def folder_pipeline(source: Callable[[int], tuple], spec: AugSpec, s: PipelineSettings) -> Pipeline:
    """Outputs (view_q, view_k, label, index). `source(iteration)` returns one batch: (file paths as
    uint8 arrays, labels, indices); DALI's threads read the files."""
    pipe = _pipeline(s)
    with pipe:
        path, label, index = fn.external_source(
            source=source, num_outputs=3, batch=True, dtype=[types.UINT8, types.INT64, types.INT64]
        )
        images = decode(fn.io.file.read(path), s)
        pipe.set_outputs(
            one_view(images, spec, s), one_view(images, spec, s), _on_device(label, s), _on_device(index, s)
        )
    return pipe


def _wds_reader(paths, index_paths, shuffle_buffer: int, shard_id: int, num_shards: int, seed: int):
    """(jpg bytes, cls bytes) of this rank's share; the order is fixed by `seed` alone, so a second
    reader with the same arguments replays the samples a pipeline was given."""
    return fn.readers.webdataset(
        paths=list(paths),
        index_paths=list(index_paths),
        ext=["jpg", "cls"],
        missing_component_behavior="error",
        random_shuffle=True,
        initial_fill=shuffle_buffer,
        shard_id=shard_id,
        num_shards=num_shards,
        seed=seed,
        name="reader",
    )


def wds_pipeline(
    paths: Sequence[str],
    index_paths: Sequence[str],
    shuffle_buffer: int,
    shard_id: int,
    num_shards: int,
    spec: AugSpec,
    s: PipelineSettings,
) -> Pipeline:
    """Outputs (view_q, view_k, cls): `cls` stays on the CPU, raw ASCII bytes whose `source_info()`
    names the sample ("shard.tar:offset:key.cls"), from which the loader makes labels and indices."""
    pipe = _pipeline(s)
    with pipe:
        jpg, cls = _wds_reader(paths, index_paths, shuffle_buffer, shard_id, num_shards, s.seed)
        images = decode(jpg, s)
        pipe.set_outputs(one_view(images, spec, s), one_view(images, spec, s), cls)
    return pipe


def wds_replay_pipeline(
    paths: Sequence[str], index_paths: Sequence[str], shuffle_buffer: int, shard_id: int, num_shards: int, s
) -> Pipeline:
    """The reader of `wds_pipeline` with the same settings, alone on the CPU (no decode): it yields
    the encoded samples that pipeline was given, batch for batch, to find one it could not decode."""
    pipe = Pipeline(batch_size=s.batch_size, num_threads=1, device_id=None, seed=s.seed, prefetch_queue_depth=1)
    with pipe:
        pipe.set_outputs(*_wds_reader(paths, index_paths, shuffle_buffer, shard_id, num_shards, s.seed))
    return pipe


def probe_pipeline(source: Callable[[int], tuple], s: PipelineSettings, read_files: bool = True) -> Pipeline:
    """Decode only, one file at a time: finds the file that made the decoder fail. `source(i)` gives
    the i-th file's path as bytes (`read_files`) or its encoded contents."""
    pipe = Pipeline(batch_size=1, num_threads=1, device_id=s.device_id, prefetch_queue_depth=1, exec_dynamic=True)
    with pipe:
        (data,) = fn.external_source(source=source, num_outputs=1, batch=True, dtype=[types.UINT8])
        raw = fn.io.file.read(data) if read_files else data
        # the run's decoder, without the big scratch padding: this pipeline lives for a few files
        kw = {"device": "mixed", "hw_decoder_load": s.hw_decoder_load} if s.gpu_decode else {"device": "cpu"}
        pipe.set_outputs(fn.decoders.image(raw, **kw, **DECODE))
    return pipe
