"""What the convert test files share (not a test module: pytest does not collect it): the bad
files of the `bad_root` fixture (conftest.py) and what a converted set must hold."""

from pathlib import Path

from PIL import Image

BAD = {"trunc.jpg": "cannot decode", "broken.jpg": "not a readable image", "notes.txt": "not an image"}


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
