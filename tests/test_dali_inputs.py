"""What the DALI loader takes in, for real in DALI's CPU-only mode: the image kinds its decoder reads
(an image folder's other files are left out up front, said once), and shard sets that are damaged or
not of the contract (checked when the set is opened; what DALI still raises about a shard is one
DataError naming it)."""

import io
import logging
import re
import shutil
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("nvidia.dali")  # every test here needs DALI: skipped where it is not installed

import numpy as np
import PIL
from conftest import ON_GPU
from dali_helpers import COLOUR, IDENTITY, dali_loader
from moco_fast.loaders.dali import DaliOptions
from moco_fast.loaders.dali_pipeline import DECODABLE, PipelineSettings, decodable, probe_pipeline
from moco_fast.loaders.dali_recovery import one_per_iteration, path_bytes
from PIL import Image

from moco_fast.cli import main
from moco_fast.config import ConfigError
from moco_fast.data import DataError, check_image, load_splits
from moco_fast.image_dataset import to_rgb

SETTINGS = PipelineSettings(1, None, 1, 1, 0, False, 0.0, False, True)


def _source() -> Image.Image:
    """A 40 x 48 photo with an alpha ramp (an opaque alpha lets some writers drop the channel)."""
    from moco_fast.data import DEMO_ROOT

    photo = next(iter(sorted((DEMO_ROOT / "train").glob("*/*.jpg"))))
    im = Image.open(photo).convert("RGB").resize((48, 40))
    im.putalpha(Image.linear_gradient("L").resize((48, 40)))
    return im


def write_kind(path: Path, fmt: str, mode: str, **kw) -> Path:
    """A file that PIL opens as `fmt`/`mode`."""
    im = _source()
    if mode in ("I;16", "I"):  # 16-bit grey: PIL opens a 16-bit PGM as "I"
        im = Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257)
    elif mode == "F":  # values above 1, as 8-bit data stored as floats would be
        im = Image.fromarray(np.asarray(im.convert("L")).astype(np.float32))
    elif mode == "I32":
        im = Image.fromarray(np.asarray(im.convert("L")).astype(np.int32) * 3)
    elif mode != "RGBA":
        im = im.convert(mode) if "A" in mode else im.convert("RGB").convert(mode)
    if fmt == "MPO":  # PIL opens a one-frame MPO as a JPEG
        kw = {"save_all": True, "append_images": [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], **kw}
    im.save(path, fmt, **kw)
    return path


# Read by PIL, not by DALI (or not to PIL's pixels); files with an extension the folder lister takes
NOT_DECODABLE = [
    ("GIF", "P", "gif.jpg"),
    ("TGA", "RGB", "tga.png"),
    ("ICO", "RGB", "ico.png"),
    ("TIFF", "1", "bits.tif"),
    ("TIFF", "I32", "int32.tif"),
    ("TIFF", "LA", "la.tif"),
    ("TIFF", "F", "float.tif"),
    ("JPEG2000", "LA", "la.jp2"),
]


# The run's GPU decoder ("mixed": nvJPEG, the hardware decoder taking hw_decoder_load of the JPEGs)
MIXED = PipelineSettings(1, 0, 1, 1, 0, True, DaliOptions().hw_decoder_load, False, True)
DECODERS = [
    pytest.param(SETTINGS, id="cpu"),
    pytest.param(
        MIXED,
        id="mixed",
        marks=ON_GPU,
    ),
]


def dali_reads_as_pil(path: Path, settings: PipelineSettings = SETTINGS) -> bool:
    """Whether DALI's decoder, as the loader runs it, gives PIL's pixels (`to_rgb`) for the file."""
    probe = probe_pipeline(one_per_iteration([path_bytes(str(path))]), settings)
    probe.build()
    try:
        (out,) = probe.run()
    except RuntimeError:
        return False
    got = np.array(out.as_cpu()[0] if hasattr(out, "as_cpu") else out[0]).astype(int)
    with Image.open(path) as im:
        want = np.asarray(to_rgb(im)).astype(int)
    return got.shape == want.shape and np.abs(got - want).mean() < 1.5


