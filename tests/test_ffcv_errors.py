"""The FFCV loader for real (no mock) on what goes wrong: bad options, data and fields of another
type are one-line errors, damaged JPEGs are named and replaced (also in an end-to-end `moco-fast
train`), an error in FFCV's loader thread or a .beton gone ends the epoch with it, Numba's shared
types are left alone, and the sidecars (file list, fingerprint) are read and checked.

FFCV's Numba pipeline compiles on first use (~20-40 s per Loader on this CPU), so these tests share
the session's loader (conftest.py's `loader`, also read by test_ffcv_batches.py); the end-to-end
`moco-fast train` run and the one-decode-per-view path pay one compile each (both read a copy with
damaged JPEGs).
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

import pytest

pytest.importorskip("ffcv")  # every test here needs FFCV: skipped where it is not installed

import numba
import numpy as np
import torch
from ffcv_helpers import beton_labels, epoch_indices, loader_args
from moco_fast.loaders import create_loader
from moco_fast.loaders.base import stream_seed

from moco_fast.cli import main
from moco_fast.config import ConfigError
from moco_fast.data import DataError

pytestmark = pytest.mark.slow


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


def test_options_are_checked(tiny_beton):
    with pytest.raises(ConfigError, match="unknown ffcv loader option"):
        create_loader("ffcv", loader_args(tiny_beton, options={"speed": "max"}))
    with pytest.raises(ConfigError, match="jitter_order"):
        create_loader("ffcv", loader_args(tiny_beton, options={"jitter_order": "never"}))
    with pytest.raises(ConfigError) as caught:  # the spellings a boolean takes: it said "expected a bool"
        create_loader("ffcv", loader_args(tiny_beton, options={"os_cache": "maybe"}))
    said = "ffcv loader option os_cache must be one of 1, true, yes (on) or 0, false, no (off), got 'maybe'"
    assert str(caught.value) == said


def test_bad_data_is_a_clear_error(tiny_beton, tmp_path):
    with pytest.raises(DataError, match="needs --data"):
        create_loader("ffcv", loader_args(None))
    with pytest.raises(DataError, match=r"reads a \.beton file, and --data .* is a folder"):
        create_loader("ffcv", loader_args(tmp_path))
    # convert's other output, a shard set, is named as one, with the loader that reads it
    (tmp_path / "meta.json").write_text('{"format": "wds", "classes": [], "num_images": 1, "shards": []}')
    with pytest.raises(DataError, match=f"--data {tmp_path} is a WebDataset shard set, which --loader dali reads"):
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
    # The default (torch) pass to the byte: FFCV's batch with the bad rows replaced (index_select
    # on N x 2 x S x S x 3, before the views are taken apart), then FFCVLoader's float views as it
    # made them before from_uint8 (permute, reshape, float, div_) into DeviceAugment, seeded by step.
    ld.set_epoch(1)
    got = list(ld)
    ld.set_epoch(1)  # the same epoch again, read raw (its buffers are reused: copied)
    raw = [[t.clone() for t in batch] for batch in ld.ffcv]
    replaced = 0
    for i, (b, batch) in enumerate(zip(got, raw, strict=True)):
        out = dict(zip(names, batch, strict=True))
        status = np.maximum(out["image_status"].numpy(), out["image2_status"].numpy())
        replaced += int(status[:, 0].any())
        u8 = torch.cat((out["image"], out["image2"]), dim=1).index_select(0, ld._replacements(status))
        n, _, s, _, _ = u8.shape
        views = u8.permute(1, 0, 4, 2, 3).reshape(2 * n, 3, s, s).float().div_(255.0)
        g = torch.Generator().manual_seed(stream_seed(ld.args.seed, len(ld) + i, ld.args.rank))
        q, k = ld.augment(views, g)
        assert torch.equal(b.im_q, q) and torch.equal(b.im_k, k)
        assert b.im_q.dtype == q.dtype and b.im_q.stride() == q.stride()
    assert replaced  # a batch with rows replaced was compared


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


def test_a_sidecar_that_is_a_named_pipe_is_refused_not_read(tiny_beton, tiny_root, tmp_path):
    # the loader's class names and convert --force's check read X.beton.json: a pipe without a writer
    # hung both in open(), where a .beton that is a pipe is refused (the timeout fails a hang)
    import subprocess

    beton = tmp_path / "x.beton"
    shutil.copyfile(tiny_beton, beton)
    os.mkfifo(tmp_path / "x.beton.json")
    said = f"{tmp_path / 'x.beton.json'}, the sidecar of x.beton, is not a regular file (a device, FIFO or socket)"
    train = ["train", "--loader", "ffcv", "--device", "cpu", "--data", str(beton), "--arch", "resnet18"]
    train += ["--batch-size", "8", "--bn-splits", "2", "--workers", "1", "--out", str(tmp_path / "run")]
    convert = ["convert", str(tiny_root), str(beton), "--format", "ffcv", "--force", "--workers", "1"]
    for argv in (train, convert):
        done = subprocess.run([sys.executable, "-m", "moco_fast", *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines()[-1] == f"moco-fast {argv[0]}: error: {said}: delete it"


def test_a_file_list_that_is_a_named_pipe_is_refused_at_the_start(tmp_path):
    # X.beton.files.txt, read to name a skipped image: a pipe without a writer hung that lookup in the
    # middle of a run, where convert refuses it and the sidecar's pipe is refused at the start
    from moco_fast.loaders.ffcv import FileNames

    os.mkfifo(tmp_path / "x.beton.files.txt")
    said = (
        f"{tmp_path / 'x.beton.files.txt'}, the file list of x.beton, is not a regular file (a device, FIFO or socket)"
    )
    with pytest.raises(DataError, match=re.escape(said + ": delete it")):
        FileNames(tmp_path / "x.beton", 4, "0f" * 16)


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


@pytest.mark.parametrize("decode", ["once", "twice"])
def test_decode_buffers_past_half_the_memory_are_named_in_a_warning(tiny_beton, monkeypatch, caplog, decode):
    # FFCV holds a buffer of the .beton's widest x tallest image for each image of batches_ahead + 2
    # batches: one large photo converted without --max-resolution (6000 x 4000 at batch 256: 86 GiB)
    # and the run was ended by the OOM killer without a word
    from moco_fast.loaders import ffcv as ffcv_loader

    monkeypatch.setattr(ffcv_loader.FFCVLoader, "_build", lambda self, path: None)  # no FFCV Loader needed
    decoders = 1 if decode == "once" else 2
    need = decoders * (2 + 2) * 8 * 32 * 32 * 3  # batches_ahead 2, batch 8, 32 x 32 CIFAR images
    for memory, warned in ((2 * need + 2, False), (2 * need - 2, True)):
        monkeypatch.setattr(ffcv_loader, "physical_memory", lambda memory=memory: memory)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moco_fast"):
            create_loader("ffcv", loader_args(tiny_beton, options={"decode": decode, "batches_ahead": "2"}))
        said = [r.getMessage() for r in caplog.records if "decode buffers" in r.getMessage()]
        assert len(said) == warned, said
    assert said[0].startswith(f"{tiny_beton}: FFCV's decode buffers take 0.0 GiB, more than half of this machine's")
    assert "batches_ahead + 2 = 4 batches of 8 has a buffer of the .beton's widest x tallest image, 32 x 32" in said[0]


def test_decode_buffers_of_the_machines_processes_count_together(tiny_beton, monkeypatch, caplog):
    # each of --gpus N's processes (torchrun's --nproc_per_node) holds its own buffers: 8 processes
    # under half the memory each filled it, and the warning weighed one process's alone
    from moco_fast.loaders import ffcv as ffcv_loader

    monkeypatch.setattr(ffcv_loader.FFCVLoader, "_build", lambda self, path: None)  # no FFCV Loader needed
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    each = (2 + 2) * 8 * 32 * 32 * 3  # decode once, batches_ahead 2, batch 8, 32 x 32 CIFAR images
    monkeypatch.setattr(ffcv_loader, "physical_memory", lambda: 4 * each)  # 2 each's under half
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        create_loader("ffcv", loader_args(tiny_beton, options={"decode": "once", "batches_ahead": "2"}))
    said = [r.getMessage() for r in caplog.records if "decode buffers" in r.getMessage()]
    assert len(said) == 1 and "decode buffers take 0.0 GiB (8 processes, 0.0 GiB each), more than half" in said[0]
