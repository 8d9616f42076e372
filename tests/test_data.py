"""Listing image folders (hidden and empty folders, broken links, nested files) and kNN feature passes
over files that fail to decode: left out and named, never replaced by another image."""

import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from moco_fast.augment import AugSpec
from moco_fast.data import DataError, check_image, find_classes, list_images, load_splits
from moco_fast.knn import extract_features, knn_score


class ChannelMean(nn.Module):
    """Features = the mean colour: kNN on colour-separable images is exact."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


RED, BLUE = (220, 10, 10), (10, 10, 220)


def solid(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


def truncate(path: Path) -> None:
    """A JPEG cut short: its header passes the check, the decode fails."""
    good = path.read_bytes()
    path.write_bytes(good[: int(len(good) * 0.9)])


# -- hidden and empty folders ------------------------------------------------------------------------
def test_hidden_and_empty_folders_are_not_classes(fresh_root, caplog):
    train = fresh_root / "train"
    real = sorted(p.name for p in train.iterdir())
    (train / ".ipynb_checkpoints").mkdir()
    shutil.copy(next((train / real[0]).iterdir()), train / ".ipynb_checkpoints" / "copy.jpg")  # hidden: never read
    (train / "aaa_empty").mkdir()  # sorts first: would shift every label
    (train / "zz_notes").mkdir()
    (train / "zz_notes" / "readme.txt").write_text("no images here")
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        splits = load_splits(str(fresh_root))
    assert splits.train.classes == real and splits.eval.classes == real
    assert find_classes(train) == real
    assert "aaa_empty" in caplog.text and "zz_notes" in caplog.text and "hold no image files" in caplog.text
    assert ".ipynb_checkpoints" not in caplog.text
    assert not any(".ipynb_checkpoints" in f for f in splits.train.files)
    assert len(splits.train) == 16 and len(splits.eval) == 8
    # labels stay the folder's index in the class list, in both splits
    for images in (splits.train, splits.eval):
        assert [images.classes[y] for y in images.labels] == [Path(f).parent.name for f in images.files]
    # the text file of the left-out folder is still named as skipped
    assert [Path(p).name for p, _ in splits.train.skipped] == ["readme.txt"]


def test_eval_split_keeps_the_given_classes(fresh_root, caplog):
    train, test = fresh_root / "train", fresh_root / "test"
    real = sorted(p.name for p in train.iterdir())
    (train / "zz_empty").mkdir()
    (test / "zz_empty").mkdir()  # its twin in test/: no images, ignored with a warning, not an error
    (test / ".ipynb_checkpoints").mkdir()
    shutil.rmtree(test / real[1])
    (test / real[1]).mkdir()  # a training class with no eval images: still label 1 of the train list
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        splits = load_splits(str(fresh_root))
    assert splits.train.classes == real and splits.eval.classes == real
    assert set(splits.eval.labels) == {0}
    assert "zz_empty" in caplog.text
    # a folder of images that is not a training class stays an error
    solid(test / "zz_new" / "0.png", RED)
    with pytest.raises(DataError, match=r"zz_new.*not among the training classes"):
        list_images(test, classes=real)


def test_class_names_in_two_unicode_forms(tmp_path):
    # "café" typed here (NFC) and "café" copied from macOS (NFD: e + combining accent)
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    for split, name in (("train", nfc), ("test", nfd)):
        solid(tmp_path / split / name / "0.png", RED)
        solid(tmp_path / split / "tea" / "0.png", BLUE)
    # across splits they are one class: the eval split's folder gets the training label
    splits = load_splits(str(tmp_path))
    assert splits.train.classes == [nfc, "tea"]
    assert splits.eval.labels == [0, 1] and Path(splits.eval.files[0]).parent.name == nfd
    # an empty twin in one split is left out as any empty folder is
    (tmp_path / "train" / nfd).mkdir()
    assert load_splits(str(tmp_path)).train.classes == [nfc, "tea"]
    # with images, they would be two classes that look the same: refused, both named
    solid(tmp_path / "train" / nfd / "1.png", RED)
    with pytest.raises(DataError, match=r"same name in two Unicode forms \('cafe\\u0301' and 'caf\\xe9'\)"):
        list_images(tmp_path / "train")


def test_an_image_over_pils_size_guard_is_named_with_the_fix(tmp_path, monkeypatch):
    solid(tmp_path / "big.png", RED)  # 256 pixels: over twice a limit of 100, where PIL refuses it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    _, reason = check_image(str(tmp_path / "big.png"))
    assert reason == (
        "too large to decode safely (256 pixels, over PIL's limit of 200, a guard against decompression bombs): "
        "resize it to keep it"
    )


def test_only_empty_or_hidden_folders_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / ".hidden").mkdir()
    solid(tmp_path / ".hidden" / "0.png", RED)
    with pytest.raises(DataError, match="no image files in any class folder"):
        list_images(tmp_path)
    shutil.rmtree(tmp_path / "a")
    with pytest.raises(DataError, match="no class subfolders"):
        list_images(tmp_path)


def test_a_flat_folder_of_images_is_told_how_to_train_on_it(tmp_path):
    # pretraining needs no labels: a folder of loose images said only "expected <class>/<image files>"
    for i in range(3):
        solid(tmp_path / f"{i}.png", RED)
    fix = f"(MoCo needs no labels: move its 3 images into one subfolder, such as {tmp_path}/images/)"
    with pytest.raises(DataError, match="no class subfolders") as e:
        list_images(tmp_path)
    assert str(e.value).endswith(fix)
    # where the labels are the figure (knn, lincls) or the classes are the training split's: no such fix
    for kwargs in ({"labelled": True}, {"classes": ["a", "b"]}):
        with pytest.raises(DataError, match="no class subfolders") as e:
            list_images(tmp_path, **kwargs)
        assert "MoCo needs no labels" not in str(e.value)


def test_shards_without_their_meta_json_are_named(tmp_path):
    # a shard set copied without meta.json said only "no class subfolders ... expected <class>/<image files>"
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000000.idx"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError) as e:
        list_images(tmp_path)
    assert str(e.value) == (
        f"no class subfolders in {tmp_path}, and 2 .tar files without a meta.json: a WebDataset shard set "
        "(for --loader dali) needs the meta.json that `moco-fast convert SRC DST --format wds` writes beside its "
        "shards; an image folder needs <class>/<image files>"
    )


def test_a_shard_set_met_as_a_split_is_not_said_to_lack_its_meta_json(tmp_path):
    # --data ROOT whose ROOT/train/ is a shard set with its meta.json was told the set "needs the
    # meta.json", which is there: a shard set is read as --data itself, by --loader dali
    train = tmp_path / "train"
    train.mkdir()
    (train / "shard-000000.tar").write_bytes(b"")
    (train / "meta.json").write_text('{"format": "wds"}')
    with pytest.raises(DataError) as e:
        list_images(train)
    assert str(e.value) == (
        f"no class subfolders in {train}: it is a WebDataset shard set, which training (train, sweep) reads "
        f"with --loader dali given as --data {train} itself; this reads image folders (<class>/<image files>)"
    )


# -- files skipped without a word before --------------------------------------------------------------
def test_broken_links_and_nested_files_are_named(fresh_root, caplog):
    train = fresh_root / "train"
    cls = sorted(train.iterdir())[0]
    first = sorted(cls.iterdir())[0]
    os.symlink(cls / "gone.jpg", cls / "dangling.jpg")
    os.symlink(cls / "loop.jpg", cls / "loop.jpg")  # a link to itself
    os.symlink(first, cls / "alias.jpg")  # a good link is read
    (cls / "extra" / "deeper").mkdir(parents=True)
    shutil.copy(first, cls / "extra" / "nested.jpg")
    shutil.copy(first, cls / "extra" / "deeper" / "nested2.jpg")
    (cls / ".thumbs").mkdir()  # hidden: ignored
    shutil.copy(first, cls / ".thumbs" / "t.jpg")
    os.symlink(train / "moved_away", train / "zz_link")  # a class folder whose target is gone
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        images = list_images(train)
    reasons = {Path(p).name: r for p, r in images.skipped}
    assert set(reasons) == {"dangling.jpg", "loop.jpg", "nested.jpg", "nested2.jpg", "zz_link"}
    assert "broken symbolic link" in reasons["dangling.jpg"] and "broken symbolic link" in reasons["loop.jpg"]
    assert "broken symbolic link" in reasons["zz_link"]
    assert "subfolder" in reasons["nested.jpg"] and "subfolder" in reasons["nested2.jpg"]
    for name in reasons:
        assert name in caplog.text
    assert "skipped 5 of" in caplog.text
    assert str(cls / "alias.jpg") in images.files and len(images) == 17
    assert images.classes == sorted(p.name for p in train.iterdir() if p.is_dir() and not p.is_symlink())


def test_loose_images_links_to_folders_and_hidden_files(fresh_root, tmp_path, caplog):
    # Images beside the class folders were dropped without a word; a link to a folder inside a class
    # folder was walked whole (a link to /usr named 127,612 files); macOS's ._x.jpg files were read.
    train = fresh_root / "train"
    cls = sorted(train.iterdir())[0]
    first = sorted(cls.iterdir())[0]
    shutil.copy(first, train / "loose.jpg")
    (train / "notes.txt").write_text("not an image: ignored")
    big = tmp_path / "elsewhere"
    for i in range(30):
        solid(big / "sub" / f"{i}.png", RED)
    os.symlink(big, cls / "linked")
    (cls / "._0000.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (train / "zz_only_hidden").mkdir()
    (train / "zz_only_hidden" / "._x.jpg").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        images = list_images(train)
    reasons = {Path(p).name: r for p, r in images.skipped}
    assert set(reasons) == {"loose.jpg", "linked"}
    assert "not in a class folder" in reasons["loose.jpg"] and "a link to a folder" in reasons["linked"]
    assert "._" not in caplog.text and "skipped 2 of 18 files" in caplog.text
    assert images.classes == find_classes(train) == sorted(p.name for p in train.iterdir() if p.is_dir())[:2]
    assert len(images) == 16


def test_an_eval_split_the_run_does_not_need_never_stops_it(fresh_root, caplog):
    # A flat val/ (ImageNet's layout) stopped every folder loader with "no class subfolders", even with
    # the kNN off. "try": the final kNN goes without it; "skip": nothing reads it.
    from moco_fast.config import build_config
    from moco_fast.monitor import eval_split_use

    for f in (fresh_root / "test").rglob("*.jpg"):
        f.rename(fresh_root / "test" / f"{f.parent.name}_{f.name}")
    for d in [d for d in (fresh_root / "test").iterdir() if d.is_dir()]:
        d.rmdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_splits(str(fresh_root))
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        splits = load_splits(str(fresh_root), eval_split="try")
    assert splits.eval is None and len(splits.train) == 16
    assert "the eval split" in caplog.text and "no class subfolders" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert load_splits(str(fresh_root), eval_split="skip").eval is None and not caplog.text
    uses = {
        (every, final): eval_split_use(build_config("cifar", {"runtime.knn_every": every, "runtime.final_knn": final}))
        for every in (0, 2)
        for final in (False, True)
    }
    assert uses == {(0, False): "skip", (0, True): "try", (2, False): "list", (2, True): "list"}


def test_an_eval_split_made_of_training_images_is_refused_or_named(fresh_root, caplog):
    # A val/ linked to train/, or holding links to its files, was scored as held-out data: every kNN,
    # lincls and finetune figure inflated without a word.
    test, train = fresh_root / "test", fresh_root / "train"
    train_files = sorted(train.rglob("*.jpg"))
    evaluated = sorted(test.rglob("*.jpg"))
    evaluated[0].unlink()
    os.link(train_files[0], evaluated[0])  # a hard link
    evaluated[1].unlink()
    evaluated[1].symlink_to(train_files[1])  # a symbolic link
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        splits = load_splits(str(fresh_root))
    assert len(splits.eval) == 8
    assert "2 of the 8 images of the eval split" in caplog.text and str(evaluated[0]) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        load_splits(str(fresh_root / "train"))  # no eval split: nothing to compare
    assert not caplog.text
    shutil.rmtree(test)
    test.mkdir()
    for c in sorted(train.iterdir()):
        (test / c.name).symlink_to(c)  # its class folders linked: every image is a training image
    with pytest.raises(
        DataError, match=re.escape(f"all 16 images of the eval split {test} are training images of {train}")
    ):
        load_splits(str(fresh_root))
    shutil.rmtree(test)
    test.symlink_to(train)  # the same folder: refused before the training split is listed
    with pytest.raises(DataError, match=re.escape(f"the eval split {test} is the same folder as {train}")):
        load_splits(str(fresh_root))
    with caplog.at_level(logging.WARNING, logger="moco_fast"):  # train's optional final kNN goes without it
        assert load_splits(str(fresh_root), eval_split="try").eval is None
    assert "same folder" in caplog.text
    assert load_splits(str(fresh_root), eval_split="skip").eval is None


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_the_training_files_are_compared_only_where_an_eval_image_is_linked(
    fresh_root, tmp_path, monkeypatch, caplog, link
):
    # One stat per training image costs minutes on a network file system with ImageNet's million: a
    # split of plain files (also under a root reached through a link) stats its eval images only.
    from moco_fast import data

    stated = []
    real = data._file_id
    monkeypatch.setattr(data, "_file_id", lambda path: stated.append(path) or real(path))
    (tmp_path / "linked_root").symlink_to(fresh_root)
    splits = load_splits(str(tmp_path / "linked_root"))
    assert sorted(stated) == sorted(splits.eval.files)
    # one eval image linked alone (each kind found on its own): the training split is compared
    train_file, evaluated = (
        sorted((fresh_root / "train").rglob("*.jpg"))[3],
        sorted((fresh_root / "test").rglob("*.jpg"))[5],
    )
    evaluated.unlink()
    os.link(train_file, evaluated) if link == "hard" else evaluated.symlink_to(train_file)
    stated.clear()
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        splits = load_splits(str(fresh_root))
    assert "1 of the 8 images of the eval split" in caplog.text and str(evaluated) in caplog.text
    assert set(splits.train.files) <= set(stated)


def test_convert_names_the_new_skipped_files(fresh_root, tmp_path):
    from moco_fast.convert import ConvertConfig, convert

    cls = sorted((fresh_root / "train").iterdir())[0]
    os.symlink(cls / "gone.jpg", cls / "dangling.jpg")
    (cls / "extra").mkdir()
    shutil.copy(sorted(cls.iterdir())[0], cls / "extra" / "nested.jpg")
    (fresh_root / "train" / ".ipynb_checkpoints").mkdir()
    summary = convert(ConvertConfig(str(fresh_root), str(tmp_path / "shards"), format="wds", workers=1))
    assert summary.written == 16
    assert {Path(p).name for p, _ in summary.skipped} == {"dangling.jpg", "nested.jpg"}
    assert "dangling.jpg" in summary.text() and "nested.jpg" in summary.text()


# -- kNN over files that fail to decode ---------------------------------------------------------------
def colour_root(root: Path) -> Path:
    """train/: 3 blue, 3 red; test/: 4 blue, and in red/ 3 red, an unreadable file and, sorted after it,
    a blue image labelled red (the one kNN gets wrong)."""
    for i in range(3):
        solid(root / "train" / "blue" / f"{i}.png", BLUE)
        solid(root / "train" / "red" / f"{i}.png", RED)
    for i in range(4):
        solid(root / "test" / "blue" / f"{i}.png", BLUE)
    for i in range(3):
        solid(root / "test" / "red" / f"{i}.png", RED)
    (root / "test" / "red" / "3.png").write_text("junk")
    solid(root / "test" / "red" / "4.png", BLUE)
    return root


def test_knn_leaves_out_undecodable_images_instead_of_substituting(tmp_path):
    splits = load_splits(str(colour_root(tmp_path)), check=False)  # as the trainer and the sweep list them
    assert len(splits.eval) == 9  # the junk file is still listed
    with pytest.warns(UserWarning, match="3.png"):
        acc, *_ = knn_score(
            ChannelMean(), splits.train, splits.eval, AugSpec(image_size=8), torch.device("cpu"), workers=0
        )
    # 8 decodable eval images, one of them (4.png) wrong. Replacing 3.png by the next image (4.png)
    # would count the wrong one twice: 7 / 9.
    assert acc == pytest.approx(7 / 8 * 100)
    checked = load_splits(str(tmp_path), check=True)
    assert len(checked.eval) == 8
    same, *_ = knn_score(
        ChannelMean(), checked.train, checked.eval, AugSpec(image_size=8), torch.device("cpu"), workers=0
    )
    assert same == acc


@pytest.mark.parametrize("workers", [0, 2])
def test_feature_pass_covers_exactly_the_decodable_images(fresh_root, workers):
    cls = sorted((fresh_root / "train").iterdir())
    shutil.copy(sorted(cls[0].iterdir())[0], cls[0] / "0000a_trunc.jpg")
    truncate(cls[0] / "0000a_trunc.jpg")
    (cls[1] / "0000a_junk.jpg").write_text("junk")
    clean = list_images(fresh_root / "train", check=True)  # the header check catches the junk only
    assert [Path(p).name for p, _ in clean.skipped] == ["0000a_junk.jpg"]
    unchecked = list_images(fresh_root / "train", check=False)
    net, spec, cpu = ChannelMean(), AugSpec(image_size=8), torch.device("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feats, labels = extract_features(net, unchecked, spec, cpu, batch_size=3, workers=workers)
    ours = [w for w in caught if "failed to decode" in str(w.message)]
    assert len(ours) == 1  # one warning for the pass, naming both files
    assert "0000a_trunc.jpg" in str(ours[0].message) and "0000a_junk.jpg" in str(ours[0].message)
    assert "left out 2 of 18" in str(ours[0].message)
    good = [f for f in unchecked.files if "0000a_" not in f]
    assert feats.shape[0] == labels.shape[0] == len(good) == 16
    # the same features, in the same order, as a listing of the good files alone
    shutil.rmtree(fresh_root / "test")
    for c in cls:
        for f in c.glob("0000a_*"):
            f.unlink()
    ref, ref_labels = extract_features(net, list_images(fresh_root / "train"), spec, cpu, batch_size=3, workers=0)
    assert torch.equal(labels, ref_labels) and torch.allclose(feats, ref)


def test_a_split_with_nothing_decodable_is_an_error(tmp_path):
    solid(tmp_path / "a" / "0.png", RED)
    images = list_images(tmp_path, check=False)
    (tmp_path / "a" / "0.png").write_text("junk")
    with pytest.warns(UserWarning, match="0.png"), pytest.raises(DataError, match="could be decoded"):
        extract_features(ChannelMean(), images, AugSpec(image_size=8), torch.device("cpu"), workers=0)


def test_a_gpu_feature_pass_copies_its_batches_without_waiting_for_the_gpu(fresh_root, monkeypatch):
    # A copy to a GPU from pageable memory may wait for the steps queued before it, and a blocking one
    # does: the kNN monitor's host waited for the last batch's forward at every batch. On a GPU the
    # batches come pinned (by the DataLoader) and the labels' copies do not block.
    import moco_fast.knn as knn

    class Asked(Exception):
        pass

    def batches(*a, pin=False):
        raise Asked(pin)  # before anything touches a GPU this machine may not have

    images, spec = list_images(fresh_root / "train"), AugSpec(image_size=8)
    monkeypatch.setattr(knn, "eval_batches", batches)
    with pytest.raises(Asked) as e:
        extract_features(ChannelMean(), images, spec, torch.device("cuda"))
    assert e.value.args == (True,)
    monkeypatch.undo()
    assert knn.eval_batches(images, 8, 3, 0, "kNN", pin=True).loader.pin_memory
    copies, real = [], torch.Tensor.to
    monkeypatch.setattr(
        torch.Tensor, "to", lambda t, *a, **k: (t.dtype == torch.long and copies.append(k)) or real(t, *a, **k)
    )
    extract_features(ChannelMean(), images, spec, torch.device("cpu"), batch_size=3, workers=0)
    assert len(copies) == 6 and all(k == {"non_blocking": True} for k in copies)


def test_classification_eval_batches_leave_out_what_fails_to_decode(fresh_root):
    # lincls/finetune's eval split and --cached-features: each decodable image once, the others
    # named; a batch where nothing decodes is empty rather than an error or a stand-in image.
    from moco_fast.lincls import image_batches

    cls = sorted((fresh_root / "train").iterdir())
    for i in range(2):  # sorted first: the first batch of 2 holds nothing decodable
        shutil.copy(sorted(cls[0].iterdir())[0], cls[0] / f"000-{i}_trunc.jpg")
        truncate(cls[0] / f"000-{i}_trunc.jpg")
    images = list_images(fresh_root / "train", check=True)  # truncated JPEGs pass the header check
    assert len(images) == 18
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(image_batches(images, 8, False, batch_size=2, workers=0, seed=0))
    assert batches[0][0].shape == (0, 3, 8, 8) and batches[0][1].shape == (0,)
    assert sum(len(y) for _, y in batches) == 16
    assert torch.cat([y for _, y in batches]).tolist() == [
        lab for f, lab in zip(images.files, images.labels) if "_trunc" not in f
    ]
    ours = [str(w.message) for w in caught if "failed to decode" in str(w.message)]
    assert len(ours) == 1, ours  # one warning for the pass, as kNN's feature pass gives
    assert ours[0].startswith("evaluation: left out 2 of 18 images")
    assert "000-0_trunc.jpg" in ours[0] and "000-1_trunc.jpg" in ours[0]
    train = list(image_batches(images, 8, True, batch_size=2, workers=0, seed=0))  # training replaces them
    assert sum(len(y) for _, y in train) == 18


def test_torch_loader_gives_up_on_a_data_set_of_mostly_bad_images_in_one_line(tmp_path, capsys):
    # Truncated JPEGs pass the header check and fail when decoded, in a DataLoader worker: past 10%
    # (and 16 images) the run stops, as DALI's does, with the worker's message alone (not the
    # "Caught DataError in DataLoader worker process 0" and its traceback that torch wraps it in)
    from conftest import make_image_root

    from moco_fast.cli import main

    root = make_image_root(tmp_path / "data", per_class=16, classes=2, test_per_class=2)
    for f in sorted((root / "train").rglob("*.jpg"))[:20]:
        data = f.read_bytes()
        f.write_bytes(data[: int(len(data) * 0.8)])
    argv = ["train", "--data", str(root), "--loader", "torch", "--device", "cpu", "--arch", "resnet18"]
    argv += ["--batch-size", "8", "--moco-k", "16", "--bn-splits", "2", "--workers", "1", "--epochs", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*argv, "--out", str(tmp_path / "run"), "--no-final-knn"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line or "Traceback" in line]
    assert len(err) == 1, err
    assert "of the 32 images in" in err[0] and "could not be decoded (more than 10%)" in err[0]


def test_a_block_of_bad_images_under_the_limit_never_stops_the_torch_loader(tmp_path, monkeypatch):
    # one class folder of 60 truncated files among 1,000 (6%): the walk to the next good image passes
    # all 60 at once, early in the first epoch; that is no reason to stop
    import moco_fast.image_dataset as image_dataset
    from moco_fast.data import ImageList
    from moco_fast.image_dataset import ImageDataset

    files = [f"/x/{i:04d}.jpg" for i in range(1000)]
    images = ImageList(tmp_path, files, [0] * 1000, ["a"])

    def load(path):
        if 100 <= int(Path(path).stem) < 160:
            raise OSError("image file is truncated")
        return Image.new("RGB", (8, 8))

    monkeypatch.setattr(image_dataset, "load_rgb", load)
    ds = ImageDataset(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ds[100][2] == 160  # replaced by the next good one
        for i in range(1000):
            ds[i]
    assert len(ds._bad) == 60
    images = ImageList(tmp_path, files[:400], [0] * 400, ["a"])  # the same 60 are 15% of 400
    with warnings.catch_warnings(), pytest.raises(DataError, match="41 of the 400 images in"):
        warnings.simplefilter("ignore")
        ImageDataset(images)[100]


def test_a_meta_json_of_its_own_does_not_make_an_image_folder_a_shard_set(fresh_root, tmp_path):
    # Any meta.json made the folder a shard set: the final kNN was skipped without a word, and
    # --knn-every and the DALI loader refused the image folder.
    import json

    from moco_fast.loaders import LoaderArgs, create_loader
    from moco_fast.loaders.wds import is_wds_root

    (fresh_root / "meta.json").write_text(json.dumps({"description": "my data set"}))
    assert not is_wds_root(fresh_root)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "meta.json").write_text("{damaged")
    assert not is_wds_root(shards)
    (shards / "shard-000000.tar").write_bytes(b"")
    assert is_wds_root(shards)  # a damaged set: the DALI loader names its meta.json
    (shards / "meta.json").write_text(json.dumps({"format": "wds"}))
    assert is_wds_root(shards)
    # a folder loader given a shard set says which loader reads it (it said "no class subfolders")
    args = LoaderArgs(str(shards), AugSpec(), batch_size=2, device=torch.device("cpu"), workers=0)
    for loader in ("torch", "resident"):
        with pytest.raises(DataError, match=f"is a WebDataset shard set, which --loader dali reads; --loader {loader}"):
            create_loader(loader, args)


def test_a_beton_given_to_a_folder_loader_names_the_loader_that_reads_it(tmp_path, tiny_beton):
    from moco_fast.data import resolve_root

    beton = tmp_path / "x.beton"
    beton.write_bytes(b"\0" * 64)
    with pytest.raises(DataError, match=f"--data {beton} is an FFCV .beton, which training"):
        resolve_root(str(beton))
    # one without the suffix is told by its header (it was "must be a folder of images ..., got a file")
    renamed = tmp_path / "images"
    shutil.copyfile(tiny_beton, renamed)
    with pytest.raises(DataError, match=f"--data {renamed} is an FFCV .beton, which training"):
        resolve_root(str(renamed))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="must be a folder of images"):
        resolve_root(str(tmp_path / "notes.txt"))


def test_a_pipe_given_as_data_is_not_read(tmp_path):
    # 2b22886's header check opened any file that is no folder: a named pipe without a writer hung the
    # command in open(), and one with a writer lost the bytes it read; a pipe is no .beton
    from moco_fast.data import resolve_root

    pipe = tmp_path / "images"
    os.mkfifo(pipe)
    fd = os.open(pipe, os.O_RDWR | os.O_NONBLOCK)  # a writer, so that a read would not wait
    try:
        os.write(fd, b"\0" * 4096)
        with pytest.raises(DataError, match="must be a folder of images"):
            resolve_root(str(pipe))
        assert len(os.read(fd, 8192)) == 4096  # none of its bytes were taken
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["shard set", "beton"])
def test_a_shard_set_or_beton_given_where_image_folders_are_read_names_what_reads_it(tmp_path, capsys, kind):
    # knn, lincls, finetune and convert's SRC said "no class subfolders in DIR" or "needs an eval split";
    # then "which --loader dali (ffcv) reads", a flag none of them has
    from moco_fast.cli import main
    from moco_fast.lincls import load_splits_with_eval

    if kind == "beton":
        data = tmp_path / "x.beton"
        data.write_bytes(b"\0" * 64)
        said = f"{data} is an FFCV .beton, which training (train, sweep) reads with --loader ffcv"
    else:
        data = tmp_path / "shards"
        data.mkdir()
        (data / "meta.json").write_text('{"format": "wds", "classes": ["a"], "num_images": 1, "shards": []}')
        said = f"{data} is a WebDataset shard set, which training (train, sweep) reads with --loader dali"
    said += "; this reads image folders"
    for read in (load_splits, load_splits_with_eval):
        with pytest.raises(DataError, match=f"^--data {re.escape(said)}$"):
            read(str(data))
    assert main(["convert", str(data), str(tmp_path / "x"), "--format", "wds", "--workers", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"moco-fast convert: error: SRC {said}"]
