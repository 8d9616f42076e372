"""`moco-fast convert`: bad files named and skipped, .beton and WebDataset outputs that read back
right (labels, sizes, the index DALI writes, the loader's meta), --max-resolution, val and test
splits, high-depth grayscale scaled, palette images with transparency and images over PIL's pixel
limit decoded without PIL's warnings."""

import io
import json
import os
import re
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import BAD, beton_images, expected, no_partials
from PIL import Image

from moco_fast.cli import main
from moco_fast.convert import ConvertConfig, convert
from moco_fast.convert_dst import NAMES_FINGERPRINT, NAMES_HEADER, beton_fingerprint
from moco_fast.data import DataError


def assert_bad_named(summary):
    named = {Path(p).name: r for p, r in summary.skipped}
    assert set(named) == set(BAD)
    for name, reason in BAD.items():
        assert reason in named[name]


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


@pytest.mark.slow  # a process of its own: FFCV not imported yet
def test_a_beton_convert_says_why_it_waits_before_its_writing_bar(tiny_root, tmp_path):
    # FFCV's import compiles Numba code: ~5 s on a CPU between the checking bar and the writing one,
    # without a word (as if convert hung). Said on stderr: stdout keeps the result line alone.
    import subprocess
    import sys

    dst = tmp_path / "x.beton"
    argv = ["convert", str(tiny_root), str(dst), "--format", "ffcv", "--workers", "1"]
    done = subprocess.run([sys.executable, "-m", "moco_fast", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote 32 images to {dst} ") and done.stdout.count("\n") == 1
    lines = done.stderr.replace("\r", "\n").splitlines()
    said = lines.index("INFO starting FFCV's writer (its import compiles Numba code: a few seconds)")
    checked = max(i for i, line in enumerate(lines) if line.startswith("checking:"))
    writing = min(i for i, line in enumerate(lines) if line.startswith("writing .beton:"))
    assert checked < said < writing


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


@pytest.mark.parametrize(
    ("edit", "said"),
    [  # meta.json edited by hand: a name that is no string was a TypeError at the first batch, a shard
        # listed twice was read twice an epoch without a word, no classes failed only at a batch
        ({"shards": [5, "shard-000001.tar"]}, "'shards' must be a list of file names, got [5, 'shard-000001.tar']"),
        ({"shards": ["shard-000000.tar", "shard-000000.tar"]}, "lists the shard shard-000000.tar twice: its samples"),
        (
            {"shards": ["shard-000000.tar", "./shard-000000.tar"]},
            "lists shard-000000.tar and ./shard-000000.tar, one file",
        ),
        ({"classes": []}, "'classes' is empty"),
        ({"num_images": 18.0}, "'num_images' must be an int"),
    ],
)
def test_a_hand_edited_meta_json_is_one_error(bad_root, tmp_path, edit, said):
    from moco_fast.loaders import wds

    dst = tmp_path / "wds"
    convert(ConvertConfig(str(bad_root), str(dst), format="wds", shard_size=10, workers=1))
    meta = json.loads((dst / "meta.json").read_text())
    (dst / "meta.json").write_text(json.dumps({**meta, **edit}))
    with pytest.raises(DataError, match=re.escape(said)):
        wds.read_meta(dst)


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
    # the root has test/ (CIFAR-10's), not val/: it said "has no train/ and val/ folders"
    with pytest.raises(
        DataError, match=r"--split val: .* has no val/ folder; its eval split is test/: give --split test$"
    ):
        convert(ConvertConfig(str(bad_root), str(tmp_path / "v2"), format="wds", split="val", workers=1))


@pytest.mark.parametrize(
    ("mode", "values", "full"),
    [("I;16", np.uint16, 65535), ("I", np.int32, 65535), ("F", np.float32, 1.0), ("L", np.uint8, 255)],
)
def test_high_depth_grayscale_is_scaled_not_clipped(tmp_path, mode, values, full):
    # A 16-bit PNG gradient: PIL's own convert("RGB") clips it to almost all white.
    from moco_fast.convert_images import load_resized
    from moco_fast.image_dataset import load_rgb

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


def test_a_test_split_beside_a_val_split(bad_root, tmp_path):
    shutil.copytree(bad_root / "test", bad_root / "val")
    for f in (bad_root / "val").rglob("*.jpg"):
        f.unlink()  # val/ empty of images: --split test must read test/, not val/
    summary = convert(ConvertConfig(str(bad_root), str(tmp_path / "t"), format="wds", split="test", workers=1))
    assert summary.written == 8


def test_a_flag_of_the_other_format_is_warned_of(bad_root, tmp_path, caplog):
    # --format wds --write-mode raw stored JPEGs, and a .beton's --shard-size was dropped, without a word
    import logging

    argv = ["convert", str(bad_root), str(tmp_path / "wds"), "--format", "wds", "--workers", "1"]
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main([*argv, "--write-mode", "raw", "--shard-size", "10"]) == 0
    assert "--write-mode: a --format ffcv setting, which --format wds ignores" in caplog.text
    assert "--shard-size" not in caplog.text
    assert len(list((tmp_path / "wds").glob("*.tar"))) == 2  # --shard-size 10 of 18 images: it still applies


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--workers", "-2"), ("--shard-size", "0"), ("--jpeg-quality", "101"), ("--seed", "-1"), ("--seed", str(2**32))],
)
def test_bad_numbers_are_one_line_errors_before_any_image_is_read(flag, value, tmp_path, capsys):
    # --workers -2 ran on every core as 0 does, where the other commands refuse a count below -1
    dst = tmp_path / "out" / "x"
    assert main(["convert", str(tmp_path / "no-such-src"), str(dst), "--format", "wds", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} must be" in err[0], err
    assert not dst.parent.exists()


@pytest.mark.parametrize("workers", ["17", str(10**12)])
def test_more_workers_than_the_cores_take_are_refused_as_trains_are(workers, tmp_path, capsys, monkeypatch):
    # 10**12 was an OverflowError traceback from the process pool's queue, and a count below it forked
    # that many processes at once; train's cap (8 a core) refuses both before any image is read
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    dst = tmp_path / "out" / "x"
    assert main(["convert", str(tmp_path / "no-such-src"), str(dst), "--format", "wds", "--workers", workers]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"moco-fast convert: error: --workers {workers}: this machine has 2 CPU cores, and more than 8 processes a "
        "core only compete with each other for it: use at most 16 (0: every core)"
    ]
    assert not dst.parent.exists()


def test_a_dst_in_a_loop_of_links_is_one_line(tmp_path, capsys):
    # pathlib's resolve raised "RuntimeError: Symlink loop from PATH" as a traceback
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    dst = tmp_path / "a"
    assert main(["convert", str(src.parent), str(dst), "--format", "wds"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"moco-fast convert: error: DST {dst} leads into a loop of symbolic links: remove the link or give another path"
    ]


@pytest.mark.parametrize(("flag", "value", "least"), [("--shard-size", "0", 1), ("--max-resolution", "4", 8)])
def test_lower_bounds_are_worded_as_the_other_commands_word_them(flag, value, least, tmp_path, capsys):
    # convert said "--shard-size must be at least 1, got 0" and "--max-resolution must be at least 8
    # pixels, got 4", where train, lincls, knn and the benches say "(got 0)" (config.check_at_least)
    assert main(["convert", str(tmp_path / "no-such-src"), str(tmp_path / "x"), "--format", "wds", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moco-fast convert: error: {flag} must be at least {least} (got {value})"]


@pytest.mark.parametrize("ending", ["/", "/."])
def test_a_beton_dst_ending_with_a_slash_is_refused_before_any_image_is_read(ending, tmp_path, monkeypatch, capsys):
    # `convert data betons/` (or betons/.) wrote a .beton file named betons (Path drops the ending), not
    # one in it; refused in the words of every other command's output file (test_cli_checks)
    import moco_fast.convert

    monkeypatch.setattr(moco_fast.convert, "missing_modules", lambda names: [])  # an FFCV-less CI gets as far
    dst = f"{tmp_path}/betons{ending}"
    assert main(["convert", str(tmp_path / "no-such-src"), dst]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    said = "/" if ending == "/" else "."
    assert err == [
        f"moco-fast convert: error: DST {dst} ends with {said}, a folder that does not exist: give a file path "
        f"({os.path.join(dst, 'NAME')})"
    ]
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ending", ["/", "/."])
def test_an_existing_folder_as_a_beton_dst_is_refused_as_a_folder_whatever_its_ending(
    ending, tmp_path, monkeypatch, capsys
):
    # the ending's line says "a folder that does not exist": an existing folder there gets
    # check_output's own line, as one named without the ending does, and stays as it was
    import moco_fast.convert

    monkeypatch.setattr(moco_fast.convert, "missing_modules", lambda names: [])  # an FFCV-less CI gets as far
    (tmp_path / "src").mkdir()
    (tmp_path / "betons").mkdir()
    assert main(["convert", str(tmp_path / "src"), f"{tmp_path}/betons{ending}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moco-fast convert: error: DST {tmp_path / 'betons'} is a folder: give a file path"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["betons", "src"] and not any((tmp_path / "betons").iterdir())


@pytest.mark.parametrize("dst", [".", "..", "sub/.."])
def test_a_dst_without_a_name_is_one_line(dst, tmp_path, monkeypatch, capsys):
    # `convert data . --format wds` (the shards into the current folder) ended in a traceback,
    # "PosixPath('.') has an empty name": DST's temporary, sidecars and lock are named after it
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert main(["convert", str(tmp_path / "no-such-src"), dst, "--format", "wds"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"moco-fast convert: error: DST {dst} names a folder without its name, and convert writes DST beside "
        f"itself under a temporary name before renaming it into place: give the output's name ({dst}/NAME)"
    ]
    assert os.listdir(tmp_path) == ["sub"] and os.listdir(tmp_path / "sub") == []


def test_the_other_formats_flags_are_ignored_not_refused(tmp_path, monkeypatch, capsys, caplog):
    # --format ffcv --shard-size 0 warned that ffcv ignores it, then refused it as a bad --shard-size
    import logging

    import moco_fast.convert

    monkeypatch.setattr(moco_fast.convert, "missing_modules", lambda names: [])  # an FFCV-less CI gets as far
    argv = ["convert", str(tmp_path / "no-such-src"), str(tmp_path / "x.beton"), "--format", "ffcv"]
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main([*argv, "--shard-size", "0", "--seed", "-1"]) == 2
    assert "--shard-size and --seed: a --format wds setting, which --format ffcv ignores" in caplog.text
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-src" in err[0] and "must be" not in err[0], err


@pytest.mark.slow  # FFCV's writer processes
@pytest.mark.parametrize(("mode", "page"), [("jpg", 8 << 20), ("raw", 16 << 20)])
def test_a_large_image_sizes_the_pages_by_what_the_beton_stores(tmp_path, mode, page):
    # Pages were sized for the largest image's pixels even where FFCV stores it as a JPEG: a 2000 x
    # 1500 photo (9 MB of pixels, a 0.1 MB JPEG) made them 16 MiB, and each writer worker leaves its
    # last page part-empty (a 6000 x 4000 photo: 128 MiB pages, a 63-image .beton of 256 MiB)
    from moco_fast.convert_beton import check_task
    from moco_fast.convert_dst import BETON_HEADER

    yy, xx = np.mgrid[0:1500, 0:2000]
    smooth = np.stack([xx * 255 // 2000, yy * 255 // 1500, np.full_like(xx, 90)], -1).astype(np.uint8)
    for cls, img in (("big", smooth), ("small", smooth[:40, :60])):
        (tmp_path / "src" / cls).mkdir(parents=True)
        Image.fromarray(img).save(tmp_path / "src" / cls / "x.jpg", quality=95)
    dst = tmp_path / "x.beton"
    convert(ConvertConfig(str(tmp_path / "src"), str(dst), write_mode=mode, workers=1))
    assert BETON_HEADER.unpack_from(dst.read_bytes())[2] == page
    labels, sizes, blobs = beton_images(dst)
    assert labels == [0, 1] and sizes == [(2000, 1500), (60, 40)]
    if mode == "jpg":
        decoded = np.asarray(Image.open(io.BytesIO(blobs[0])))
        assert np.abs(decoded.astype(int) - smooth).mean() < 3
        # the check pass measured the JPEG that FFCV's field wrote
        assert check_task((str(tmp_path / "src" / "big" / "x.jpg"), None, 90)) == (2000, 1500, len(blobs[0]))


def test_a_palette_image_with_transparency_becomes_rgb_without_pils_warning(tmp_path):
    # PIL warned "Palette images with Transparency expressed in bytes should be converted to RGBA
    # images" (file:line and its source line) in convert's and a run's output, once a process
    from moco_fast.image_dataset import load_rgb

    gray = Image.fromarray((np.arange(24 * 32).reshape(24, 32) % 200).astype(np.uint8), "L")
    gray.convert("P").save(tmp_path / "t.png", transparency=bytes([0, 128, 255] + [255] * 60))
    with Image.open(tmp_path / "t.png") as im:
        assert im.mode == "P" and isinstance(im.info["transparency"], bytes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = np.asarray(im.convert("RGB"))  # PIL's own conversion, its warning silenced
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = load_rgb(str(tmp_path / "t.png"))
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb), plain)


def test_an_image_over_pils_pixel_limit_is_named_in_one_line_not_in_pils_warning(tmp_path):
    # PIL's DecompressionBombWarning, at every open of such an image (convert's check and writing
    # passes, each worker of a run), named no file and printed its own file:line and source line
    import subprocess
    import sys

    big = tmp_path / "big.png"
    script = f"""
import logging
from PIL import Image
logging.basicConfig(format="%(levelname)s %(message)s")
from moco_fast.cli import warnings_as_lines
from moco_fast.data import check_image
from moco_fast.image_dataset import load_rgb
Image.MAX_IMAGE_PIXELS = 1000  # 40 x 40 is over it, and under the twice as many that PIL refuses
Image.new("RGB", (40, 40)).save({str(big)!r})
with warnings_as_lines():  # around each command (cli.main) and each --gpus worker
    assert check_image({str(big)!r})[1] is None
    load_rgb({str(big)!r})
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"WARNING {big} has 1,600 pixels, over PIL's decompression-bomb limit (1,000): read anyway, ~0 MiB a "
        "decode; shrink it (or convert with --max-resolution) to save time and memory"
    ]


def test_importing_moco_fast_keeps_pils_pixel_limit_warning_and_error(tmp_path):
    # the CLI silences PIL's DecompressionBombWarning (check_image names the file); code that imports
    # moco_fast had it silenced process-wide at import, in its own reads of images. A process of its
    # own: pytest sets the filters anew around each test, which hid that import's filter.
    import subprocess
    import sys

    big = tmp_path / "big.png"
    script = f"""
import warnings
from PIL import Image
from moco_fast.cli import warnings_as_lines
from moco_fast.image_dataset import load_rgb
Image.new("RGB", (40, 40)).save({str(big)!r})
Image.MAX_IMAGE_PIXELS = 1000  # 1,600 pixels: a warning; over 2,000: PIL's error
with warnings.catch_warnings(record=True) as seen:
    with warnings_as_lines():
        load_rgb({str(big)!r})  # silenced in the CLI's context alone
    load_rgb({str(big)!r})
assert [w.category for w in seen] == [Image.DecompressionBombWarning], seen
Image.MAX_IMAGE_PIXELS = 700
try:
    with warnings_as_lines():
        load_rgb({str(big)!r})
    raise SystemExit("no error")
except Image.DecompressionBombError:
    pass
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


@pytest.mark.slow  # imports FFCV and runs its writer processes
def test_a_beton_is_written_under_any_start_method(bad_root, tmp_path, monkeypatch):
    # Python 3.14's default start method on Linux is forkserver: FFCV's writer started its workers
    # with it and failed to pickle the work function that moco-fast sets for its forked workers
    import multiprocessing

    default = multiprocessing.context._default_context
    monkeypatch.setattr(default, "_actual_context", multiprocessing.get_context("forkserver"))
    dst = tmp_path / "train.beton"
    summary = convert(ConvertConfig(str(bad_root), str(dst), format="ffcv", workers=2))
    assert summary.written == 18 and beton_images(dst)[0] == expected(bad_root)[1]


@pytest.mark.slow  # imports FFCV
def test_the_beton_writes_of_one_process_set_up_ffcvs_writer_one_at_a_time(tmp_path, monkeypatch):
    # two converts at once (threads of one program) each swapped FFCV's module globals within the
    # other's swap: the second to end put the first's values back for good
    import threading

    import ffcv.memory_allocator
    import ffcv.writer

    from moco_fast import convert_beton

    names = [(ffcv.writer, n) for n in ("Process", "Queue", "Value", "tqdm", "worker_job_indexed_dataset")]
    names.append((ffcv.memory_allocator, "Value"))
    plain = [getattr(module, name) for module, name in names]
    moved = threading.Event()  # the second write waits for the first, or is in

    class Watched:
        """_ONE_WRITER, saying when a write has to wait for it."""

        def __init__(self) -> None:
            self.lock = threading.Lock()

        def __enter__(self) -> None:
            if not self.lock.acquire(blocking=False):
                moved.set()
                self.lock.acquire()

        def __exit__(self, *exc) -> None:
            self.lock.release()

    monkeypatch.setattr(convert_beton, "_ONE_WRITER", Watched())
    first_in, first_ends, second_in = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with convert_beton.ffcv_writing(None, tmp_path / "a.beton"):
            first_in.set()
            first_ends.wait()

    def second() -> None:
        first_in.wait()
        with convert_beton.ffcv_writing(None, tmp_path / "b.beton"):
            second_in.set()
            moved.set()

    threads = [threading.Thread(target=f, daemon=True) for f in (first, second)]
    for t in threads:
        t.start()
    moved.wait()
    waited = not second_in.is_set()
    first_ends.set()
    for t in threads:
        t.join()
    assert waited and second_in.is_set()
    assert [getattr(module, name) for module, name in names] == plain


def test_a_dst_in_a_folder_that_is_a_link_to_nothing_is_one_line(tmp_path, capsys):
    # mkdir of DST's parents said only "[Errno 17] File exists: 'PATH'"
    (tmp_path / "dead").symlink_to(tmp_path / "gone")
    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    dst = tmp_path / "dead" / "x"
    assert main(["convert", str(src.parent), str(dst), "--format", "wds"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"moco-fast convert: error: DST {dst} lies in {tmp_path / 'dead'}, a symbolic link to {tmp_path / 'gone'}, "
        "which does not exist: make its target first, or remove the link"
    ]


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_a_class_whose_images_all_fail_stays_numbered_and_is_named(fmt, fresh_root, tmp_path, capsys, caplog):
    # a class of which no image could be written stayed in the class list without a word: labels and
    # the class count disagreed with the data (a linear classifier got a class with no samples). It
    # stays, as SRC's listing numbers it (its other split is converted against these classes, and a
    # torch-loader run on the folder has it), and the output says so: report, warning, meta
    first, second = sorted((fresh_root / "train").iterdir())
    for f in sorted(first.iterdir()):  # headers fine, decodes fail; one not an image at all
        f.write_bytes(f.read_bytes()[: int(f.stat().st_size * 0.9)])
    (first / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    dst = tmp_path / ("out.beton" if fmt == "ffcv" else "out")
    assert main(["convert", str(fresh_root), str(dst), "--format", fmt, "--workers", "1"]) == 0
    said = f"no image written of class(es) {first.name}: every one was skipped"
    assert said in capsys.readouterr().out and f"{dst}: {said}" in caplog.text
    meta = json.loads((dst.parent / "out.beton.json" if fmt == "ffcv" else dst / "meta.json").read_text())
    assert meta["classes"] == [first.name, second.name] and meta["classes_without_images"] == [first.name]
    assert meta["num_images"] == 8
    if fmt == "ffcv":
        labels, _, _ = beton_images(dst)
        assert set(labels) == {1}  # numbered as the folder is: the second class keeps its label


def test_an_eval_split_without_a_training_class_names_it(fresh_root, tmp_path, caplog):
    # --split test converts against train/'s classes: one with no folder in test/ has no image there
    first = sorted((fresh_root / "test").iterdir())[0]
    shutil.rmtree(first)
    summary = convert(ConvertConfig(str(fresh_root), str(tmp_path / "t"), format="wds", split="test", workers=1))
    assert summary.empty_classes == [first.name]
    assert "or, in --split, none is there" in summary.text()
    assert json.loads((tmp_path / "t" / "meta.json").read_text())["classes_without_images"] == [first.name]
