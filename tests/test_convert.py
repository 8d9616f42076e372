"""`moco-fast convert`: bad files named and skipped, .beton and WebDataset outputs that read back right,
no overwrite without --force, no half-written output under the final name."""

import errno
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moco_fast import convert_wds
from moco_fast.cli import main
from moco_fast.convert import ConvertConfig, convert
from moco_fast.convert_dst import NAMES_FINGERPRINT, NAMES_HEADER, beton_fingerprint, beton_samples, check_destination
from moco_fast.data import DataError

BAD = {"trunc.jpg": "cannot decode", "broken.jpg": "not a readable image", "notes.txt": "not an image"}


@pytest.fixture
def bad_root(fresh_root: Path) -> Path:
    """fresh_root's train/ (2 classes x 8) plus a truncated JPEG, a broken one, a text file, and a
    CMYK JPEG and a grayscale PNG of odd sizes (these two must land, as RGB)."""
    first = sorted((fresh_root / "train").iterdir())[0]
    good = sorted(first.iterdir())[0].read_bytes()
    (first / "trunc.jpg").write_bytes(good[: int(len(good) * 0.9)])  # header fine, decode fails
    (first / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (first / "notes.txt").write_text("not an image")
    yy, xx = np.mgrid[0:24, 0:40]
    smooth = np.stack([xx * 6, yy * 10, 255 - xx * 6], axis=-1).astype(np.uint8)  # 24 x 40, JPEG-friendly
    Image.fromarray(smooth).convert("CMYK").save(first / "cmyk.jpg", quality=95)
    Image.fromarray(smooth[..., 0].T.copy(), "L").save(first / "gray.png")
    return fresh_root


def expected(root: Path) -> tuple[list[str], list[int], list[tuple[int, int]]]:
    """The good files of train/ in sorted order, their labels and (width, height)."""
    classes = sorted(p.name for p in (root / "train").iterdir())
    files, labels, sizes = [], [], []
    for i, c in enumerate(classes):
        for f in sorted((root / "train" / c).iterdir()):
            if f.name not in BAD:
                files.append(str(f))
                labels.append(i)
                sizes.append(Image.open(f).size)
    return files, labels, sizes


def assert_bad_named(summary):
    named = {Path(p).name: r for p, r in summary.skipped}
    assert set(named) == set(BAD)
    for name, reason in BAD.items():
        assert reason in named[name]


def beton_images(path: Path):
    """(labels, sizes, jpeg bytes) straight from the .beton's tables, without FFCV's JIT."""
    from ffcv.reader import Reader

    r = Reader(str(path))
    img, lab = r.metadata["f0"], r.metadata["f1"]
    sizes = {int(p): int(s) for p, s in zip(r.alloc_table["ptr"], r.alloc_table["size"])}
    raw = path.read_bytes()
    blobs = [raw[int(p) : int(p) + sizes[int(p)]] for p in img["data_ptr"]]
    return lab.tolist(), list(zip(img["width"].tolist(), img["height"].tolist())), blobs


def no_partials(folder: Path):
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name] == []


@pytest.mark.slow  # imports FFCV (~5-15 s here) and runs its writer processes
def test_beton_round_trip_and_bad_files(bad_root, tmp_path):
    dst = tmp_path / "out" / "train.beton"
    summary = convert(ConvertConfig(str(bad_root), str(dst), format="ffcv", workers=2))
    files, labels, sizes = expected(bad_root)
    assert summary.written == len(files) == 18
    assert_bad_named(summary)
    got_labels, got_sizes, blobs = beton_images(dst)
    assert got_labels == labels
    assert got_sizes == sizes  # CMYK 40x24 and gray 24x40 kept their sizes
    for f, blob in zip(files, blobs):
        src = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)
        back = np.asarray(Image.open(io.BytesIO(blob)), dtype=np.float32)
        assert back.shape == src.shape and np.abs(back - src).mean() < 8  # JPEG at quality 90
    side = json.loads((dst.parent / "train.beton.json").read_text())
    assert side["classes"] == sorted(p.name for p in (bad_root / "train").iterdir())
    assert side["num_images"] == 18 and len(side["skipped"]) == 3
    # the source file of each image, in .beton order, for the loader to name one it skips
    header, *names = (dst.parent / "train.beton.files.txt").read_text().splitlines()
    assert header == NAMES_HEADER + str(bad_root / "train") + NAMES_FINGERPRINT + beton_fingerprint(dst)
    assert side["beton_fingerprint"] == beton_fingerprint(dst)  # both name this .beton
    assert names == [os.path.relpath(f, bad_root / "train") for f in files]
    assert no_partials(dst.parent)
    assert "skipped 3" in summary.text() and "trunc.jpg" in summary.text()


