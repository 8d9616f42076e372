"""The FFCV operations of the FFCV backend (`ffcv.py`): each declares its output state apart from the
code that computes it, and its code is compiled by Numba into FFCV's pipeline, which runs in threads.

`ResizedCrops` decodes an image and cuts its random resized crops (and checks what FFCV's decoder
leaves unchecked), `FlipViews` flips each view, `DecodeStatus` hands the decoder's per-sample status
to the loader on the host, `SampleIndexDecoder` yields each sample's position in the .beton.

The crops and flips are drawn from a counter-based stream of their own for each (run seed, epoch,
.beton index, view), splitmix64 (`view_stream`, `draw`), not from Numba's per-thread RNG, which
nothing seeds and whose draws go to whichever thread takes an image: an image's views depend on the
seed, the epoch and the image only, whatever the thread count, the batch or the step an epoch
started at (a run resumed within an epoch trains on the views of an uninterrupted one). The epoch
reaches the compiled code through `EpochKey`, read at each batch (FFCV passes ops no epoch).
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np
import torch

from moco_fast.threads import kept_ffcv_import_threads

with kept_ffcv_import_threads():  # FFCV's import sets torch's and Numba's thread counts to 1
    from ffcv.fields.basics import BasicDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.libffcv import ctypes_memcopy, imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

# Why a sample's image could not be read, as the decoder records it in its status (0: read).
EMPTY, BAD_JPEG, BAD_SIZE, BAD_RAW, BAD_MODE = 1, 2, 3, 4, 5
FAILURES = {
    EMPTY: "the .beton records it as 0 pixels high or wide",
    BAD_JPEG: "its JPEG does not decode",
    BAD_SIZE: "its JPEG's height and width are not those the .beton records",
    BAD_RAW: "its raw pixels are not the height x width x 3 bytes the .beton records",
    BAD_MODE: "it is stored in an unknown mode (neither jpg nor raw)",
}


def jpeg_size(data: np.ndarray) -> tuple[int, int]:
    """(height, width) from a JPEG's frame header (SOF0-15), (0, 0) when there is none before the scan.

    imdecode is given the size the .beton records and decodes a smaller JPEG without an error: the
    rest of the buffer would keep the previous image. Plain code over the bytes: Numba compiles it
    into the decoder."""
    i, n = 2, len(data)  # after SOI
    while i + 3 < n:
        if data[i] != 0xFF:
            return 0, 0
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte before the marker
            i += 1
        elif marker == 0xDA:  # start of scan: no frame header before it
            return 0, 0
        elif 0xC0 <= marker <= 0xCF and marker != 0xC4 and marker != 0xC8 and marker != 0xCC:
            if i + 8 >= n:
                return 0, 0
            return np.int64(data[i + 5]) * 256 + data[i + 6], np.int64(data[i + 7]) * 256 + data[i + 8]
        else:  # a segment with its length: APPn (EXIF), DQT, DHT, COM, ...
            i += 2 + np.int64(data[i + 2]) * 256 + data[i + 3]
    return 0, 0


# ---- the random streams: splitmix64 (Steele et al. 2014), one per (seed, epoch, image, view, use) ----

GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment
CROP, FLIP = 0, 1  # the uses of a view's randomness: each its own stream
_jit = numba.njit(nogil=True)  # callable from Python too (the tests, EpochKey)


@_jit
def mix64(x):
    """splitmix64's finaliser: a uint64 to a well mixed uint64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@_jit
def view_stream(key, index, view, use):
    """The start of the stream of one use (CROP, FLIP) of one view of the .beton's image `index`, in
    the epoch of `key` (EpochKey)."""
    return mix64(mix64(mix64(key + np.uint64(index)) + np.uint64(view)) + np.uint64(use))


