"""`moco-fast convert` and an earlier output: nothing is overwritten without --force, and --force
replaces only what convert wrote (never the source, an unrelated folder or a sidecar of another's),
checked before any image is read; a convert killed while publishing leaves a set its readers check."""

import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import beton_images, expected, fake_beton, no_partials

from moco_fast.cli import main
from moco_fast.convert import ConvertConfig, convert
from moco_fast.convert_dst import beton_fingerprint, beton_samples, check_destination


@pytest.mark.slow
def test_an_earlier_beton_is_replaced_only_with_force(bad_root, tmp_path, capsys):
    dst = tmp_path / "x.beton"
    side = tmp_path / "x.beton.json"
    assert main(["convert", str(bad_root), str(dst), "--workers", "1"]) == 0
    assert "writing .beton: 100%" in capsys.readouterr().err  # FFCV's bar, labelled: it had no label
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

    def killed(tmp, final, force, **announce):
        if len(calls) == published:
            raise KeyboardInterrupt
        calls.append(final)
        real(tmp, final, force, **announce)

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


def test_a_shard_set_is_written_into_an_empty_folder_made_beforehand(bad_root, tmp_path, capsys):
    # `mkdir -p out && convert data out --format wds` was refused, --force or not: "exists and is not
    # a shard set written by convert"
    dst = tmp_path / "wds"
    dst.mkdir()
    assert main(["convert", str(bad_root), str(dst), "--format", "wds", "--workers", "1"]) == 0
    assert (dst / "meta.json").is_file() and no_partials(tmp_path)
    # a link to an empty folder is not one: the set would be written beside the link's target
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    capsys.readouterr()
    assert main(["convert", str(bad_root), str(tmp_path / "link"), "--format", "wds", "--workers", "1"]) == 2
    assert "is not a shard set written by convert" in capsys.readouterr().err
    # nor does an empty folder where a scan of SRC reads become one (val/ beside train/ and test/)
    (bad_root / "val").mkdir()
    assert main(["convert", str(bad_root), str(bad_root / "val"), "--format", "wds", "--workers", "1"]) == 2
    assert "would be SRC's split folder" in capsys.readouterr().err


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


@pytest.mark.parametrize("fmt", ["ffcv", "wds"])
@pytest.mark.parametrize("dst", ["data/x.beton", "data/train/{cls}/x.beton", "x.beton"])
def test_a_pipe_given_as_dst_is_not_read(bad_root, tmp_path, capsys, fmt, dst):
    # a named pipe at DST inside SRC (beside train/, in a class folder) had its header read to tell
    # whether it was an earlier output: open() waited for a writer, and convert hung
    import signal

    cls = sorted((bad_root / "train").iterdir())[0]
    path = tmp_path / dst.format(cls=cls.name)
    os.mkfifo(path)

    def hung(*_):
        pytest.fail("convert waited on the pipe")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        assert main(["convert", str(bad_root), str(path), "--format", fmt, "--force", "--workers", "1"]) == 2
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"DST {path} " in err[0], err
    assert path.is_fifo()


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


SPLIT_AWAY = (
    "which every scan of SRC {src} reads (convert, train, knn): give a path beside train/ in SRC or outside SRC"
)


ROOT_AWAY = (
    "which every scan of {{tmp}}/data (SRC's root) reads (convert, train, knn): give a path beside {split}/ or "
    "outside {{tmp}}/data"
)