# Every kind measured: (the kind PIL should open the file as, file name, write_kind's format and mode,
# its save options). The listed kinds, the kinds left out, and compressed YCbCr TIFFs (JPEG's the
# commonest in the wild), which any Pillow opens as RGB: libtiff converts them as it decodes.
YCBCR_COMPRESSIONS = ("jpeg", "tiff_lzw", "tiff_adobe_deflate", "packbits")
MEASURED = [
    *[(f"{fmt}/{m}", f"{fmt}-{m}".replace(";", ""), fmt, m, {}) for fmt in DECODABLE for m in sorted(DECODABLE[fmt])],
    *[(f"{fmt}/{m}".replace("I32", "I"), name, fmt, m, {}) for fmt, m, name in NOT_DECODABLE],
    *[("TIFF/RGB", f"ycbcr-{c}.tif", "TIFF", "YCbCr", {"compression": c}) for c in YCBCR_COMPRESSIONS],
]


@pytest.mark.parametrize("settings", DECODERS)
@pytest.mark.parametrize("want, name, fmt, mode, kw", MEASURED, ids=[m[1] for m in MEASURED])
def test_the_kinds_dali_reads_are_those_it_decodes_as_pil_does(tmp_path, settings, want, name, fmt, mode, kw):
    # The list of kinds the loader hands DALI, measured against DALI itself: every kind listed decodes
    # to PIL's pixels, and the kinds left out do not (a newer DALI may read more: then list them).
    # Measured on the CPU decoder; the "mixed" case checks the GPU decoder against the same list.
    path = write_kind(tmp_path / name, fmt, mode, **kw)
    with Image.open(path) as im:
        opened = f"{im.format}/{im.mode}"
    if (want, opened) == ("TIFF/YCbCr", "TIFF/RGB"):
        # What a Pillow writes and opens is its own: Pillow 12.1.1 (tried) and older open every YCbCr
        # TIFF as RGB (and fail to decode the uncompressed ones, python-pillow/Pillow#9770; 13.0 opens
        # those as YCbCr, #9779), so no file of that kind exists for it, nor for a loader running on it.
        # Only this case: a file of any other kind opened as another is a failure of write_kind's
        pytest.skip(f"Pillow {PIL.__version__} opens the {fmt}/{mode} file it writes as {opened}, not {want}")
    assert opened == want, f"write_kind wrote a file Pillow {PIL.__version__} opens as {opened}, not {want}"
    kind, reason = check_image(str(path))
    assert reason is None and kind == want, (kind, reason)
    read = dali_reads_as_pil(path, settings)
    assert decodable(kind) == read, f"DECODABLE {'lists' if decodable(kind) else 'leaves out'} {kind}, " + (
        "which DALI's decoder reads as PIL does" if read else "which DALI's decoder does not read as PIL does"
    )


def test_a_folder_with_kinds_dali_cannot_read_trains_on_the_rest(fresh_root, caplog):
    # 16 JPEGs and 21 files PIL reads and DALI does not (17 GIFs named .jpg: more than 10% of the
    # images, which stopped a run late in its first epoch). They are left out before the run, in one
    # warning; the run neither hunts them down as corrupt nor counts them toward the 10%.
    cls = fresh_root / "train" / "airplane"
    for i in range(17):
        write_kind(cls / f"gif{i:02d}.jpg", "GIF", "P")
    for fmt, mode, name in NOT_DECODABLE[1:5]:  # TGA, ICO, 1-bit and 32-bit TIFF
        write_kind(cls / name, fmt, mode)
    listed = load_splits(str(fresh_root)).train
    assert len(listed) == 37  # the torch loader reads them all
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        ld = dali_loader(fresh_root, COLOUR, batch_size=4)
        assert ld.num_images == 16 and len(ld) == 4
        seen = set()
        for epoch in range(2):
            ld.set_epoch(epoch)
            steps = [b.index.tolist() for b in ld]
            assert len(steps) == 4
            seen.update(i for s in steps for i in s)
    assert seen == set(range(16))
    assert all(Path(ld.folder.files[i]).name.endswith(".jpg") and "gif" not in ld.folder.files[i] for i in seen)
    left_out = [r.getMessage() for r in caplog.records if "leaves out" in r.getMessage()]
    assert len(left_out) == 1, caplog.text
    assert "21 of 37 images" in left_out[0] and "17 GIF/P" in left_out[0] and "1 TIFF/1" in left_out[0]
    assert "airplane/bits.tif, airplane/gif00.jpg" in left_out[0] and "and 16 more" in left_out[0]
    assert "--loader torch" in left_out[0] and "moco-fast convert" in left_out[0]
    assert "could not decode" not in caplog.text and "skipping unreadable" not in caplog.text