@pytest.mark.slow
def test_max_resolution_shrinks(bad_root, tmp_path):
    dst = tmp_path / "small.beton"
    convert(ConvertConfig(str(bad_root), str(dst), max_resolution=16, workers=1))
    _, sizes, _ = beton_images(dst)
    assert max(max(s) for s in sizes) == 16
    assert (16, 10) in sizes  # the 40x24 CMYK image, aspect kept


def test_wds_shards_meta_and_index_agree(bad_root, tmp_path):
    dst = tmp_path / "wds"
    summary = convert(ConvertConfig(str(bad_root), str(dst), format="wds", shard_size=7, workers=2))
    assert_bad_named(summary)
    _, labels, _ = expected(bad_root)
    meta = json.loads((dst / "meta.json").read_text())
    assert meta["format"] == "wds" and meta["num_images"] == 18
    assert meta["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert meta["shard_sizes"] == [7, 7, 4]
    keys, got_labels = [], []
    for shard in meta["shards"]:
        tar = dst / shard
        idx = tar.with_suffix(".idx").read_text().splitlines()
        head, lines = idx[0].split(), idx[1:]
        assert head == ["v1.2", str(len(lines))]
        raw = tar.read_bytes()
        members = {m.name: m for m in tarfile.open(tar) if m.isreg()}
        for line in lines:
            parts = line.split()
            assert [parts[0], parts[4]] == ["jpg", "cls"]
            for ext, off, size, name in (parts[0:4], parts[4:8]):
                assert name.endswith("." + ext) and members[name].offset_data == int(off)
                assert members[name].size == int(size)
            jpg = raw[int(parts[1]) : int(parts[1]) + int(parts[2])]
            assert Image.open(io.BytesIO(jpg)).mode == "RGB"
            got_labels.append(int(raw[int(parts[5]) : int(parts[5]) + int(parts[6])].decode("ascii")))
            keys.append(parts[3].split(".")[0])
    assert keys == [f"{i:08d}" for i in range(18)]
    assert sorted(got_labels) == sorted(labels)  # shuffled order, same labels
    assert got_labels != labels


def test_wds_index_is_what_dali_writes(bad_root, tmp_path):
    wds2idx = pytest.importorskip("wds2idx", reason="DALI's wds2idx tool is not installed")
    dst = tmp_path / "wds"
    convert(ConvertConfig(str(bad_root), str(dst), format="wds", shard_size=10, workers=1))
    for tar in sorted(dst.glob("*.tar")):
        ref = tmp_path / (tar.stem + ".ref.idx")
        with wds2idx.IndexCreator(str(tar), str(ref), verbose=False) as ic:
            ic.create_index()
        assert tar.with_suffix(".idx").read_text() == ref.read_text()


def test_wds_meta_reads_with_the_loader_contract(bad_root, tmp_path):
    from moco_fast.loaders import wds  # the project's own module: a failure to import is a failure

    dst = tmp_path / "wds"
    convert(ConvertConfig(str(bad_root), str(dst), format="wds", shard_size=10, workers=1))
    meta = wds.read_meta(dst)
    assert meta.num_images == 18 and len(meta.shards) == 2


@pytest.mark.slow
def test_an_earlier_beton_is_replaced_only_with_force(bad_root, tmp_path, capsys):
    dst = tmp_path / "x.beton"
    side = tmp_path / "x.beton.json"
    assert main(["convert", str(bad_root), str(dst), "--workers", "1"]) == 0
    capsys.readouterr()
    before = dst.read_bytes()
    assert beton_samples(dst) == 18
    (tmp_path / "cut.beton").write_bytes(before[:-8])
    assert beton_samples(tmp_path / "cut.beton") == "it is an FFCV file cut short or damaged"
    (tmp_path / "cut.beton").unlink()
    assert main(["convert", str(bad_root), str(dst), "--workers", "1"]) == 2
    assert "exists: pass --force" in capsys.readouterr().err
    assert dst.read_bytes() == before
    # a .beton is convert's only with convert's sidecar describing it (ffcv-imagenet's has the same fields)
    meta = json.loads(side.read_text())
    for changed in (None, {**meta, "num_images": 5}, {**meta, "format": "wds"}):
        side.unlink(missing_ok=True)
        if changed is not None:
            side.write_text(json.dumps(changed))
        assert main(["convert", str(bad_root), str(dst), "--workers", "1", "--force"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"DST {dst} exists and is a .beton without the x.beton.json" in err[0], err
        assert dst.read_bytes() == before
    side.write_text(json.dumps(meta))
    assert main(["convert", str(bad_root), str(dst), "--workers", "1", "--force", "--jpeg-quality", "50"]) == 0
    assert "wrote 18 images" in capsys.readouterr().out
    assert beton_images(dst)[0] == expected(bad_root)[1]
    assert json.loads(side.read_text())["jpeg_quality"] == 50  # the sidecar went with it
    assert no_partials(tmp_path)
    # the sidecar of a .beton since deleted: an earlier output, replaced with --force only
    dst.unlink()
    with pytest.raises(FileExistsError, match="the sidecar of DST"):
        check_destination(bad_root, dst, "ffcv", force=False)
    check_destination(bad_root, dst, "ffcv", force=True)
    side.unlink()  # and the file list of one, alone
    with pytest.raises(FileExistsError, match="the file list of DST"):
        check_destination(bad_root, dst, "ffcv", force=False)
    check_destination(bad_root, dst, "ffcv", force=True)


def fake_beton(path: Path, samples: int, seed: int) -> None:
    """A file laid out as FFCV writes convert's fields (header, field descriptions, one record an
    image, the images' bytes, the allocation table), its tables drawn from `seed`: no FFCV needed."""
    from moco_fast.convert_dst import (
        ALLOC_ENTRY_SIZE,
        BETON_HEADER,
        CONVERT_FIELDS,
        FIELD_DESC_SIZE,
        SAMPLE_RECORD_SIZE,
    )

    rng = np.random.default_rng(seed)
    fields = b"".join(bytes([t]) + name.ljust(16, b"\0") + bytes(FIELD_DESC_SIZE - 17) for t, name in CONVERT_FIELDS)
    records = rng.bytes(samples * SAMPLE_RECORD_SIZE) + rng.bytes(4096)  # then the images' bytes
    alloc_table = BETON_HEADER.size + len(fields) + len(records)
    header = BETON_HEADER.pack(2, len(CONVERT_FIELDS), 1 << 21, samples, alloc_table)
    path.write_bytes(header + fields + records + rng.bytes(samples * ALLOC_ENTRY_SIZE))


def test_force_replaces_a_beton_beside_a_stale_sidecar_only_where_a_killed_convert_left_it(tmp_path):
    # A --force convert killed after renaming its .beton into place, before its sidecar, leaves the
    # old sidecar (another fingerprint) and no file list (removed first): --force remakes that set.
    # A file list still there says the .beton came from elsewhere (another tool's written over
    # convert's, of as many images): not replaced, as without a sidecar.
    from moco_fast.config import ConfigError
    from moco_fast.convert_beton import write_names
    from moco_fast.convert_dst import names_path, sidecar_path

    src, dst = tmp_path / "src", tmp_path / "x.beton"
    src.mkdir()
    fake_beton(dst, 5, seed=0)
    ours = beton_fingerprint(dst)
    assert ours is not None and beton_samples(dst) == 5
    meta = {"format": "ffcv", "classes": ["a", "b"], "num_images": 5, "beton_fingerprint": ours}
    sidecar_path(dst).write_text(json.dumps(meta))
    write_names(names_path(dst), [str(src / f"a/{i}.jpg") for i in range(5)], src, ours)
    check_destination(src, dst, "ffcv", force=True)  # the set as convert left it
    fake_beton(dst, 5, seed=1)  # another .beton in its place, the sidecar and list left beside it
    assert beton_fingerprint(dst) != ours
    with pytest.raises(ConfigError, match=re.escape(f"DST {dst} exists and is a .beton that x.beton.json and")):
        check_destination(src, dst, "ffcv", force=True)
    names_path(dst).unlink()  # as a convert killed between its .beton and its sidecar leaves it
    check_destination(src, dst, "ffcv", force=True)


@pytest.mark.slow
@pytest.mark.parametrize("published", [1, 2])
def test_a_convert_killed_between_publishing_its_files_leaves_a_set_its_readers_check(
    published, bad_root, tmp_path, monkeypatch, caplog
):
    # --force over an earlier .beton of as many images (the count alone cannot tell them apart),
    # killed after `published` of its files (the .beton; then its sidecar) were in place
    from moco_fast.loaders.ffcv import FileNames, read_classes

    from moco_fast import convert as convert_module

    dst = tmp_path / "x.beton"
    convert(ConvertConfig(str(bad_root), str(dst), jpeg_quality=50, workers=1))
    old_side = (tmp_path / "x.beton.json").read_text()
    real, calls = convert_module.publish, []

    def killed(tmp, final, force):
        if len(calls) == published:
            raise KeyboardInterrupt
        calls.append(final)
        real(tmp, final, force)

    monkeypatch.setattr(convert_module, "publish", killed)
    with pytest.raises(KeyboardInterrupt):
        convert(ConvertConfig(str(bad_root), str(dst), workers=1, force=True))
    monkeypatch.setattr(convert_module, "publish", real)
    assert no_partials(tmp_path) and beton_samples(dst) == 18
    labels, fingerprint = np.array(expected(bad_root)[1]), beton_fingerprint(dst)
    side_is_old = (tmp_path / "x.beton.json").read_text() == old_side
    assert side_is_old == (published == 1)
    caplog.clear()
    with caplog.at_level("WARNING", logger="moco_fast"):
        classes = read_classes(dst, labels, fingerprint)
        assert FileNames(dst, 18, fingerprint)[0] is None  # the old list went first, the new one never came
    if side_is_old:  # said in one line, and not taken for the new .beton's
        assert classes == ["0", "1"] and caplog.text.count("another .beton than x.beton") == 1
        assert "run `moco-fast convert` to" in caplog.text
    else:
        assert classes == sorted(p.name for p in (bad_root / "train").iterdir()) and caplog.text == ""
    # and --force remakes the set (a stale sidecar is convert's, whatever count it records)
    if side_is_old:
        (tmp_path / "x.beton.json").write_text(json.dumps({**json.loads(old_side), "num_images": 7}))
    convert(ConvertConfig(str(bad_root), str(dst), workers=1, force=True))
    assert json.loads((tmp_path / "x.beton.json").read_text())["beton_fingerprint"] == beton_fingerprint(dst)


def test_force_replaces_an_earlier_shard_set_only(bad_root, tmp_path, capsys):
    dst = tmp_path / "wds"
    convert(ConvertConfig(str(bad_root), str(dst), format="wds", shard_size=100, workers=1))
    convert(ConvertConfig(str(bad_root), str(dst), format="wds", shard_size=5, workers=1, force=True))
    assert len(list(dst.glob("*.tar"))) == 4 and len(list(dst.glob("*.idx"))) == 4
    assert no_partials(tmp_path)
    # a file put into the set since is no part of it: the folder is not replaced
    (dst / "notes.txt").write_text("mine")
    shards = sorted(p.name for p in dst.iterdir())
    capsys.readouterr()
    assert main(["convert", str(bad_root), str(dst), "--format", "wds", "--force", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"DST {dst} exists and holds files that are not its shard set's (notes.txt)" in err[0]
    assert sorted(p.name for p in dst.iterdir()) == shards and (dst / "notes.txt").read_text() == "mine"
    # an earlier set beside train/ in SRC (`convert data data/shards`) is replaced as anywhere else
    inside = bad_root / "shards"
    convert(ConvertConfig(str(bad_root), str(inside), format="wds", shard_size=100, workers=1))
    assert main(["convert", str(bad_root), str(inside), "--format", "wds", "--force", "--shard-size", "5"]) == 0
    assert len(list(inside.glob("*.tar"))) == 4


def test_failure_leaves_no_partial_output(bad_root, tmp_path, monkeypatch):
    dst = tmp_path / "wds"
    convert(ConvertConfig(str(bad_root), str(dst), format="wds", workers=1))
    before = (dst / "meta.json").read_text()
    calls = []

    def dying(job):
        calls.append(job)
        if len(calls) > 5:
            raise RuntimeError("disk on fire")
        return b"\xff\xd8fake"

    monkeypatch.setattr(convert_wds, "encode_task", dying)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(ConvertConfig(str(bad_root), str(dst), format="wds", workers=1, force=True))
    assert (dst / "meta.json").read_text() == before  # the old output is intact
    assert no_partials(tmp_path)


def test_nothing_convertible_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    (src / "a.jpg").write_bytes(b"garbage")
    (src / "b.txt").write_text("text")
    with pytest.raises(DataError, match="no readable images"):
        convert(ConvertConfig(str(tmp_path / "src"), str(tmp_path / "out.beton"), workers=1))
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "o"), "--format", "wds"]) == 2
    assert "no readable images" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_val_split_keeps_train_labels(bad_root, tmp_path):
    real = sorted(p.name for p in (bad_root / "train").iterdir())
    # a hidden and an empty folder in train/ are no classes (the empty one would sort first)
    (bad_root / "train" / ".ipynb_checkpoints").mkdir()
    (bad_root / "train" / "0_empty").mkdir()
    dst = tmp_path / "val"
    summary = convert(ConvertConfig(str(bad_root), str(dst), format="wds", split="test", workers=1))
    meta = json.loads((dst / "meta.json").read_text())
    assert summary.written == 8 and meta["classes"] == real
    with pytest.raises(DataError, match="--split val"):
        convert(ConvertConfig(str(bad_root), str(tmp_path / "v2"), format="wds", split="val", workers=1))


@pytest.mark.parametrize(
    ("mode", "values", "full"),
    [("I;16", np.uint16, 65535), ("I", np.int32, 65535), ("F", np.float32, 1.0), ("L", np.uint8, 255)],
)
def test_high_depth_grayscale_is_scaled_not_clipped(tmp_path, mode, values, full):
    # A 16-bit PNG gradient: PIL's own convert("RGB") clips it to almost all white.
    from moco_fast.convert_images import load_resized
    from moco_fast.data import load_rgb

    ramp = np.linspace(0, full, 64 * 64, dtype=np.float64).reshape(64, 64).astype(values)
    im = Image.fromarray(ramp) if mode != "I;16" else Image.frombytes("I;16", (64, 64), ramp.astype("<u2").tobytes())
    assert im.mode == mode
    path = tmp_path / ("g.png" if mode in ("I;16", "L") else "g.tiff")
    im.save(path)
    expect = np.rint(ramp.astype(np.float64) / full * 255)
    for rgb in (load_rgb(str(path)), load_resized(str(path), None)):
        a = np.asarray(rgb).astype(np.float64)
        assert rgb.mode == "RGB" and a.shape == (64, 64, 3)
        assert np.abs(a[..., 0] - expect).max() <= 1, (mode, a.min(), a.max())


def test_force_never_deletes_the_source_or_an_unrelated_folder(bad_root, tmp_path, capsys):
    # DST as SRC, or a folder above it: --force replaced the folder, images and all
    images = sorted(p.relative_to(bad_root) for p in bad_root.rglob("*"))
    for dst in (bad_root, bad_root.parent, bad_root / "train"):
        src = bad_root / "train" if dst == bad_root / "train" else bad_root
        for fmt in ("wds", "ffcv"):
            assert main(["convert", str(src), str(dst), "--format", fmt, "--force", "--workers", "1"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "holds the images it would replace" in err[0], err
    assert sorted(p.relative_to(bad_root) for p in bad_root.rglob("*")) == images
    # a folder that is no earlier output: named, and left as it was
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    assert main(["convert", str(bad_root), str(docs), "--format", "wds", "--force"]) == 2
    assert "not a shard set written by convert" in capsys.readouterr().err
    assert main(["convert", str(bad_root), str(docs), "--format", "ffcv", "--force"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert (docs / "thesis.txt").read_text() == "years of work"


@pytest.mark.parametrize(
    ("fmt", "dst", "why"),
    [
        ("ffcv", "notes.txt", "exists and is not a .beton that convert wrote (it has no FFCV header)"),
        ("ffcv", "data/train/{cls}/keep.jpg", "is inside SRC"),  # a source image
        ("wds", "data/train/{cls}/keep.jpg", "is inside SRC"),
        ("wds", "data/train/{cls}", "is inside SRC"),  # a class folder
        ("wds", "notes.txt", "is a file: give a folder path"),
        ("ffcv", "x.jpg", "exists and is not a .beton that convert wrote (it has no FFCV header)"),
    ],
)
def test_force_never_replaces_what_is_no_earlier_output(bad_root, tmp_path, monkeypatch, capsys, fmt, dst, why):
    # --force replaced any file at DST: notes.txt became a 16 MB .beton, a source image too
    import moco_fast.convert as conv

    cls = sorted((bad_root / "train").iterdir())[0]
    image = sorted(cls.glob("*.jpg"))[0].read_bytes()
    (cls / "keep.jpg").write_bytes(image)
    (tmp_path / "notes.txt").write_text("notes")
    (tmp_path / "x.jpg").write_bytes(image)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr(conv, "list_images", lambda *a, **k: pytest.fail("images read before the check"))
    path = tmp_path / dst.format(cls=cls.name)
    assert main(["convert", str(bad_root), str(path), "--format", fmt, "--force", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"DST {path} {why}" in err[0], err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # no sidecar either


@pytest.mark.parametrize(
    "name, what, text",
    [
        ("x.beton.json", "DST's sidecar {} exists and is not a class list", '{"my": "notes"}'),
        ("x.beton.files.txt", "DST's file list {} exists and is not a file list", "a.jpg\nb.jpg\n"),
    ],
)
def test_a_sidecar_that_convert_did_not_write_is_never_replaced(
    name, what, text, bad_root, tmp_path, monkeypatch, capsys
):
    # the .beton's sidecar was published with force=True: a user's X.beton.json went, even without --force
    import moco_fast.convert as conv

    monkeypatch.setattr(conv, "list_images", lambda *a, **k: pytest.fail("images read before the check"))
    side = tmp_path / name
    side.write_text(text)
    for force in ([], ["--force"]):
        assert main(["convert", str(bad_root), str(tmp_path / "x.beton"), "--workers", "1", *force]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what.format(side) in err[0], err
        left = sorted(p.name for p in tmp_path.iterdir())
        assert side.read_text() == text and left == ["data", side.name]  # and no x.beton


def test_output_checks_come_before_any_image_is_read(bad_root, tmp_path, monkeypatch, capsys):
    import moco_fast.convert as conv

    monkeypatch.setattr(conv, "list_images", lambda *a, **k: pytest.fail("images read before the check"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root writes anywhere: a file as the parent folder fails the same check
            ro = tmp_path / "file"
            ro.write_text("")
        assert main(["convert", str(bad_root), str(ro / "x.beton")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "DST" in err[0], err
    finally:
        (tmp_path / "ro").chmod(0o755)
    # a file as SRC is named as SRC (convert has no --data)
    (tmp_path / "src.txt").write_text("")
    assert main(["convert", str(tmp_path / "src.txt"), str(tmp_path / "y.beton")]) == 2
    assert "SRC must be a folder of images" in capsys.readouterr().err


def test_temporaries_of_a_killed_convert_are_removed(bad_root, tmp_path):
    dst = tmp_path / "wds"
    dead = _dead_pid()
    host = socket.gethostname()
    stale = tmp_path / f".wds.partial-{host}-{dead}"
    stale.mkdir()
    (stale / "shard-000000.tar").write_bytes(b"half")
    live = tmp_path / f".wds.partial-{host}-{os.getppid()}"  # a convert still running: not touched
    live.write_text("busy")
    convert(ConvertConfig(str(bad_root), str(dst), format="wds", workers=1))
    assert not stale.exists() and live.exists()
    # the old output of a convert killed after it published the new one: removed
    aside = tmp_path / f".wds.old-{host}-{dead}"
    aside.mkdir()
    convert(ConvertConfig(str(bad_root), str(dst), format="wds", workers=1, force=True))
    assert not aside.exists()


def test_the_beton_sidecars_of_a_killed_convert_are_removed(tmp_path):
    from moco_fast.convert_files import tidy_after_a_stopped_convert

    owner = f"{socket.gethostname()}-{_dead_pid()}"
    left = [tmp_path / f".x.beton{side}.partial-{owner}" for side in ("", ".json", ".files.txt")]
    for p in left:
        p.write_text("half")
    tidy_after_a_stopped_convert(tmp_path / "x.beton")
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_test_split_beside_a_val_split(bad_root, tmp_path):
    shutil.copytree(bad_root / "test", bad_root / "val")
    for f in (bad_root / "val").rglob("*.jpg"):
        f.unlink()  # val/ empty of images: --split test must read test/, not val/
    summary = convert(ConvertConfig(str(bad_root), str(tmp_path / "t"), format="wds", split="test", workers=1))
    assert summary.written == 8


KILLED_WORKER = """
import os, signal, sys
from moco_fast import convert_beton as conv
real = conv.BetonSource.__getitem__
def dies(self, i):
    if os.getpid() != self.parent and i == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does
    return real(self, i)
conv.BetonSource.__getitem__ = dies
sys.exit(conv.__name__ and __import__("moco_fast.cli").cli.main(sys.argv[1:]))
"""


KILLED_LATE = """
import os, signal, sys, time
import ffcv.writer as fw
real = fw.worker_job_indexed_dataset
def dies_late(input_queue, metadata_sm, metadata_type, fields, allocator, done_number, allocations_queue, *rest):
    class Late:
        def put(self, content):  # the samples are counted: the parent now waits in allocations_queue.get()
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
    args = (input_queue, metadata_sm, metadata_type, fields, allocator, done_number, Late(), *rest)
    return real(*args)
fw.worker_job_indexed_dataset = dies_late
sys.exit(__import__("moco_fast.cli").cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("script", [KILLED_WORKER, KILLED_LATE], ids=["while-writing", "after-the-last-sample"])
def test_a_writer_worker_that_dies_ends_the_convert_instead_of_hanging(script, bad_root, tmp_path):
    # FFCV's writer polls a counter of written samples until it reaches the total: a worker killed
    # mid-way left it waiting forever. The convert must end with one line naming the worker.
    dst = tmp_path / "out" / "x.beton"
    argv = ["convert", str(bad_root), str(dst), "--workers", "2"]
    p = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, p.stderr[-2000:]
    err = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and "writer worker (pid" in err[0] and "signal SIGKILL" in err[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "leaked shared_memory" not in p.stderr
    assert sorted(f.name for f in dst.parent.iterdir()) == []  # no output, no temporary


SIGUSR1_FROM_OUTSIDE = """
import os, signal, sys, time
from moco_fast import convert_beton as conv
real = conv.BetonSource.__getitem__
def signals(self, i):
    if os.getpid() != self.parent and i == 3:
        if sys.argv[1] == "group":
            os.killpg(0, signal.SIGUSR1)  # as SLURM's --signal: the writer workers get it too
        else:
            os.kill(self.parent, signal.SIGUSR1)
        time.sleep(5)
    return real(self, i)
conv.BetonSource.__getitem__ = signals
sys.exit(__import__("moco_fast.cli").cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("to", ["parent", "group"])
def test_a_sigusr1_from_outside_ends_an_ffcv_convert_as_sigterm_does(to, bad_root, tmp_path):
    # The writer's watch wakes the main thread with SIGUSR1 when a worker dies (see the test above); a
    # SIGUSR1 from outside (SLURM's warning before a time limit) is not a worker's death: it ends the
    # convert as SIGTERM does, not as an error ("moco-fast convert: error: stopped by SIGUSR1", exit 2)
    import signal

    dst = tmp_path / "out" / "x.beton"
    argv = [to, "convert", str(bad_root), str(dst), "--workers", "2"]
    p = subprocess.run(
        [sys.executable, "-c", SIGUSR1_FROM_OUTSIDE, *argv],
        capture_output=True,
        text=True,
        timeout=180,
        start_new_session=True,  # its own process group
    )
    assert p.returncode == 128 + signal.SIGUSR1, p.stderr[-2000:]
    said = [line for line in p.stderr.splitlines() if "SIGUSR1" in line]
    assert len(said) == 1 and said[0].endswith("stopped by SIGUSR1"), p.stderr[-2000:]  # after FFCV's bar
    assert "Traceback" not in p.stderr and "leaked shared_memory" not in p.stderr
    assert sorted(f.name for f in dst.parent.iterdir()) == []  # no output, no temporary


def test_an_output_moved_aside_by_a_killed_convert_is_put_back(bad_root, tmp_path):
    # killed between moving the old output aside and publishing the new one: the old one is the only
    # copy there is, and the next convert puts it back rather than deleting it
    dst = tmp_path / "out" / "wds"
    convert(ConvertConfig(str(bad_root), str(dst), format="wds", workers=1))
    before = (dst / "meta.json").read_text()
    aside = dst.with_name(f".wds.old-{socket.gethostname()}-{_dead_pid()}")
    dst.rename(aside)
    other_host = dst.with_name(f".wds.partial-elsewhere-{_dead_pid()}")  # maybe running there: kept
    other_host.mkdir()
    with pytest.raises(FileExistsError):  # put back: an existing DST again
        convert(ConvertConfig(str(bad_root), str(dst), format="wds", workers=1))
    assert (dst / "meta.json").read_text() == before and not aside.exists() and other_host.exists()


FILE_SIZE_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # `ulimit -f 4`: writes past it fail with EFBIG
sys.exit(__import__("moco_fast.cli").cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_a_write_the_disk_refuses_is_one_line_naming_the_output(fmt, bad_root, tmp_path):
    # A full disk or a file-size limit met while the output was written: wds said only "No space left
    # on device" (no path) and warned of an unclosed shard; FFCV's writer worker printed its traceback
    # and the convert blamed memory ("out of memory? try fewer --workers").
    dst = tmp_path / "out" / f"x.{fmt}"
    argv = ["convert", str(bad_root), str(dst), "--format", fmt, "--workers", "2", "--shard-size", "4"]
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    p = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, *argv], capture_output=True, text=True, timeout=180, env=env
    )
    assert p.returncode == 2, p.stderr[-2000:]
    err = [line for line in p.stderr.splitlines() if "error:" in line]
    # (FFCV's progress bar may end without a newline before the error)
    assert len(err) == 1 and err[0].endswith(f"moco-fast convert: error: File too large: {dst}"), p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "ResourceWarning" not in p.stderr, p.stderr[-2000:]
    assert sorted(f.name for f in dst.parent.iterdir()) == []  # no output, no temporary


def test_an_error_without_a_path_is_not_blamed_on_dst(bad_root, tmp_path, monkeypatch, capsys):
    # An OSError without a path was reported as DST's whatever raised it. A container whose /dev/shm
    # may not be written refuses the semaphores of the worker pool (sem_open: EACCES, no path) before
    # any output is written: that was "Permission denied: DST", for a DST that can be written.
    import multiprocessing.synchronize

    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(multiprocessing.synchronize.SemLock, "__init__", refused)
    dst = tmp_path / "out"
    assert main(["convert", str(bad_root), str(dst), "--format", "wds", "--workers", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and err[0].endswith("moco-fast convert: error: Permission denied"), err
    assert not dst.exists() and no_partials(tmp_path)


def test_an_io_error_without_a_path_is_one_line_naming_src_and_dst(bad_root, tmp_path, monkeypatch, capsys):
    # EIO (a failing disk, a network file system gone) without a path was a bug's traceback. A write of
    # the output's names DST; elsewhere the line names what convert reads and writes.
    from moco_fast import convert as convert_module

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    dst = tmp_path / "out"
    monkeypatch.setattr(convert_wds.ShardWriter, "add", failing)  # a write to an open shard
    assert main(["convert", str(bad_root), str(dst), "--format", "wds", "--workers", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert err == [
        f"moco-fast convert: error: Input/output error: {dst} (the disk or the network file system failed to read or write it)"
    ]
    monkeypatch.setattr(convert_module, "source_images", failing)  # a read of SRC's
    assert main(["convert", str(bad_root), str(dst), "--format", "wds", "--workers", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert err == [
        "moco-fast convert: error: Input/output error (the disk or the network file system failed; "
        f"the command reads and writes SRC {bad_root} and DST {dst})"
    ]
    assert not dst.exists() and no_partials(tmp_path)


FAULTY_WORKER = """
import errno, os, sys
from ffcv.memory_allocator import MemoryAllocator
from moco_fast import convert_beton as conv
CODE = getattr(errno, sys.argv.pop(1))
WHERE = sys.argv.pop(1)

class Refusing:  # the .beton as a writer worker holds it open: each page write fails
    def __init__(self, fp):
        self.fp = fp
    def seek(self, *args):
        return self.fp.seek(*args)
    def write(self, data):
        raise OSError(CODE, os.strerror(CODE))
    def close(self):
        self.fp.close()

if WHERE == "page":
    enter = MemoryAllocator.__enter__
    def refusing(self):
        enter(self)
        self.fp = Refusing(self.fp)
    MemoryAllocator.__enter__ = refusing
else:  # another call of the worker fails without a path (a warning printed to a stderr on a full disk)
    get = conv.BetonSource.__getitem__
    def failing(self, i):
        if os.getpid() != self.parent:
            raise OSError(CODE, os.strerror(CODE))
        return get(self, i)
    conv.BetonSource.__getitem__ = failing
sys.exit(__import__("moco_fast.cli").cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("code, where", [("ENOSPC", "page"), ("EIO", "page"), ("ENOSPC", "sample")])
def test_a_writer_workers_error_is_dsts_only_when_the_disk_refused_its_page(code, where, bad_root, tmp_path):
    # The workers' wrapper recorded every errno as a write of the output's: an EIO came back as an
    # OSError naming the temporary .beton (removed by then), and a full disk met by anything else in
    # a worker as "No space left on device: DST". Only what the disk refused a page is DST's now.
    dst = tmp_path / "out" / "x.beton"
    argv = [code, where, "convert", str(bad_root), str(dst), "--workers", "2"]
    p = subprocess.run([sys.executable, "-c", FAULTY_WORKER, *argv], capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, p.stderr[-2000:]
    err = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and ".partial-" not in err[0], p.stderr[-2000:]
    if (code, where) == ("ENOSPC", "page"):
        assert err[0].endswith(f"moco-fast convert: error: No space left on device: {dst}"), err
        assert "Traceback" not in p.stderr
    else:  # the worker printed its own error, and the convert names the worker
        assert "writer worker (pid" in err[0] and "exit status 1 (its error is printed above)" in err[0], err
        assert f"OSError: [Errno {getattr(errno, code)}]" in p.stderr and str(dst) not in err[0]
    assert sorted(f.name for f in dst.parent.iterdir()) == []  # no output, no temporary
