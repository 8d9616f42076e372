"""Eval images that are byte copies of training images are named in a warning (how many, the first
few), and the check reads only pairs with one class folder, one name and one size in both splits."""

import logging
import os
import shutil

from moco_fast import split_copies
from moco_fast.data import load_splits


def test_copies_of_training_images_in_the_eval_split_are_named(fresh_root, caplog):
    # A val/ holding copies (not links) of training images was scored as held-out data without a
    # word: the link check compares the files' identities, and a copy is another file.
    train, test = fresh_root / "train", fresh_root / "test"
    for name in ("0000.jpg", "0001.jpg", "0002.jpg", "0003.jpg"):
        shutil.copy(train / "airplane" / name, test / "airplane" / name)
    same_size = bytearray((train / "automobile" / "0000.jpg").read_bytes())
    same_size[len(same_size) // 2] ^= 0xFF  # same name and size, other bytes: no copy
    (test / "automobile" / "0000.jpg").write_bytes(same_size)
    (test / "automobile" / "0001.jpg").unlink()
    os.link(train / "automobile" / "0001.jpg", test / "automobile" / "0001.jpg")  # a link: the link check's
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        splits = load_splits(str(fresh_root))
    assert len(splits.eval) == 8
    copies = [r.getMessage() for r in caplog.records if "byte copies" in r.getMessage()]
    assert len(copies) == 1, caplog.text
    assert copies[0].startswith(
        f"4 of the 8 images of the eval split {test} are byte copies of training images of {train} "
        f"({test / 'airplane' / '0000.jpg'} = {train / 'airplane' / '0000.jpg'}; "
    ), copies[0]
    assert "; and 1 more): the scores on it are inflated" in copies[0] and "automobile" not in copies[0]
    assert "1 of the 8 images of the eval split" in caplog.text  # the link, named by the link check


def test_only_pairs_with_one_class_name_and_size_are_read(fresh_root, monkeypatch, caplog):
    # ImageNet's train/ holds a million files: none may be read, nor stat'ed, unless an eval file has
    # its class folder and name, and none opened unless their sizes are one.
    train, test = fresh_root / "train", fresh_root / "test"
    shutil.copy(train / "airplane" / "0002.jpg", test / "airplane" / "0002.jpg")
    compared, opened = [], []
    same_bytes = split_copies.same_bytes
    monkeypatch.setattr(split_copies, "same_bytes", lambda a, b: compared.append((a, b)) or same_bytes(a, b))
    monkeypatch.setattr(split_copies, "open", lambda p, mode: opened.append(p) or open(p, mode), raising=False)
    load_splits(str(fresh_root))
    pairs = {(str(f), str(train / f.relative_to(test))) for f in test.rglob("*.jpg")}  # 0000-0003 in both
    assert set(compared) == pairs and len(compared) == len(pairs)
    sizes = {p for a, b in pairs for p in (a, b) if os.path.getsize(a) == os.path.getsize(b)}
    assert sorted(opened) == sorted(sizes) and len(opened) == 2  # the copy and its original
    compared.clear()
    for f in sorted(train.rglob("*.jpg")):
        f.rename(f.with_name("train_" + f.name))  # train/'s names are none of the eval split's
    load_splits(str(fresh_root))
    assert compared == []