def test_a_folder_dali_cannot_read_at_all_is_one_error(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(4):
        write_kind(tmp_path / "a" / f"{i}.jpg", "GIF", "P")
    with pytest.raises(DataError, match=r"none of the 4 images .* DALI's decoder reads"):
        dali_loader(tmp_path, COLOUR, batch_size=2)


# -- shard sets ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shard_set(tiny_root, tmp_path_factory) -> Path:
    """`moco-fast convert --format wds --shard-size 8` of the 32 training images: 4 shards, indexed."""
    dst = tmp_path_factory.mktemp("wds") / "set"
    assert main(["convert", str(tiny_root / "train"), str(dst), "--format", "wds", "--shard-size", "8"]) == 0
    return dst


def truncate(tar: Path) -> None:
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])


def png_members(tar: Path) -> None:
    """The shard rewritten by hand as {key}.png + {key}.cls (meta.json stays valid)."""
    with tarfile.open(tar) as tf:
        samples = [(m.name, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(tar, "w") as tf:
        for name, data in samples:
            if name.endswith(".jpg"):
                buf = io.BytesIO()
                Image.open(io.BytesIO(data)).save(buf, "PNG")
                name, data = name[:-3] + "png", buf.getvalue()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


DAMAGES = {  # what is done to shard-000001.tar; the index: kept, or deleted (then indexed here)
    "truncated, index kept": (truncate, False),
    "truncated, no index": (truncate, True),
    "empty, no index": (lambda t: t.write_bytes(b""), True),
    "empty, index kept": (lambda t: t.write_bytes(b""), False),
    "random bytes, no index": (lambda t: t.write_bytes(np.random.default_rng(0).bytes(t.stat().st_size)), True),
    "png members, no index": (png_members, True),
    "png members, index kept": (png_members, False),  # the index is then stale too
}


def damaged_copy(shard_set: Path, dst: Path, damage, drop_index: bool) -> Path:
    shutil.copytree(shard_set, dst)
    damage(dst / "shard-000001.tar")
    if drop_index:
        (dst / "shard-000001.idx").unlink()
    return dst / "shard-000001.tar"


def one_epoch(root: Path) -> list[int]:
    return [i for b in dali_loader(root, IDENTITY, batch_size=8) for i in b.index.tolist()]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_or_foreign_shard_is_one_error_naming_it(shard_set, tmp_path, damage):
    # These crashed with a traceback (tarfile's ReadError, DALI's C++ asserts at build or mid-epoch)
    tar = damaged_copy(shard_set, tmp_path / "set", *DAMAGES[damage])
    with pytest.raises(DataError, match=f"shard {re.escape(str(tar))}") as e:
        one_epoch(tmp_path / "set")
    assert "\n" not in str(e.value) and "moco-fast convert" in str(e.value)


def cut_between_samples(tar: Path, keep: int) -> None:
    """The shard as an interrupted copy leaves it: whole up to its sample `keep`, nothing after."""
    with tarfile.open(tar) as tf:
        starts = [m.offset for m in tf if m.name.endswith(".jpg")]  # a sample's first member
    tar.write_bytes(tar.read_bytes()[: starts[keep]])
    tar.with_suffix(".idx").unlink()


def test_shards_cut_short_between_samples_are_named_and_too_many_stop_the_run(shard_set, tmp_path, caplog):
    # A tar cut at a sample boundary reads as a shorter shard: the run said only that meta.json's count
    # differs, and trained on, whatever was missing (77 of 120 images, in the helper's case).
    root = tmp_path / "set"
    shutil.copytree(shard_set, root)
    cut_between_samples(root / "shard-000001.tar", 5)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert len(one_epoch(root)) == 24  # 29 samples, 3 full batches
    assert "says 32 images, the shards hold 29 (shard-000001.tar holds 5 of 8): using 29" in caplog.text
    for name in ("shard-000002.tar", "shard-000003.tar"):  # 17 of 32 missing: more than 10% and 16
        cut_between_samples(root / name, 1)
    with pytest.raises(
        DataError,
        match=r"says 32 images, the shards hold 15 \(shard-000001.tar holds 5 of 8; "
        r"shard-000002.tar holds 1 of 8; shard-000003.tar holds 1 of 8\): more than 10% are missing",
    ):
        one_epoch(root)


def test_a_shard_cut_inside_its_last_sample_is_named_as_cut_short(shard_set, tmp_path):
    # Cut between a sample's .jpg and .cls: the error said the shard's samples were "not the
    # {key}.jpg + {key}.cls of a shard set", as if it held other members, not that it was cut short
    root = tmp_path / "set"
    shutil.copytree(shard_set, root)
    tar = root / "shard-000001.tar"
    with tarfile.open(tar) as tf:
        cls_start = [m.offset for m in tf if m.name.endswith(".cls")][4]
    tar.write_bytes(tar.read_bytes()[:cls_start])
    tar.with_suffix(".idx").unlink()
    with pytest.raises(DataError, match=f"shard {re.escape(str(tar))} is cut short inside its last sample") as e:
        one_epoch(root)
    assert "holds only " in str(e.value) and "\n" not in str(e.value)


def test_shuffle_buffer_on_an_image_folder_is_an_error(tiny_root, shard_set):
    # docs/dali.md: shard sets only; on a folder it was taken and did nothing, without a word
    with pytest.raises(ConfigError, match="shuffle_buffer is for a shard set"):
        dali_loader(tiny_root / "train", IDENTITY, options={"shuffle_buffer": "64"})
    assert len(dali_loader(shard_set, IDENTITY, options={"shuffle_buffer": "64"})) == 4


def shift_an_offset(idx: Path) -> None:
    lines = idx.read_text().splitlines()
    parts = lines[3].split()
    parts[1] = str(int(parts[1]) + 100)
    idx.write_text("\n".join([*lines[:3], " ".join(parts), *lines[4:]]) + "\n")


@pytest.mark.parametrize("wrong", ["an offset moved by 100", "the index of another shard"])
def test_a_wrong_index_is_made_again_from_its_tar(shard_set, tmp_path, caplog, wrong):
    # An offset off the tar's 512-byte grid failed DALI's build; another shard's index was trusted,
    # and the run skipped that shard's 7 good samples as undecodable, naming keys it does not hold.
    root = tmp_path / "set"
    shutil.copytree(shard_set, root)
    idx = root / "shard-000001.idx"
    if wrong == "an offset moved by 100":
        shift_an_offset(idx)
    else:
        shutil.copy(root / "shard-000000.idx", idx)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        seen = one_epoch(root)
    assert sorted(seen) == list(range(32))  # every sample once, none skipped
    assert "skipping sample" not in caplog.text
    assert caplog.text.count("do not match their tars") == 1 and str(idx) in caplog.text


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_shard_damaged_after_the_set_was_opened_is_one_error_naming_it(shard_set, tmp_path, damage):
    # What the check at opening cannot see: DALI's reader fails (at build: empty; mid-epoch:
    # truncated); its C++ error becomes one line naming the shard.
    root = tmp_path / "set"
    shutil.copytree(shard_set, root)
    ld = dali_loader(root, IDENTITY, batch_size=8)
    tar = root / "shard-000001.tar"
    truncate(tar) if damage == "truncated" else tar.write_bytes(b"")
    with pytest.raises(DataError, match=f"DALI cannot read shard {re.escape(str(tar))}") as e:
        list(ld)
    assert "\n" not in str(e.value)


def test_train_names_the_damaged_shard_in_one_line(shard_set, tmp_path, capsys):
    damaged_copy(shard_set, tmp_path / "set", truncate, False)
    args = ["train", "--loader", "dali", "--device", "cpu", "--data", str(tmp_path / "set"), "--arch", "resnet18"]
    args += ["--image-size", "32", "--epochs", "1", "--batch-size", "4", "--moco-k", "16", "--bn-splits", "2"]
    args += ["--workers", "1", "--out", str(tmp_path / "run"), "--no-final-knn", "--knn-every", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("moco-fast train: error: shard ") and "shard-000001.tar" in err[-1]
    assert "Traceback" not in "\n".join(err)
