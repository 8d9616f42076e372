"""What the DALI loader takes in, for real in DALI's CPU-only mode: the image kinds its decoder reads
(an image folder's other files are left out up front, said once), and shard sets that are damaged or
not of the contract (checked when the set is opened; what DALI still raises about a shard is one
DataError naming it)."""

import logging
from pathlib import Path

import numpy as np
import pytest
from moco_fast.loaders.dali_pipeline import DECODABLE, PipelineSettings, decodable, probe_pipeline
from moco_fast.loaders.dali_recovery import one_per_iteration, path_bytes
from PIL import Image
from test_dali import COLOUR, dali_loader

from moco_fast.data import DataError, check_image, load_splits, to_rgb

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


def dali_reads_as_pil(path: Path) -> bool:
    """Whether DALI's CPU decoder, as the loader runs it, gives PIL's pixels (`to_rgb`) for the file."""
    probe = probe_pipeline(one_per_iteration([path_bytes(str(path))]), SETTINGS)
    probe.build()
    try:
        (out,) = probe.run()
    except RuntimeError:
        return False
    got = np.array(out[0]).astype(int)
    with Image.open(path) as im:
        want = np.asarray(to_rgb(im)).astype(int)
    return got.shape == want.shape and np.abs(got - want).mean() < 1.5


def test_the_kinds_dali_reads_are_those_it_decodes_as_pil_does(tmp_path):
    # The list of kinds the loader hands DALI, measured against DALI itself: every kind listed decodes
    # to PIL's pixels, and the kinds left out do not (a newer DALI may read more: then list them).
    files = [
        (f"{fmt}/{m}", write_kind(tmp_path / f"{fmt}-{m}".replace(";", ""), fmt, m))
        for fmt in DECODABLE
        for m in DECODABLE[fmt]
    ]
    files += [(f"{fmt}/{m}", write_kind(tmp_path / name, fmt, m)) for fmt, m, name in NOT_DECODABLE]
    wrong = []
    for want, path in files:
        kind, reason = check_image(str(path))
        assert reason is None and kind == want.replace("I32", "I"), (want, kind, reason)
        if decodable(kind) != dali_reads_as_pil(path):
            wrong.append(f"{want} ({'listed' if decodable(kind) else 'not listed'})")
    assert not wrong, f"DECODABLE does not match DALI's decoder: {wrong}"


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
