"""The FFCV loader for real (no mock) on a small .beton written once per session.

FFCV's Numba pipeline compiles on first use (~20-40 s per Loader on this CPU), so one loader is
shared by the module's tests; the end-to-end `moco-fast train` run and the one-decode-per-view path
pay one compile each (both read a copy with damaged JPEGs), the raw coordinate images one more.
"""

import copy
import gc
import json
import logging
import math
import os
import re
import shutil
import sys
import threading
from dataclasses import replace

import numba
import numpy as np
import pytest
import torch
from conftest import coordinate_image, crop_stats, to_uint8
from moco_fast.loaders import LoaderArgs, create_loader
from moco_fast.loaders.base import DeviceAugment
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from moco_fast.augment import MOCO_CIFAR
from moco_fast.cli import main
from moco_fast.config import ConfigError
from moco_fast.convert import ConvertConfig, convert
from moco_fast.data import DataError

pytestmark = pytest.mark.slow
BATCH = 8
GEOMETRY = replace(MOCO_CIFAR, crop_scale=(0.2, 1.0), jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0)


@pytest.fixture(scope="session")
def corrupt_beton(tiny_beton, tmp_path_factory):
    """A copy of tiny_beton with three JPEGs damaged in place, as a bad disk or copy leaves them:
    {index: the name of the failure the decoder reports}. The .beton and its sidecars stay valid."""
    from ffcv.reader import Reader

    dst = tmp_path_factory.mktemp("corrupt") / "corrupt.beton"
    shutil.copy(tiny_beton, dst)
    for side in (".json", ".files.txt"):
        shutil.copy(tiny_beton.with_name("tiny.beton" + side), dst.with_name("corrupt.beton" + side))
    reader = Reader(str(dst))
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist(), strict=True))
    data = bytearray(dst.read_bytes())

    def jpeg(i):
        start = int(reader.metadata["f0"]["data_ptr"][i])
        return start, start + sizes[start]

    start, _ = jpeg(3)
    data[start : start + 64] = bytes(64)  # no start-of-image marker left: imdecode fails
    start, end = jpeg(12)
    data[(start + end) // 2 : end] = bytes(end - (start + end) // 2)  # the second half lost: it warns
    start, end = jpeg(25)
    sof = data.index(b"\xff\xc0", start, end)
    data[sof + 5 : sof + 7] = (16).to_bytes(2, "big")  # says 16 rows: it would decode, half of it stale
    dst.write_bytes(bytes(data))
    return dst, {3: "BAD_JPEG", 12: "BAD_JPEG", 25: "BAD_SIZE"}


def source_files(root) -> list[str]:
    """root's train/ files as convert writes them into the .beton: sorted, relative to train/."""
    train = root / "train"
    return [f"{c.name}/{f.name}" for c in sorted(train.iterdir()) for f in sorted(c.iterdir())]


def beton_labels(path) -> list[int]:
    from ffcv.reader import Reader

    return Reader(str(path)).metadata["f1"].tolist()


def loader_args(beton, **kw) -> LoaderArgs:
    base = dict(
        data=None if beton is None else str(beton),
        aug=MOCO_CIFAR,
        batch_size=BATCH,
        device=torch.device("cpu"),
        workers=1,
        seed=3,
    )
    return LoaderArgs(**{**base, **kw})


@pytest.fixture(scope="module")
def loader(tiny_beton):
    return create_loader("ffcv", loader_args(tiny_beton))


def epoch_indices(loader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [i for b in loader for i in b.index.tolist()]


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

    shards = [RankShardOrder(seed=1, rank=r, world_size=3)(FakeLoader()).sample_order(2).tolist() for r in range(3)]
    assert all(len(s) == 10 for s in shards)
    assert sorted(i for s in shards for i in s) == list(range(30))
    again = RankShardOrder(seed=1, rank=0, world_size=3)(FakeLoader()).sample_order(2).tolist()
    assert again == shards[0]


def test_options_are_checked(tiny_beton):
    with pytest.raises(ConfigError, match="unknown ffcv loader option"):
        create_loader("ffcv", loader_args(tiny_beton, options={"speed": "max"}))
    with pytest.raises(ConfigError, match="jitter_order"):
        create_loader("ffcv", loader_args(tiny_beton, options={"jitter_order": "never"}))
    with pytest.raises(ConfigError, match="expected a bool"):
        create_loader("ffcv", loader_args(tiny_beton, options={"os_cache": "maybe"}))


def test_bad_data_is_a_clear_error(tiny_beton, tmp_path):
    with pytest.raises(DataError, match="needs --data"):
        create_loader("ffcv", loader_args(None))
    with pytest.raises(DataError, match=r"reads a \.beton file, and --data .* is a folder"):
        create_loader("ffcv", loader_args(tmp_path))
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match=r"not a readable \.beton"):
        create_loader("ffcv", loader_args(junk))
    with pytest.raises(DataError, match="fewer than one batch"):
        create_loader("ffcv", loader_args(tiny_beton, batch_size=64))


def write_foreign_beton(path, image_field, label_field, label=int):
    """16 samples written by FFCV's own writer, as another tool would, with these field types."""
    from ffcv.writer import DatasetWriter

    class Samples:
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return np.full((32, 32, 3), i, np.uint8), label(i % 2)

    DatasetWriter(str(path), {"image": image_field, "label": label_field}, num_workers=1).from_indexed_dataset(
        Samples()
    )
    return path


def test_fields_of_another_type_are_a_one_line_error(tmp_path, capsys):
    """Not a traceback from deep in FFCV (an IndexError in the decoder's declare_state_and_memory),
    and before any pipeline is compiled."""
    from ffcv.fields import FloatField, IntField, NDArrayField, RGBImageField

    nd = write_foreign_beton(tmp_path / "nd.beton", NDArrayField(np.dtype("uint8"), (32, 32, 3)), IntField())
    with pytest.raises(DataError, match=r"'image' field is NDArrayField, --loader ffcv reads 'image' as RGBImageField"):
        create_loader("ffcv", loader_args(nd))
    fl = write_foreign_beton(tmp_path / "fl.beton", RGBImageField(), FloatField(), label=float)
    with pytest.raises(DataError, match=r"'label' field is FloatField, --loader ffcv reads 'label' as IntField"):
        create_loader("ffcv", loader_args(fl))
    argv = ["train", "--loader", "ffcv", "--device", "cpu", "--data", str(nd), "--arch", "resnet18"]
    assert main([*argv, "--batch-size", "8", "--bn-splits", "2", "--workers", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"moco-fast train: error: {nd}: its 'image' field is NDArrayField" in err


def test_corrupt_images_are_named_and_replaced(corrupt_beton, tiny_root, caplog):
    """FFCV ignores imdecode's failure: the sample was cropped from the previous image's pixels and
    trained on with its own label, without a word. Here its views are zeroed and its status says
    why; the loader names it once, by its source file too (from convert's list beside the .beton),
    and hands on another image of the batch (with that image's label and index). The path with one
    decode per view (decode=twice), on two Numba threads (prange)."""
    path, bad = corrupt_beton
    opts = {"decode": "twice", "jitter_order": "batch"}
    ld = create_loader("ffcv", loader_args(path, batch_size=16, workers=2, options=opts))
    labels, seen = beton_labels(path), []
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        for epoch in range(2):
            ld.set_epoch(epoch)
            for b in ld:
                assert b.im_q.shape == b.im_k.shape == (16, 3, 32, 32) and not torch.equal(b.im_q, b.im_k)
                assert b.label.tolist() == [labels[i] for i in b.index.tolist()]
                seen += b.index.tolist()
    assert set(seen) == set(range(32)) - set(bad)
    files = source_files(tiny_root)
    for i in bad:
        assert caplog.text.count(f"skipping unreadable image {i} of {path}") == 1
        cls = files[i].split("/")[0]
        assert f"skipping unreadable image {i} of {path} (file {files[i]}, class {cls}): " in caplog.text
    import moco_fast.loaders.ffcv_ops as ffcv_ops

    assert ffcv_ops.FAILURES[ffcv_ops.BAD_SIZE] in caplog.text
    code = {i: getattr(ffcv_ops, name) for i, name in bad.items()}
    names = list(ld.ffcv.pipeline_specs)
    ld.set_epoch(0)
    for batch in ld.ffcv:  # FFCV's own output, before the loader replaces anything
        out = dict(zip(names, batch, strict=True))
        for view in ("image", "image2"):
            status = out[f"{view}_status"].numpy()
            assert [c for c, _ in status] == [code.get(i, 0) for _, i in status]
            assert all(not out[view][row].any() for row, (c, _) in enumerate(status) if c)  # zeroed, not stale
        # the two decoders crop and flip from streams of their own (views 0 and 1), not the same crop twice
        good = out["image_status"].numpy()[:, 0] == 0
        same = (out["image"][good] == out["image2"][good]).flatten(1).all(1)
        assert int(same.sum()) <= 1


def test_unreadable_images_past_the_limit_stop_the_run(loader):
    """The rows a batch is read from, and the limits, on a status as the decoder writes it."""
    from moco_fast.loaders.ffcv_ops import BAD_JPEG

    ld = copy.copy(loader)
    ld.bad = set()
    status = np.array([[0, 5], [BAD_JPEG, 6], [0, 7], [BAD_JPEG, 8], [BAD_JPEG, 9]])
    assert ld._replacements(status).tolist() == [0, 2, 2, 0, 0]  # the next image that was read
    assert ld.bad == {6, 8, 9}
    with pytest.raises(DataError, match=r"no image of a batch of 2 from .* could be decoded \(images 10, 11\)"):
        ld._replacements(np.array([[BAD_JPEG, 10], [BAD_JPEG, 11]]))
    ld._replacements(np.array([[BAD_JPEG, i] for i in range(12, 23)] + [[0, 31]]))  # 16 of 32: not more than 16
    with pytest.raises(DataError, match=r"17 of the 32 images in .* could not be decoded \(more than 10%\)"):
        ld._replacements(np.array([[BAD_JPEG, 23], [0, 31]]))


def test_an_error_in_ffcvs_loader_thread_ends_the_epoch_with_it(loader, monkeypatch):
    # FFCV's epoch thread catches StopIteration only: before, the loop then waited on its queue forever
    from ffcv.loader.epoch_iterator import EpochIterator

    run_pipeline = EpochIterator.run_pipeline

    def failing(self, b_ix, *args):
        if b_ix == 1:
            raise OSError(5, "Input/output error")
        return run_pipeline(self, b_ix, *args)

    monkeypatch.setattr(EpochIterator, "run_pipeline", failing)
    got, error = [], []

    def consume():
        try:
            got.extend(b.index for b in loader)
        except RuntimeError as e:
            error.append(e)

    t = threading.Thread(target=consume, daemon=True)  # a hang fails the test instead of CI
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the epoch hung"
    assert len(got) == 1 and len(error) == 1
    assert re.fullmatch(
        r"FFCV's loader thread stopped reading .*\.beton: OSError: \[Errno 5\] Input/output error", str(error[0])
    )
    monkeypatch.undo()
    assert len(epoch_indices(loader, 1)) == loader.num_images  # the next epoch reads again


def test_a_beton_gone_at_an_epochs_start_is_one_line(loader, tiny_beton):
    # With os_cache=0 FFCV's page readers open the file in threads of their own: gone, they died and
    # the epoch hung. The loader now opens it first, whatever os_cache.
    moved = tiny_beton.with_name("moved.beton")
    tiny_beton.rename(moved)
    try:
        loader.set_epoch(4)
        with pytest.raises(DataError, match=r"cannot read .*\.beton at epoch 5 \(No such file or directory\): was it"):
            next(iter(loader))
    finally:
        moved.rename(tiny_beton)
    assert len(epoch_indices(loader, 4)) == loader.num_images


def test_a_new_loader_leaves_numbas_shared_types_alone(tiny_beton, monkeypatch):
    # FFCV's os_cache reader set `mutable = False` on Numba's one interned uint8[::1], so each loader
    # after the first changed the hash of a key of the pipelines compiled before it: collected, their
    # dispatchers' finalizer printed "Exception ignored in: <finalize object ...> KeyError: (Array(
    # uint8, 1, 'C', True, aligned=True), ...)" (every sweep setting after the first; ffcv_cache.py).
    shared = numba.uint8[::1]
    before = hash(shared)

    @numba.njit
    def first(buf):
        return buf[0]

    first(np.zeros(4, np.uint8))
    assert first.signatures == [(shared,)]  # a key of its `overloads`, as a pipeline's buffers are
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    create_loader("ffcv", loader_args(tiny_beton))  # builds FFCV's reader; the pipeline compiles later
    assert shared.mutable and hash(shared) == before and numba.uint8[::1] is shared
    del first
    gc.collect()  # its finalizer: a changed hash found no key (in most runs: 1 in 8 hits the old slot)
    assert [f"{u.exc_type.__name__}: {u.exc_value}" for u in unraisable] == []


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


def test_train_end_to_end_past_corrupt_images(corrupt_beton, tiny_root, tmp_path, caplog):
    """The tester's case: a run over a .beton with damaged JPEGs names each and trains on. This
    .beton has no file list beside it (an older convert's): each is named by index and class."""
    path = tmp_path / "old.beton"
    shutil.copy(corrupt_beton[0], path)
    shutil.copy(corrupt_beton[0].with_name("corrupt.beton.json"), tmp_path / "old.beton.json")
    bad = corrupt_beton[1]
    out = tmp_path / "run"
    argv = ["train", "--loader", "ffcv", "--device", "cpu", "--data", str(path), "--preset", "cifar"]
    argv += [
        "--arch",
        "resnet18",
        "--dim",
        "16",
        "--moco-k",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--bn-splits",
        "2",
    ]
    argv += ["--workers", "1", "--out", str(out)]
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main(argv) == 0
    files = source_files(tiny_root)
    for i in bad:
        assert caplog.text.count(f"skipping unreadable image {i} of {path} (class {files[i].split('/')[0]}): ") == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == 1 and math.isfinite(rows[-1]["loss"])
    assert json.loads((out / "config.json").read_text())["data"]["loader"] == "ffcv"


# -- the crops and flips of FFCV's own pipeline (the colour pass is off) ------------------------------
@pytest.fixture(scope="module")
def coords_loader(tmp_path_factory):
    """40 coordinate images stored raw (no JPEG error in the coordinates), colour off: a second
    compiled pipeline, shared by the tests below."""
    root = tmp_path_factory.mktemp("coords")
    (root / "c").mkdir()
    for i in range(40):
        Image.fromarray(coordinate_image()).save(root / "c" / f"{i:03d}.png")
    beton = root / "coords.beton"
    convert(ConvertConfig(str(root), str(beton), format="ffcv", write_mode="raw", workers=1))
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


def test_a_missing_path_is_named_as_such(tmp_path):
    # "--data must be a .beton file, /nonexistent is not a file" for a path that is not there at all
    path = tmp_path / "gone.beton"
    with pytest.raises(DataError, match=f"--data {path} is not found \\(make one with `moco-fast convert"):
        create_loader("ffcv", loader_args(path))


@pytest.mark.parametrize("text", ['["cat", "dog"]', '"cat"', "7"])
def test_a_sidecar_that_is_no_json_object_is_ignored_in_one_line(text, tmp_path, caplog):
    # a user's file of that name: its class names are not read from it, and the run goes on (the
    # fingerprint check read it with meta.get, an AttributeError traceback for a JSON list)
    from moco_fast.loaders.ffcv import read_classes

    (tmp_path / "x.beton.json").write_text(text)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert read_classes(tmp_path / "x.beton", np.array([0, 1, 1]), "0f" * 16) == ["0", "1"]
    assert caplog.text.count("ignoring") == 1 and "x.beton.json" in caplog.text


def test_the_file_list_is_read_at_the_first_lookup_and_must_fit_the_beton(tmp_path, caplog):
    from moco_fast.loaders.ffcv import FileNames

    from moco_fast.convert_beton import write_names
    from moco_fast.convert_dst import names_path

    beton = tmp_path / "x.beton"
    names = ["cat/1.jpg", "cat/two\nlines.jpg", "dog/café.jpg", os.fsdecode(b"dog/caf\xe9.jpg")]
    ours = "0f" * 16  # the fingerprint of the .beton (beton_fingerprint), recorded in its list
    write_names(names_path(beton), [str(tmp_path / "src" / n) for n in names], tmp_path / "src", ours)
    files = FileNames(beton, 4, ours)
    assert files.starts is None  # nothing read until a name is asked for
    assert [files[i] for i in (3, 0, 2, 1)] == ["dog/caf\\xe9.jpg", "cat/1.jpg", "dog/café.jpg", "cat/two\\nlines.jpg"]
    names_path(beton).unlink()  # gone since: no name, no error
    assert files[0] is None
    assert FileNames(beton, 4, ours)[0] is None and caplog.text == ""  # none at all: said nowhere
    write_names(names_path(beton), [str(tmp_path / n) for n in names[:3]], tmp_path, ours)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        short = FileNames(beton, 4, ours)
        assert short[0] is None and short[1] is None
    assert caplog.text.count("names 3 files, the .beton holds 4 images") == 1
    # the list of another .beton (a convert stopped after publishing the new .beton): not used
    write_names(names_path(beton), [str(tmp_path / n) for n in names], tmp_path, "ee" * 16)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert FileNames(beton, 4, ours)[0] is None
    assert caplog.text.count("another .beton than x.beton") == 1 and "named by their index" in caplog.text
    # an older convert's list records no fingerprint: checked by its count alone
    lines = names_path(beton).read_bytes().split(b"\n", 1)
    names_path(beton).write_bytes(lines[0].partition(b"\t")[0] + b"\n" + lines[1])
    assert FileNames(beton, 4, ours)[0] == "cat/1.jpg"
    # a list whose line endings became CRLF (copied through Windows): the same names, no \r in them
    names_path(beton).write_bytes(names_path(beton).read_bytes().replace(b"\n", b"\r\n"))
    crlf = FileNames(beton, 4, ours)
    assert [crlf[i] for i in (0, 2)] == ["cat/1.jpg", "dog/café.jpg"]
    names_path(beton).write_text("cat/1.jpg\ncat/2.jpg\ncat/3.jpg\ncat/4.jpg\n")  # no header: not convert's
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert FileNames(beton, 3, ours)[0] is None
    assert "is not a file list that convert wrote" in caplog.text


def test_the_fingerprint_reads_the_tables_where_ffcv_puts_them():
    # convert_dst reads the .beton without FFCV: its record size must be FFCV's for convert's fields
    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import get_metadata_type

    from moco_fast.convert_dst import SAMPLE_RECORD_SIZE

    assert get_metadata_type([RGBImageField(), IntField()]).itemsize == SAMPLE_RECORD_SIZE
