"""Class folders of one split that are one folder (links): named, never listed under two labels
without a word; an error where the labels are the figure (knn, lincls, finetune)."""

import logging
import os
from pathlib import Path

import pytest

from moco_fast.data import DataError, list_images, load_splits
from moco_fast.lincls import load_splits_with_eval


def link_sibling(train: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """train/linkcls -> b: the sibling b under a second name."""
    b = sorted(train.iterdir())[1]
    (train / "linkcls").symlink_to(b.name)
    return [b.name, "linkcls"], b


def two_links(train: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """train/x and train/y both link to one folder outside the split."""
    outside = tmp_path / "outside"
    outside.mkdir()
    b = sorted(train.iterdir())[1]
    for f in b.iterdir():
        (outside / f.name).write_bytes(f.read_bytes())
    (train / "x").symlink_to(outside)
    (train / "y").symlink_to(outside)
    return ["x", "y"], outside


def link_through_outside(train: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """train/z -> a link outside whose own target is the sibling b: the same real path as b."""
    b = sorted(train.iterdir())[1]
    (tmp_path / "alias").symlink_to(b)
    (train / "z").symlink_to(tmp_path / "alias")
    return [b.name, "z"], b


LAYOUTS = [link_sibling, two_links, link_through_outside]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__)
def test_linked_class_folders_are_a_warning_in_training(fresh_root, tmp_path, caplog, layout):
    train = fresh_root / "train"
    names, real = layout(train, tmp_path)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        images = list_images(train, check=False)
    said = [r.getMessage() for r in caplog.records if "are one folder" in r.getMessage()]
    assert len(said) == 1  # one line per shared folder
    for n in names:
        assert str(train / n) in said[0]
    assert os.path.realpath(real) in said[0] and "remove the link" in said[0]
    assert set(names) <= set(images.classes)  # training goes on as listed


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__)
def test_linked_class_folders_are_an_error_where_labels_are_scored(fresh_root, tmp_path, layout):
    train = fresh_root / "train"
    names, real = layout(train, tmp_path)
    with pytest.raises(DataError, match="are one folder") as e:
        list_images(train, check=False, labelled=True)
    assert all(str(train / n) in str(e.value) for n in names) and os.path.realpath(real) in str(e.value)
    # knn and lincls/finetune list with labelled=True
    with pytest.raises(DataError, match="are one folder"):
        load_splits_with_eval(str(fresh_root))
    assert load_splits(str(fresh_root), check=False).train is not None  # train: a warning


def test_folders_of_their_own_say_nothing(fresh_root, tmp_path, caplog):
    train = fresh_root / "train"
    outside = tmp_path / "outside"
    outside.mkdir()
    first = next(sorted(train.iterdir())[0].iterdir())
    (outside / first.name).write_bytes(first.read_bytes())
    (train / "elsewhere").symlink_to(outside)  # a link to a folder of its own images is a class
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        images = list_images(train, check=False, labelled=True)
    assert "one folder" not in caplog.text and "elsewhere" in images.classes


def test_a_bind_mount_is_one_folder_by_device_and_inode(fresh_root, monkeypatch, caplog):
    """A bind mount of b onto c needs root: faked here by giving c the stat of b. Their real paths
    differ, so only the (st_dev, st_ino) comparison names them."""
    train = fresh_root / "train"
    b = sorted(train.iterdir())[1]
    c = train / "c"
    c.mkdir()
    for f in b.iterdir():
        (c / f.name).write_bytes(f.read_bytes())
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        return real_stat(b if Path(path) == c else path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        list_images(train, check=False)
    assert f"{b}, {c} are one folder" in caplog.text and "bind mount" in caplog.text
    with pytest.raises(DataError, match="bind mount"):
        list_images(train, check=False, labelled=True)


def test_no_inode_numbers_fall_back_to_real_paths(fresh_root, monkeypatch, caplog):
    """A filesystem that gives st_ino 0 to every folder: its class folders are not all one."""
    train = fresh_root / "train"
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        st = list(real_stat(path, *args, **kwargs))
        st[1] = 0  # st_ino
        return os.stat_result(st)

    monkeypatch.setattr(os, "stat", stat)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        images = list_images(train, check=False, labelled=True)
    assert "one folder" not in caplog.text and len(images.classes) == 2