@pytest.mark.parametrize(
    ("fmt", "src", "dst", "says"),
    [
        ("ffcv", "data", "data/train/x.beton", "is inside {tmp}/data/train, " + SPLIT_AWAY),
        ("ffcv", "data", "data/train/{cls}/x.beton", "is inside {tmp}/data/train, " + SPLIT_AWAY),
        ("wds", "data", "data/test/shards", "is inside {tmp}/data/test, " + SPLIT_AWAY),
        ("ffcv", "data", "data/val/x.beton", "is inside {tmp}/data/val, " + SPLIT_AWAY),  # val/ made: the eval split
        ("wds", "data", "data/val", "would be SRC's split folder {tmp}/data/val, " + SPLIT_AWAY),
        # SRC without train/: all of it is read
        ("wds", "data/train", "data/train/shards", "is inside {src}, which every scan of SRC {src} reads"),
        # SRC a split of a root: a scan of the root reads its other splits (convert data/train data/test/x.beton)
        ("ffcv", "data/train", "data/test/x.beton", "is inside {tmp}/data/test, " + ROOT_AWAY.format(split="train")),
        (
            "wds",
            "data/train",
            "data/val",
            "would be the split folder {tmp}/data/val, " + ROOT_AWAY.format(split="train"),
        ),
        (
            "ffcv",
            "data/test",
            "data/train/{cls}/x.beton",
            "is inside {tmp}/data/train, " + ROOT_AWAY.format(split="test"),
        ),
    ],
)
def test_an_output_where_a_scan_of_src_reads_is_refused(fresh_root, tmp_path, monkeypatch, capsys, fmt, src, dst, says):
    # `convert data data/train/x.beton` wrote it there: every later scan of data met it (a stray file
    # named at each run, an empty class folder, a val/ without classes as the eval split)
    import moco_fast.convert as conv

    monkeypatch.setattr(conv, "list_images", lambda *a, **k: pytest.fail("images read before the check"))
    cls = sorted((fresh_root / "train").iterdir())[0].name
    before = sorted(tmp_path.rglob("*"))
    path = tmp_path / dst.format(cls=cls)
    assert main(["convert", str(tmp_path / src), str(path), "--format", fmt, "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"DST {path} {says.format(tmp=tmp_path, src=tmp_path / src)}" in err[0], err
    assert sorted(tmp_path.rglob("*")) == before  # no val/ made either


def test_an_output_under_src_that_no_scan_reads_is_allowed(fresh_root):
    # beside train/, in another folder of the root, under a dot-name (never read): checked as anywhere
    for dst in ("x.beton", "betons/x.beton", "train/.cache/x.beton", "train/.x.beton"):
        check_destination(fresh_root, fresh_root / dst, "ffcv", False)
    for dst in ("x.beton", "betons/x.beton", "test/.x.beton"):  # SRC a split of the root: beside it too
        check_destination(fresh_root / "train", fresh_root / dst, "ffcv", False)


def test_sidecar_of_reads_a_sidecar_only_where_it_describes_this_beton(tmp_path, caplog):
    # the one check of the loader's class names, train's knn line and convert --force: missing,
    # no JSON object, and another .beton's fingerprint are None (said only with warn)
    from moco_fast.convert_dst import sidecar_of

    beton, side = tmp_path / "x.beton", tmp_path / "x.beton.json"
    with caplog.at_level("WARNING", logger="moco_fast"):
        assert sidecar_of(beton, "aa", warn=True) is None and caplog.text == ""
        side.write_text("[1, 2]")
        assert sidecar_of(beton, "aa") is None and caplog.text == ""
        assert sidecar_of(beton, "aa", warn=True) is None and caplog.text.count("ignoring") == 1
        caplog.clear()
        side.write_text(json.dumps({"classes": ["a"], "beton_fingerprint": "bb"}))
        assert sidecar_of(beton, "aa", warn=True) is None and "another .beton than x.beton" in caplog.text
        caplog.clear()
        assert sidecar_of(beton, "bb", warn=True) == {"classes": ["a"], "beton_fingerprint": "bb"}
        side.write_text(json.dumps({"classes": ["a"]}))  # an older convert's records no fingerprint
        assert sidecar_of(beton, "aa", warn=True) == {"classes": ["a"]} and caplog.text == ""


def test_sidecar_of_names_why_a_sidecar_cannot_be_read(tmp_path, monkeypatch, caplog):
    # an unreadable sidecar's line names the OSError's reason, as every other io line does; the
    # tests run as root, where chmod denies nothing: the refusal is made at Path.open
    from moco_fast.convert_dst import sidecar_of

    beton, side = tmp_path / "x.beton", tmp_path / "x.beton.json"
    side.write_text(json.dumps({"classes": ["a"]}))
    real_open = Path.open

    def denied(self, *args, **kwargs):
        if self == side:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    with caplog.at_level("WARNING", logger="moco_fast"):
        assert sidecar_of(beton, "aa", warn=True) is None
    assert caplog.messages == [f"ignoring {side}: it cannot be read ({os.strerror(errno.EACCES)})"]
