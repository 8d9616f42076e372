"""The FFCV loader for real (no mock) on a small .beton written once per session: the batches it
yields (two normalised views, dtype and memory format, the order by seed and epoch, an epoch
started at a step, rank shards), the views its crops and colour pass make, and the crops and flips
of FFCV's own pipeline on coordinate images.

FFCV's Numba pipeline compiles on first use (~20-40 s per Loader on this CPU), so one loader is
shared by the session's tests (conftest.py's `loader`, also read by test_ffcv_errors.py); the raw
coordinate images pay one more compile.
"""

import copy
import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("ffcv")  # every test here needs FFCV: skipped where it is not installed

import numpy as np
import torch
from conftest import coordinate_image, crop_stats, to_uint8
from ffcv_helpers import BATCH, beton_labels, epoch_indices, loader_args
from moco_fast.loaders import create_loader
from moco_fast.loaders.base import DeviceAugment
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from moco_fast.augment import MOCO_CIFAR
from moco_fast.convert import ConvertConfig, convert

pytestmark = pytest.mark.slow

GEOMETRY = replace(MOCO_CIFAR, crop_scale=(0.2, 1.0), jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0)


def test_batches_are_two_normalised_views(loader, tiny_beton):
    assert loader.num_images == 32 and len(loader) == 32 // BATCH
    assert loader.classes == sorted(json.loads(tiny_beton.with_name("tiny.beton.json").read_text())["classes"])
    labels = beton_labels(tiny_beton)
    batches = list(loader)
    assert len(batches) == len(loader)
    mean, std = torch.tensor(MOCO_CIFAR.mean), torch.tensor(MOCO_CIFAR.std)
    lo, hi = ((0 - mean) / std).min().item(), ((1 - mean) / std).max().item()
    for b in batches:
        for v in (b.im_q, b.im_k):
            assert v.shape == (BATCH, 3, 32, 32) and v.dtype == torch.float32
            assert v.is_contiguous(memory_format=torch.channels_last)
            assert lo - 1e-4 <= v.min().item() and v.max().item() <= hi + 1e-4
        assert not torch.equal(b.im_q, b.im_k)  # independent crops and colours
        assert b.label.tolist() == [labels[i] for i in b.index.tolist()]
    seen = [i for b in batches for i in b.index.tolist()]
    assert sorted(seen) == list(range(32))
    assert loader.files.starts is None  # no image skipped: the file list was never read


def test_an_epoch_started_at_a_step_yields_the_rest_of_that_epoch(loader, tiny_beton):
    # a run resumed within an epoch: FFCV reads from that step on, with the same views (the crops
    # and flips drawn by image, the colour pass by global step), and the next epoch is whole again
    loader.set_epoch(2)
    whole = list(loader)
    loader.set_epoch(2, start_step=1)
    rest = list(loader)
    assert [(b.index.tolist(), b.label.tolist()) for b in rest] == [
        (b.index.tolist(), b.label.tolist()) for b in whole[1:]
    ]
    for a, b in zip(whole[1:], rest, strict=True):
        assert torch.equal(a.im_q, b.im_q) and torch.equal(a.im_k, b.im_k)
    assert epoch_indices(loader, 2) == [i for b in whole for i in b.index.tolist()]


def test_an_epoch_started_at_a_step_ends_at_its_last_whole_batch(tiny_beton):
    # 32 images in batches of 6: 5 steps, 2 images left. Resumed at step 1, FFCV cut the rest (26) at
    # its first epoch's whole batches (30) and read 5 steps, the last of 2 images
    ld = create_loader("ffcv", loader_args(tiny_beton, batch_size=6))
    ld.set_epoch(1)
    whole = [b.index.tolist() for b in ld]
    ld.set_epoch(1, start_step=1)
    assert len(ld) == 5 and [b.index.tolist() for b in ld] == whole[1:]


def views_by_image(batches) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    return {int(i): (b.im_q[r], b.im_k[r]) for b in batches for r, i in enumerate(b.index.tolist())}


def test_an_images_views_depend_on_the_epoch_not_on_the_thread_count(loader, tiny_beton):
    # the crops and flips come from each image's own stream (seed, epoch, index), whichever of
    # FFCV's threads decodes it: two threads draw what one does (a second compiled pipeline)
    two = create_loader("ffcv", loader_args(tiny_beton, workers=2))
    one = loader
    for ld in (one, two):
        ld.set_epoch(4)
    a, b = views_by_image(one), views_by_image(two)
    assert sorted(a) == sorted(b) == list(range(32))
    for i in a:
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    one.set_epoch(5)
    other = views_by_image(one)  # another epoch: other views of each image
    assert sum(torch.equal(a[i][0], other[i][0]) for i in a) < 4


