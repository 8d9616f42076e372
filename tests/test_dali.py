"""The DALI loader, for real, in DALI's CPU-only mode: the output contract, the augmentation
statistics against the spec and against the torch loader on the same images, shard sets, corrupt
files, ranks, and `moco-fast train --loader dali` end to end. The CUDA variants skip without a GPU.

The statistics use synthetic images that make one property measurable:
- coordinate images (R = 4x, G = 4y): a view's corner colours give its crop box and its flip;
- flat single-colour images: a grey view has R = G = B, a jittered view another colour;
- noise images of exactly the view size with an identity crop: a blurred view differs from the decoded
  image, and it must equal torchvision's blur of it.
"""

import io
import json
import logging
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("nvidia.dali")  # every test here needs DALI: skipped where it is not installed

import numpy as np
import torch
from conftest import ON_GPU, coordinate_image, crop_stats, to_uint8
from dali_helpers import BLUR, COLOUR, CPU, IDENTITY, dali_loader
from moco_fast.loaders.dali import DaliOptions
from moco_fast.loaders.torch_loader import view_transform
from moco_fast.loaders.wds import index_lines, index_text
from PIL import Image
from torchvision.transforms import functional as TF

from moco_fast.augment import MOCO_V1, MOCO_V2
from moco_fast.cli import main
from moco_fast.config import ConfigError
from moco_fast.data import DataError, load_splits

CUDA = pytest.param(torch.device("cuda"), marks=ON_GPU)
N_IMAGES = 40  # per synthetic root; batches of 40 over 5 epochs give 400 views
EPOCHS = 5

GEOMETRY = replace(MOCO_V2, image_size=32, jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0)