@_jit
def draw(state, lo, hi):
    """The stream's next number, uniform in [lo, hi): (the stream's new state, the number)."""
    state = state + GOLDEN
    return state, lo + (hi - lo) * np.float64(mix64(state) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@_jit
def crop_box(height, width, scale, ratio, state):
    """torchvision's RandomResizedCrop box (top, left, h, w), as FFCV's get_random_crop draws it (10
    tries, the ratio uniform in log space, then the central crop of the ratio's bounds), from `state`'s
    stream instead of Numba's RNG."""
    height, width = np.int64(height), np.int64(width)
    area = np.float64(height) * np.float64(width)
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    for _ in range(10):
        state, s = draw(state, scale[0], scale[1])
        state, r = draw(state, log_lo, log_hi)
        target_area, aspect_ratio = area * s, np.exp(r)
        w = np.int64(np.round(np.sqrt(target_area * aspect_ratio)))
        h = np.int64(np.round(np.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            state, u = draw(state, 0.0, height - h + 1.0)
            state, v = draw(state, 0.0, width - w + 1.0)
            return min(int(u), height - h), min(int(v), width - w), h, w  # min: a float rounded up to hi
    in_ratio = width / height
    if in_ratio < min(ratio[0], ratio[1]):
        w = width
        h = np.int64(np.round(w / min(ratio[0], ratio[1])))
    elif in_ratio > max(ratio[0], ratio[1]):
        h = height
        w = np.int64(np.round(h * max(ratio[0], ratio[1])))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class EpochKey:
    """(run seed, epoch) as one uint64 that the compiled ops read at the start of each batch.

    FFCV hands its ops the batch's .beton indices, never the epoch, and Numba compiles an array it
    captures as a constant: the ops capture this array's address instead and copy the key from it
    (ctypes_memcopy, FFCV's own). The loader sets it before each epoch's FFCV thread starts; the
    array lives as long as the ops that hold this object."""

    def __init__(self, seed: int):
        self.seed = np.uint64(seed % 2**64)
        self.value = np.zeros(1, np.uint64)
        self.address = self.value.ctypes.data

    def set(self, epoch: int) -> None:
        self.value[0] = mix64(mix64(self.seed) + np.uint64(epoch))


class ResizedCrops(RandomResizedCropRGBImageDecoder):
    """Decode each image once and cut `views` independent random resized crops: N x V x S x S x 3
    uint8, beside each sample's status, N x 2 int64 (failure code, 0 when read; the .beton index).

    The code is FFCV's RandomResizedCropRGBImageDecoder with more crops from the same decoded buffer
    (two halve the decode work of a two-view pipeline) and the check that it leaves out: FFCV ignores
    imdecode's -1, so a JPEG that does not decode was cropped from whatever the previous image left in
    the reused buffer, and trained on silently with its own label. Here such a sample's views are
    zeroed and its status says why; the loader names it and replaces it (Numba code cannot log).
    FFCV passes one result down a pipeline: this one is the pair (views, status). The declared state
    is the views', which `FlipViews` takes from the pair; `DecodeStatus` takes the status.
    View v's crop is drawn from view_stream(key, index, first_view + v, CROP): a second decoder of
    the same images (decode=twice) counts its views from first_view=1."""

    def __init__(self, output_size, scale, ratio, key: EpochKey, views: int = 2, first_view: int = 0):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.key, self.views, self.first_view = key, views, first_view

    def declare_state_and_memory(self, previous_state):
        state, (_, temp) = super().declare_state_and_memory(previous_state)
        shape = (self.views, self.output_size[0], self.output_size[1], 3)
        status = AllocationQuery((2,), np.dtype("<i8"))
        return replace(state, shape=shape), (AllocationQuery(shape, np.dtype("<u1")), temp, status)

    def generate_code(self):
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        jpeg_size_c = Compiler.compile(jpeg_size)
        scale, ratio = np.array(self.scale, dtype=np.float64), np.array(self.ratio, dtype=np.float64)
        views, first_view, key_address = self.views, self.first_view, self.key.address

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, status = my_storage
            key = np.empty(1, np.uint64)
            ctypes_memcopy(key_address, key.ctypes.data, 8)  # this epoch's EpochKey
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                jpg = field["mode"] == 0
                failure = 0
                if height == 0 or width == 0:  # a crop of nothing: OpenCV would abort the process
                    failure = EMPTY
                elif jpg:
                    jh, jw = jpeg_size_c(image_data)
                    if jh != height or jw != width:
                        failure = BAD_SIZE if jh else BAD_JPEG
                    else:  # imdecode: 0, or -1 when libjpeg-turbo fails or warns (a truncated JPEG)
                        buf = temp_storage[dst_ix]
                        if imdecode_c(image_data, buf, height, width, height, width, 0, 0, 1, 1, False, False):
                            failure = BAD_JPEG
                elif field["mode"] != 1:
                    failure = BAD_MODE
                elif image_data.size != 3 * height * width:  # reshape would raise in FFCV's thread: a hang
                    failure = BAD_RAW
                status[dst_ix, 0] = failure
                status[dst_ix, 1] = batch_indices[dst_ix]
                if failure:
                    destination[dst_ix] = 0
                else:
                    if jpg:
                        buf = temp_storage[dst_ix].reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                    else:  # raw pixels
                        buf = image_data.reshape(height, width, 3)
                    for v in range(views):
                        state = view_stream(key[0], batch_indices[dst_ix], first_view + v, CROP)
                        i, j, h, w = crop_box(height, width, scale, ratio, state)
                        resize_crop_c(buf, i, i + h, j, j + w, destination[dst_ix, v])
            n = len(batch_indices)
            return destination[:n], status[:n]

        decode.is_parallel = True
        return decode


class FlipViews(Operation):
    """Flip each view of ResizedCrops' N x V x S x S x 3 horizontally with probability p, independently:
    view v of image i by view_stream(key, its .beton index, first_view + v, FLIP), as ResizedCrops."""

    def __init__(self, key: EpochKey, flip_prob: float = 0.5, first_view: int = 0):
        super().__init__()
        self.key, self.flip_prob, self.first_view = key, flip_prob, first_view

    def generate_code(self):
        my_range = Compiler.get_iterator()
        p, first_view, key_address = self.flip_prob, self.first_view, self.key.address

        def flip(decoded, dst):
            images, status = decoded  # see ResizedCrops: status[i, 1] is image i's .beton index
            key = np.empty(1, np.uint64)
            ctypes_memcopy(key_address, key.ctypes.data, 8)
            for i in my_range(images.shape[0]):
                for v in range(images.shape[1]):
                    _, u = draw(view_stream(key[0], status[i, 1], first_view + v, FLIP), 0.0, 1.0)
                    if u < p:
                        dst[i, v] = images[i, v, :, ::-1]
                    else:
                        dst[i, v] = images[i, v]
            return dst

        flip.is_parallel = True
        return flip

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


class DecodeStatus(Operation):
    """ResizedCrops' status as a host tensor (the loader reads it on the host: never moved to the
    device, no sync). Its own pipeline, which refers to the decoder: PipelineSpec(source=decoder)."""

    def generate_code(self):
        def status(decoded, dst):
            return torch.from_numpy(decoded[1])

        return status

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=False, shape=(2,), dtype=torch.int64), None


class SampleIndexDecoder(BasicDecoder):
    """Reads no data: yields each sample's position in the .beton (MoCo's memory bank needs it)."""

    dtype = np.dtype("<i8")

    def generate_code(self):
        def decoder(indices, destination, metadata, storage_state):
            for ix in range(len(indices)):
                destination[ix, 0] = indices[ix]
            return destination[: len(indices)]

        return decoder