def test_order_follows_seed_and_epoch(loader):
    e0, e1, e0_again = epoch_indices(loader, 0), epoch_indices(loader, 1), epoch_indices(loader, 0)
    assert e0 == e0_again and e0 != e1
    assert sorted(e0) == sorted(e1) == list(range(32))


def test_views_follow_dtype_and_memory_format(loader):
    other = copy.copy(loader)
    other.args = loader_args(loader.args.data, dtype=torch.bfloat16, channels_last=False)
    other.augment = DeviceAugment(other.args, loader.opts.jitter_order, flip=False)  # dtype and format live here
    b = next(iter(other))
    assert b.im_q.dtype == torch.bfloat16 and b.im_q.is_contiguous()


def test_the_triton_pass_reads_ffcvs_uint8_batch(loader, monkeypatch):
    # kernel="triton" (under the interpreter): the jitter kernels get FFCV's uint8 views, not a float
    # copy, and the batches are the torch pass's to float rounding (the same crops, the same draws).
    pytest.importorskip("triton")
    from moco_fast.kernels import blur_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    other = copy.copy(loader)
    other.augment = DeviceAugment(loader.args, loader.opts.jitter_order, flip=False, kernel="triton")
    read, jitter_gray = [], blur_triton.jitter_gray  # the name the pass calls
    monkeypatch.setattr(blur_triton, "jitter_gray", lambda x, p: read.append(x.dtype) or jitter_gray(x, p))
    batches = {}
    for ld in (loader, other):  # one after the other: the copy shares FFCV's loader
        ld.set_epoch(1)
        batches[ld] = list(ld)
    for a, b in zip(batches[loader], batches[other], strict=True):
        assert torch.equal(a.index, b.index)
        torch.testing.assert_close(b.im_q, a.im_q, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.im_k, a.im_k, rtol=1e-5, atol=1e-5)
    assert read == [torch.uint8] * len(loader)


def test_views_match_what_the_crops_and_colour_pass_make(loader):
    """Statistically: a gray view has equal channels, and about gray_prob of views are gray."""
    gray = total = 0
    mean = torch.tensor(MOCO_CIFAR.mean).view(1, 3, 1, 1)
    std = torch.tensor(MOCO_CIFAR.std).view(1, 3, 1, 1)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for b in loader:
            for v in (b.im_q, b.im_k):
                x = v * std + mean  # back to [0, 1]
                same = (x[:, 0] - x[:, 1]).abs().flatten(1).amax(1) < 1e-3
                gray += int(same.sum())
                total += v.shape[0]
    assert total == 192
    # gray_prob 0.2 of 192 views: mean 38, sd 5.5
    assert abs(gray / total - MOCO_CIFAR.gray_prob) < 4 * math.sqrt(0.2 * 0.8 / total)


def test_rank_shards_are_disjoint_and_equal():
    from moco_fast.loaders.ffcv import RankShardOrder

    class FakeLoader:
        indices = range(30)
        batch_size = 5  # the shards' 10 are 2 whole batches

    shards = [RankShardOrder(seed=1, rank=r, world_size=3)(FakeLoader()).sample_order(2).tolist() for r in range(3)]
    assert all(len(s) == 10 for s in shards)
    assert sorted(i for s in shards for i in s) == list(range(30))
    again = RankShardOrder(seed=1, rank=0, world_size=3)(FakeLoader()).sample_order(2).tolist()
    assert again == shards[0]


def test_raw_images_that_do_not_fit_their_record_are_replaced(coords_loader, caplog):
    """Raw pixels are not decoded, but their record can be wrong: a size of 0 made OpenCV abort the
    process, pixels that do not fill height x width x 3 made FFCV's thread die and the loop wait
    forever. The shared raw pipeline, reading a copy of its metadata with three bad records."""
    from moco_fast.loaders.ffcv_ops import BAD_MODE, BAD_RAW, EMPTY, FAILURES

    ld = copy.copy(coords_loader)
    ld.bad = set()
    ld.ffcv = copy.copy(coords_loader.ffcv)
    ld.ffcv.reader = copy.copy(coords_loader.ffcv.reader)
    meta = coords_loader.ffcv.reader.metadata.copy()  # read-only like FFCV's own: the compiled code fits
    meta["f0"]["height"][0], meta["f0"]["mode"][1], meta["f0"]["width"][2] = 0, 7, 63
    meta.setflags(write=False)
    ld.ffcv.reader.metadata = meta
    ld.set_epoch(0)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        seen = [i for b in ld for i in b.index.tolist()]
    assert len(seen) == 40 and set(seen) == set(range(3, 40))
    for i, code in enumerate((EMPTY, BAD_MODE, BAD_RAW)):
        assert (
            f"skipping unreadable image {i} of {ld.path} (file c/{i:03d}.png, class c): {FAILURES[code]}" in caplog.text
        )