def save(path: Path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, quality=95, subsampling=0)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    coords = coordinate_image()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        save(root / "coords" / "c" / f"{i:03d}.jpg", coords)
        hue = Image.new("HSV", (32, 32), (int(255 * i / N_IMAGES), 200, 210)).convert("RGB")
        save(root / "flat" / "c" / f"{i:03d}.jpg", np.asarray(hue))
        save(root / "noise" / "c" / f"{i:03d}.jpg", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return {k: root / k for k in ("coords", "flat", "noise")}


def dali_views(data, spec, device=CPU, epochs=EPOCHS) -> tuple[np.ndarray, np.ndarray]:
    """(views N x H x W x 3 uint8, the index of each view's image)."""
    ld = dali_loader(data, spec, device, batch_size=N_IMAGES)
    views, index = [], []
    for e in range(epochs):
        ld.set_epoch(e)
        for b in ld:
            views += [to_uint8(b.im_q, spec), to_uint8(b.im_k, spec)]
            index += [b.index.cpu().numpy()] * 2
    return np.concatenate(views), np.concatenate(index)


def torch_views(data, spec, n=EPOCHS * 2 * N_IMAGES) -> np.ndarray:
    torch.manual_seed(0)
    files = load_splits(str(data), check=False).train.files
    images = [Image.open(f).convert("RGB") for f in files]
    t = view_transform(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        return np.stack([t(images[i % len(images)]).permute(1, 2, 0).numpy() for i in range(n)])
    finally:
        torch.set_num_threads(threads)


def colour_stats(views: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat-image views -> (grey, jittered): grey has R = G = B; jittered is another colour."""
    v = views.astype(np.int64)
    grey = (v.max(-1) - v.min(-1)).max((1, 2)) <= 3
    moved = np.abs(v.mean((1, 2)) - reference).max(1) > 3
    return grey, moved & ~grey


@pytest.fixture(scope="module")
def geometry(synth):
    return crop_stats(dali_views(synth["coords"], GEOMETRY)[0]), crop_stats(torch_views(synth["coords"], GEOMETRY))


def test_views_shape_dtype_layout_and_labels(tiny_root):
    ld = dali_loader(tiny_root, COLOUR, batch_size=8)
    files = load_splits(str(tiny_root), check=False).train
    assert len(ld) == 4 and ld.num_images == 32 and ld.classes == files.classes
    seen = []
    for b in ld:
        for v in (b.im_q, b.im_k):
            assert v.shape == (8, 3, 32, 32) and v.dtype == torch.float32 and v.device == CPU
            assert v.is_contiguous(memory_format=torch.channels_last)
        assert b.label.dtype == b.index.dtype == torch.long
        assert b.label.tolist() == [files.labels[i] for i in b.index.tolist()]
        # the two views of one image are drawn independently
        assert ((b.im_q - b.im_k).abs().amax((1, 2, 3)) > 0.1).all()
        seen += b.index.tolist()
    assert sorted(seen) == list(range(32))  # one epoch: every image once


@pytest.mark.parametrize(
    ("dtype", "channels_last"), [(torch.float16, True), (torch.bfloat16, True), (torch.float32, False)]
)
def test_views_in_the_trainer_dtype_and_format(tiny_root, dtype, channels_last):
    ld = dali_loader(tiny_root, COLOUR, batch_size=8, dtype=dtype, channels_last=channels_last)
    b = next(iter(ld))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert b.im_q.dtype == b.im_k.dtype == dtype
    assert b.im_q.is_contiguous(memory_format=fmt) and b.im_k.is_contiguous(memory_format=fmt)
    assert b.im_q.float().abs().max() < 5  # normalised, not 0-255


def test_flip_fraction_matches_spec_and_torch(geometry):
    (_, _, flip_d), (_, _, flip_t) = geometry
    assert abs(flip_d.mean() - 0.5) < 0.1 and abs(flip_t.mean() - 0.5) < 0.1
    assert abs(flip_d.mean() - flip_t.mean()) < 0.1


def test_crop_area_and_ratio_match_spec_and_torch(geometry):
    (area_d, ratio_d, _), (area_t, ratio_t, _) = geometry
    lo, hi = GEOMETRY.crop_scale
    for area, ratio in ((area_d, ratio_d), (area_t, ratio_t)):
        assert area.min() > lo - 0.05 and area.max() < hi + 0.05
        assert ratio.min() > GEOMETRY.crop_ratio[0] - 0.08 and ratio.max() < GEOMETRY.crop_ratio[1] + 0.08
    assert abs(area_d.mean() - area_t.mean()) < 0.05, (area_d.mean(), area_t.mean())
    q = [0.25, 0.5, 0.75]
    assert np.abs(np.quantile(area_d, q) - np.quantile(area_t, q)).max() < 0.08
    assert abs(np.log(ratio_d).mean() - np.log(ratio_t).mean()) < 0.05


@pytest.mark.parametrize("spec", [COLOUR, replace(MOCO_V1, image_size=32)], ids=["v2", "v1"])
def test_grey_and_jitter_fractions_match_spec_and_torch(synth, spec):
    files = load_splits(str(synth["flat"]), check=False).train.files
    colours = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float64).mean((0, 1)) for f in files])
    views, index = dali_views(synth["flat"], spec)
    grey_d, jit_d = colour_stats(views, colours[index])
    views_t = torch_views(synth["flat"], spec)
    grey_t, jit_t = colour_stats(views_t, colours[np.arange(len(views_t)) % len(files)])
    for grey, jit in ((grey_d, jit_d), (grey_t, jit_t)):
        assert abs(grey.mean() - spec.gray_prob) < 0.07
        assert abs(jit[~grey].mean() - spec.jitter_prob) < 0.07
    assert abs(grey_d.mean() - grey_t.mean()) < 0.08
    assert abs(jit_d[~grey_d].mean() - jit_t[~grey_t].mean()) < 0.08


def test_blur_fraction_and_kernel_match_spec_and_torch(synth):
    plain, plain_index = dali_views(synth["noise"], IDENTITY, epochs=1)
    reference = {int(i): v for v, i in zip(plain, plain_index, strict=True)}
    views, index = dali_views(synth["noise"], BLUR)
    diff = np.stack([np.abs(v.astype(int) - reference[int(i)]).mean() for v, i in zip(views, index, strict=True)])
    blurred = diff > 10
    assert (diff[~blurred] < 1).all()  # an identity crop and a 1-tap window change nothing
    assert abs(blurred.mean() - BLUR.blur_prob) < 0.1
    # the same kernel as torchvision's: size spec.blur_kernel_size, mirrored border
    k = BLUR.blur_kernel_size
    for v, i in list(zip(views[blurred], index[blurred], strict=True))[:20]:
        ref = TF.gaussian_blur(torch.from_numpy(reference[int(i)]).permute(2, 0, 1), [k, k], [1.5, 1.5])
        assert np.abs(v.astype(int) - ref.permute(1, 2, 0).numpy()).mean() < 1.0
    tv = torch_views(synth["noise"], BLUR, n=200)
    src = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(synth["noise"].glob("c/*.jpg"))])
    tv_blurred = np.abs(tv.astype(int) - src[np.arange(200) % N_IMAGES]).mean((1, 2, 3)) > 10
    assert abs(blurred.mean() - tv_blurred.mean()) < 0.15


def test_blur_sigma_and_jitter_ranges_match_the_spec(synth):
    # The rates above say whether a view was blurred or jittered, not how much: a sigma range or a
    # jitter range translated wrong (half of it) passed them. Here every view is blurred (jittered).
    # Blur, sigma ~ U(0.1, 2): how much it changes noise images, against torchvision's blur.
    spec = replace(BLUR, blur_prob=1.0, blur_sigma=MOCO_V2.blur_sigma)
    plain, plain_index = dali_views(synth["noise"], IDENTITY, epochs=1)
    reference = {int(i): v for v, i in zip(plain, plain_index, strict=True)}
    views, index = dali_views(synth["noise"], spec, epochs=3)
    diff = np.stack([np.abs(v.astype(int) - reference[int(i)]).mean() for v, i in zip(views, index, strict=True)])
    tv = torch_views(synth["noise"], spec, n=len(views))
    src = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(synth["noise"].glob("c/*.jpg"))])
    diff_t = np.abs(tv.astype(int) - src[np.arange(len(tv)) % N_IMAGES]).mean((1, 2, 3))
    q = [0.25, 0.5, 0.75]
    assert np.abs(np.quantile(diff, q) - np.quantile(diff_t, q)).max() < 5  # grey levels (measured: 2)
    files = load_splits(str(synth["flat"]), check=False).train.files
    colours = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float64).mean((0, 1)) for f in files])
    alone = {"jitter_prob": 1.0, "gray_prob": 0.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}
    # brightness 0.4: a factor ~ U(0.6, 1.4) on every channel; the darkest of 240 views is near 0.6
    views, index = dali_views(synth["flat"], replace(COLOUR, **{**alone, "brightness": 0.4}), epochs=3)
    factor = views.astype(np.float64).mean((1, 2)).sum(1) / colours[index].sum(1)
    assert 0.57 < factor.min() < 0.65
    # contrast 0.4: a factor ~ U(0.6, 1.4) on each colour's distance from mid-grey (DALI's pivot, 128),
    # its luma's too (the flat colours' lumas, 66 to 189, tell it from saturation's, which keeps it)
    luma = np.array([0.299, 0.587, 0.114])
    views, index = dali_views(synth["flat"], replace(COLOUR, **{**alone, "contrast": 0.4}), epochs=3)
    moved, before = views.astype(np.float64).mean((1, 2)) - 128, colours[index] - 128
    factor = (moved * before).sum(1) / (before * before).sum(1)  # least squares, over the three channels
    assert 0.57 < factor.min() < 0.65 and 1.35 < factor.max() < 1.43
    assert np.abs(moved @ luma - factor * (before @ luma)).max() < 3  # grey levels (measured: 0.4)
    # saturation 0.4: a factor ~ U(0.6, 1.4) on the chroma (YIQ's I, Q), the luma kept
    views, index = dali_views(synth["flat"], replace(COLOUR, **{**alone, "saturation": 0.4}), epochs=3)
    after = views.astype(np.float64).mean((1, 2))
    chroma = np.array([[0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])  # RGB -> I, Q
    factor = np.hypot(*(chroma @ after.T)) / np.hypot(*(chroma @ colours[index].T))
    assert 0.57 < factor.min() < 0.65 and 1.35 < factor.max() < 1.43
    assert np.abs(after @ luma - colours[index] @ luma).max() < 3  # grey levels (measured: 1.1)
    # hue 0.1: a turn of the chroma (YIQ's I, Q) by up to 0.1 x 360 degrees either way
    views, index = dali_views(synth["flat"], replace(COLOUR, **{**alone, "hue": 0.1}), epochs=3)
    i_v, q_v = chroma @ views.astype(np.float64).mean((1, 2)).T
    i_r, q_r = chroma @ colours[index].T
    turn = (np.degrees(np.arctan2(q_v, i_v) - np.arctan2(q_r, i_r)) + 180) % 360 - 180
    assert 32 < np.abs(turn).max() < 40


def test_ranks_get_disjoint_shares_and_equal_steps(tiny_root):
    loaders = [dali_loader(tiny_root, COLOUR, batch_size=4, rank=r, world_size=3) for r in range(3)]
    assert [len(ld) for ld in loaders] == [2, 2, 2]  # 32 // 3 // 4
    shares = [{i for b in ld for i in b.index.tolist()} for ld in loaders]
    assert sum(map(len, shares)) == 24 and len(set().union(*shares)) == 24


def test_images_too_few_for_a_batch_of_each_process_are_refused(tiny_root, tmp_path):
    # the one check of the folder backends (loaders.base.check_one_batch), for an image folder and a
    # shard set: each of 2 processes has 16 of their 32 images
    write_shards(tiny_root / "train", tmp_path / "wds")
    for data in (tiny_root, tmp_path / "wds"):
        with pytest.raises(
            DataError, match=r"^32 images give fewer than one batch of 32 per process \(2 processes, 16"
        ):
            dali_loader(data, COLOUR, batch_size=32, world_size=2)


def test_epoch_cut_short_then_next_epoch_restarts_in_step(tiny_root):
    a = dali_loader(tiny_root, COLOUR, batch_size=8)
    next(iter(a))  # leave epoch 0 after one batch
    a.set_epoch(1)
    b = dali_loader(tiny_root, COLOUR, batch_size=8)
    b.set_epoch(1)
    assert [x.index.tolist() for x in a] == [x.index.tolist() for x in b]


def test_an_epoch_started_at_a_step_yields_the_rest_of_that_epoch(tiny_root, tmp_path):
    # a run resumed within an epoch: its stream starts at that step, and runs on into the next epoch
    full = dali_loader(tiny_root, COLOUR, batch_size=4)
    full.set_epoch(1)
    whole = [(b.index.tolist(), b.label.tolist()) for b in full]
    full.set_epoch(2)
    after = [b.index.tolist() for b in full]
    resumed = dali_loader(tiny_root, COLOUR, batch_size=4)
    resumed.set_epoch(1, start_step=3)
    assert [(b.index.tolist(), b.label.tolist()) for b in resumed] == whole[3:]
    resumed.set_epoch(2)
    assert [b.index.tolist() for b in resumed] == after
    write_shards(tiny_root / "train", tmp_path / "wds")
    shards = dali_loader(tmp_path / "wds", COLOUR, batch_size=4)
    assert full.starts_mid_epoch and not shards.starts_mid_epoch  # DALI's reader starts at a shard's start
    with pytest.raises(ValueError, match="first step only"):
        shards.set_epoch(1, start_step=3)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_a_batch_is_not_overwritten_by_later_ones(tiny_root, device):
    # The views share DALI's buffers (no copy): they must stay intact while later batches come.
    ld = dali_loader(tiny_root, COLOUR, device=device, batch_size=8)
    it = iter(ld)
    first = next(it)
    copy = [t.clone() for t in first]
    rest = list(it)
    assert len(rest) == 3
    for t, c in zip(first, copy, strict=True):
        assert torch.equal(t, c)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_views_are_dalis_buffers_not_copies(tiny_root, device):
    ld = dali_loader(tiny_root, COLOUR, device=device, batch_size=8, dtype=torch.float16)
    ld._start(0)
    outs = ld._run()
    b = ld._to_batch(outs)
    assert b.im_q.data_ptr() == outs[0].as_tensor().data_ptr()  # NHWC permuted: a view, no layout copy
    assert b.im_k.data_ptr() == outs[1].as_tensor().data_ptr()


def write_shards(src: Path, dst: Path, per_shard: int = 16) -> dict[int, tuple[Path, int]]:
    """A shard set from an image folder; returns index -> (image file, label)."""
    images = load_splits(str(src), check=False).train
    order = np.random.default_rng(0).permutation(len(images))
    dst.mkdir(parents=True)
    shards, truth = [], {}
    for s in range(0, len(order), per_shard):
        name = f"shard-{s // per_shard:06d}.tar"
        with tarfile.open(dst / name, "w") as tf:
            for i in order[s : s + per_shard]:
                f, label = Path(images.files[i]), images.labels[i]
                key = f"{f.parent.name}_{f.stem}"
                truth[len(truth)] = (f, label)
                for ext, payload in (("jpg", f.read_bytes()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        shards.append(name)
    meta = {"format": "wds", "classes": images.classes, "num_images": len(truth), "shards": shards}
    (dst / "meta.json").write_text(json.dumps(meta))
    first = dst / shards[0]
    first.with_suffix(".idx").write_text(index_text(index_lines(first)))  # the other is indexed on the fly
    return truth


def test_shard_set_round_trip(tiny_root, tmp_path):
    truth = write_shards(tiny_root / "train", tmp_path / "wds")
    ld = dali_loader(tmp_path / "wds", IDENTITY, batch_size=8)
    assert len(ld) == 4 and ld.num_images == 32 and ld.classes == ["airplane", "automobile"]
    seen = []
    for b in ld:
        for view, label, index in zip(to_uint8(b.im_q, IDENTITY), b.label.tolist(), b.index.tolist(), strict=True):
            f, true_label = truth[index]
            assert label == true_label
            # an identity view of a 32 x 32 image is the image: the index names the right sample
            assert np.abs(view.astype(int) - np.asarray(Image.open(f).convert("RGB"))).mean() < 2
            seen.append(index)
    assert sorted(seen) == list(range(32))  # 32 = 4 full batches: DALI's reader epoch is ours


def test_shard_set_ranks(tiny_root, tmp_path):
    write_shards(tiny_root / "train", tmp_path / "wds")
    shares = [
        {
            i
            for b in dali_loader(tmp_path / "wds", IDENTITY, batch_size=8, rank=r, world_size=2)
            for i in b.index.tolist()
        }
        for r in range(2)
    ]
    assert all(len(s) == 16 for s in shares) and not shares[0] & shares[1]


def test_shard_epochs_are_the_same_after_a_resume(tiny_root, tmp_path):
    # Each epoch starts its own reader stream: epoch 1 reads the same samples in the same order, with
    # the same draws of the whole v2 recipe, whether the loader ran epoch 0 first or starts there (a
    # resumed run; README: a shard set's resume draws what an uninterrupted run draws)
    write_shards(tiny_root / "train", tmp_path / "wds")
    ran = dali_loader(tmp_path / "wds", COLOUR, batch_size=8)
    for epoch in range(2):
        ran.set_epoch(epoch)
        batches = [(b.index.tolist(), b.im_q.clone(), b.im_k.clone()) for b in ran]
    fresh = dali_loader(tmp_path / "wds", COLOUR, batch_size=8)
    fresh.set_epoch(1)
    again = [(b.index.tolist(), b.im_q.clone(), b.im_k.clone()) for b in fresh]
    assert [i for i, *_ in again] == [i for i, *_ in batches]
    assert all(torch.equal(a, b) for x, y in zip(again, batches) for a, b in zip(x[1:], y[1:]))
    assert ran._stream[0] == ran.steps  # the stream of epoch 1 started at its first step


def test_shards_with_the_same_name_in_two_folders(tiny_root, tmp_path):
    # Neither has an index: the ones made on the fly must not overwrite each other.
    write_shards(tiny_root / "train", tmp_path / "wds")
    root = tmp_path / "wds"
    meta = json.loads((root / "meta.json").read_text())
    for i, name in enumerate(meta["shards"]):
        (root / name.replace(".tar", ".idx")).unlink(missing_ok=True)
        (root / f"part{i}").mkdir()
        (root / name).rename(root / f"part{i}" / "shard.tar")
    meta["shards"] = [f"part{i}/shard.tar" for i in range(len(meta["shards"]))]
    (root / "meta.json").write_text(json.dumps(meta))
    ld = dali_loader(root, IDENTITY, batch_size=8)
    assert len(set(ld.wds.index_paths)) == 2
    assert sorted(i for b in ld for i in b.index.tolist()) == list(range(32))


def test_corrupt_sample_in_a_shard_set_is_found_and_dropped(tiny_root, tmp_path, caplog):
    truth = write_shards(tiny_root / "train", tmp_path / "wds")
    root = tmp_path / "wds"
    # Zero one JPEG inside the first shard, in place: the tar and its index stay valid, DALI's decoder
    # fails on the sample without naming it.
    lines = (root / "shard-000000.idx").read_text().splitlines()[1:]
    jpg = next(line.split() for line in lines[3:] if line.split()[3].endswith(".jpg"))
    offset, size, member = int(jpg[1]), int(jpg[2]), jpg[3]
    with open(root / "shard-000000.tar", "r+b") as f:
        f.seek(offset)
        f.write(bytes(size))
    key = member.rsplit(".", 1)[0]
    bad = next(i for i, (f, _) in truth.items() if f"{f.parent.name}_{f.stem}" == key)
    ld = dali_loader(root, COLOUR, batch_size=8)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        seen = []
        for epoch in range(2):
            ld.set_epoch(epoch)
            steps = [b.index.tolist() for b in ld]
            assert len(steps) == len(ld) == 4
            seen += [i for s in steps for i in s]
    assert bad not in seen and len(set(seen)) == 31
    assert caplog.text.count(f"skipping sample {key} of {root / 'shard-000000.tar'}") == 1


def test_corrupt_images_are_named_and_skipped(fresh_root, caplog):
    cls = fresh_root / "train" / "airplane"
    good = sorted(cls.glob("*.jpg"))[0].read_bytes()
    # Both pass the header check when the list is built; DALI fails on them when decoding. It names
    # the truncated one in its error; the damaged one must be found by decoding the batch's files.
    (cls / "truncated.jpg").write_bytes(good[: int(len(good) * 0.9)])
    damaged = bytearray(good)
    damaged[len(good) // 2 : len(good) // 2 + 200] = bytes(range(200))
    (cls / "damaged.jpg").write_bytes(bytes(damaged))
    ld = dali_loader(fresh_root, COLOUR, batch_size=6)
    files = load_splits(str(fresh_root), check=True).train.files
    bad = {files.index(str(cls / "truncated.jpg")), files.index(str(cls / "damaged.jpg"))}
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        seen = set()
        for epoch in range(2):
            ld.set_epoch(epoch)
            steps = [b.index.tolist() for b in ld]
            assert len(steps) == len(ld) == 3
            seen.update(i for s in steps for i in s)
    assert not seen & bad
    for name in ("truncated.jpg", "damaged.jpg"):
        assert name in caplog.text, f"{name} was not reported (did DALI decode it after all?)"


def test_options_are_checked():
    assert DaliOptions.parse({"hw_decoder_load": "0.5", "threads": "3"}) == DaliOptions(hw_decoder_load=0.5, threads=3)
    for bad in ({"hw_decoder_load": "2"}, {"prefetch": "0"}, {"decoder": "nvjpeg"}, {"nope": "1"}, {"threads": "x"}):
        with pytest.raises(ConfigError):
            DaliOptions.parse(bad)
    with pytest.raises(ConfigError, match="CUDA"):
        dali_loader("unused", COLOUR, options={"decoder": "mixed"})


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "shards"])
def test_train_cli_with_dali_on_cpu(tiny_root, tmp_path, source):
    data = tiny_root
    if source == "shards":  # no eval split there: the final kNN is left out, not an error
        write_shards(tiny_root / "train", tmp_path / "wds")
        data = tmp_path / "wds"
    out = tmp_path / "run"
    args = ["train", "--loader", "dali", "--device", "cpu", "--data", str(data), "--preset", "cifar", "--epochs", "1"]
    args += ["--arch", "resnet18", "--stem", "imagenet", "--batch-size", "16", "--moco-k", "32", "--bn-splits", "2"]
    args += ["--workers", "0", "--loader-option", "threads=1", "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and np.isfinite(rows[0]["loss"])
    assert json.loads((out / "config.json").read_text())["data"]["loader"] == "dali"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pipeline_matches_the_spec(synth, tiny_root):
    # The mixed (nvJPEG) decoder and GPU operators: same contract and statistics as on the CPU.
    ld = dali_loader(tiny_root, COLOUR, device=torch.device("cuda"), batch_size=8, dtype=torch.bfloat16)
    b = next(iter(ld))
    assert b.im_q.is_cuda and b.im_q.dtype == torch.bfloat16 and b.label.is_cuda and b.index.is_cuda
    assert b.im_q.is_contiguous(memory_format=torch.channels_last)
    assert ld.settings.gpu_decode
    area, _, flip = crop_stats(dali_views(synth["coords"], GEOMETRY, torch.device("cuda"))[0])
    area_cpu = crop_stats(dali_views(synth["coords"], GEOMETRY)[0])[0]
    assert abs(flip.mean() - 0.5) < 0.1 and abs(area.mean() - area_cpu.mean()) < 0.05
    files = load_splits(str(synth["flat"]), check=False).train.files
    colours = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float64).mean((0, 1)) for f in files])
    views, index = dali_views(synth["flat"], COLOUR, torch.device("cuda"))
    grey, jit = colour_stats(views, colours[index])
    assert abs(grey.mean() - COLOUR.gray_prob) < 0.07 and abs(jit[~grey].mean() - COLOUR.jitter_prob) < 0.07


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_decoder_on_a_gpu_run_gives_gpu_views(tiny_root):
    ld = dali_loader(tiny_root, COLOUR, device=torch.device("cuda"), batch_size=8, options={"decoder": "cpu"})
    b = next(iter(ld))
    assert not ld.settings.gpu_decode
    assert b.im_q.is_cuda and b.im_k.is_cuda and b.label.is_cuda and b.index.is_cuda