# -- the crops and flips of FFCV's own pipeline (the colour pass is off) ------------------------------
@pytest.fixture(scope="module")
def coords_loader(tmp_path_factory):
    """40 coordinate images stored raw (no JPEG error in the coordinates), colour off: a second
    compiled pipeline, shared by the tests below."""
    root = tmp_path_factory.mktemp("coords")
    (root / "images" / "c").mkdir(parents=True)
    for i in range(40):
        Image.fromarray(coordinate_image()).save(root / "images" / "c" / f"{i:03d}.png")
    beton = root / "coords.beton"  # beside SRC: convert refuses an output inside a folder its scan reads
    convert(ConvertConfig(str(root / "images"), str(beton), format="ffcv", write_mode="raw", workers=1))
    return create_loader("ffcv", loader_args(beton, aug=GEOMETRY, batch_size=4))


def test_crops_and_flips_match_the_spec_and_torchvision(coords_loader):
    views, same = [], 0
    for epoch in range(5):
        coords_loader.set_epoch(epoch)
        for b in coords_loader:
            q, k = to_uint8(b.im_q, GEOMETRY), to_uint8(b.im_k, GEOMETRY)
            same += int((q == k).reshape(len(q), -1).all(1).sum())
            views += [q, k]
    area, ratio, flip = crop_stats(np.concatenate(views))
    assert len(area) == 400 and same == 0  # two independent crops of each image
    assert abs(flip.mean() - GEOMETRY.flip_prob) < 0.1  # sd 0.025
    lo, hi = GEOMETRY.crop_scale
    assert area.min() > lo - 0.05 and area.max() < hi + 0.05
    assert ratio.min() > GEOMETRY.crop_ratio[0] - 0.08 and ratio.max() < GEOMETRY.crop_ratio[1] + 0.08
    # torchvision's RandomResizedCrop boxes on the same 64 x 64 image, sampled directly
    torch.manual_seed(0)
    rrc = RandomResizedCrop(32, scale=GEOMETRY.crop_scale, ratio=GEOMETRY.crop_ratio)
    boxes = np.array([rrc.get_params(torch.zeros(3, 64, 64), rrc.scale, rrc.ratio)[2:] for _ in range(4000)])
    area_t, ratio_t = boxes[:, 0] * boxes[:, 1] / 64**2, boxes[:, 1] / boxes[:, 0]
    q = [0.25, 0.5, 0.75]
    assert np.abs(np.quantile(area, q) - np.quantile(area_t, q)).max() < 0.08
    assert abs(np.log(ratio).mean() - np.log(ratio_t).mean()) < 0.05


def test_a_held_batch_is_not_overwritten_by_later_ones(coords_loader):
    # On the CPU the labels and indices must not alias FFCV's reused batch buffers.
    coords_loader.set_epoch(0)
    it = iter(coords_loader)
    first = next(it)
    kept = first.index.clone(), first.label.clone(), first.im_q.clone()
    rest = list(it)
    assert len(rest) == len(coords_loader) - 1
    assert torch.equal(first.index, kept[0]) and torch.equal(first.label, kept[1]) and torch.equal(first.im_q, kept[2])


def test_the_processs_torch_thread_count_survives_making_the_loader(tiny_beton):
    # FFCV's Loader sets torch's thread count to its worker count as it is made (Compiler.set_num_threads),
    # before the epoch's restore took the count to put back: a `--gpus` worker's one thread (OMP_NUM_THREADS=1)
    # became --workers for the whole run, and 2 such workers on 2 cores took 20-30 s an epoch, not 2
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        create_loader("ffcv", loader_args(tiny_beton, workers=2))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_building_an_ffcv_loader_or_writing_a_beton_keeps_the_programs_torch_thread_count(
    tiny_root, tiny_beton, tmp_path
):
    # FFCV's import sets torch's thread count to 1 (Compiler.set_num_threads(1)): a program that built
    # an FFCV loader through the registry, or wrote a .beton, went on on one thread (so did a CPU run,
    # whose loader puts back the count it finds). Each in a fresh process: this one has imported FFCV
    build = f"create_loader('ffcv', loader_args({str(tiny_beton)!r}))"
    write = f"convert(ConvertConfig({str(tiny_root)!r}, {str(tmp_path / 'x.beton')!r}, format='ffcv', workers=1))"
    imports = "import torch; from ffcv_helpers import loader_args; from moco_fast.loaders import create_loader; "
    imports += "from moco_fast.convert import ConvertConfig, convert; torch.set_num_threads(3); "
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    for code in (build, write):
        script = imports + code + "; print(torch.get_num_threads())"
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[-1] == "3", code
