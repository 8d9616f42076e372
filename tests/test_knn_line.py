"""train's last line after a run whose data has no eval split: the `moco-fast knn` command, its
--data the image folder that convert recorded as the source of the .beton or shard set, where that
folder still has train/ and val/ or test/, else ROOT for the user to give."""

import hashlib
import json
import os

import pytest
from conftest import make_image_root
from convert_helpers import fake_beton

from moco_fast.commands.train import _report
from moco_fast.config import build_config
from moco_fast.convert import ConvertConfig, convert
from moco_fast.convert_dst import beton_fingerprint, sidecar_path
from moco_fast.monitor import converted_from

ROW = {"epoch": 1, "loss": 1.0, "img_per_s": 10.0}  # no final_knn_top1: the data had no eval split


def converted(tmp_path, monkeypatch, fmt: str, dst: str):
    """A root with train/ and val/ at tmp_path/data/tiny, converted to tmp_path/DST from within
    tmp_path/data (a relative SRC); the working folder is then tmp_path, another one."""
    root = make_image_root(tmp_path / "data" / "tiny", per_class=4, classes=2, test_per_class=2)
    (root / "test").rename(root / "val")
    monkeypatch.chdir(tmp_path / "data")
    convert(ConvertConfig("tiny", str(tmp_path / dst), format=fmt, workers=1))
    monkeypatch.chdir(tmp_path)
    return root


def last_line(cfg, capsys) -> str:
    capsys.readouterr()
    _report(ROW, cfg)
    return capsys.readouterr().out.splitlines()[-1]


def test_after_a_shard_set_the_knn_line_names_the_folder_it_was_converted_from(tmp_path, monkeypatch, capsys):
    root = converted(tmp_path, monkeypatch, "wds", "wds")
    cfg = build_config("cifar", {"data.loader": "dali", "data.data": str(tmp_path / "wds"), "runtime.out": "run"})
    assert last_line(cfg, capsys).endswith(
        f"`moco-fast knn --checkpoint run/checkpoint.pt --data {root}`, the image folder --data was converted from"
    )
    # the source moved: ROOT, and where the set came from
    (tmp_path / "data").rename(tmp_path / "moved")
    line = last_line(cfg, capsys)
    assert "--data ROOT`, ROOT with train/ and val/ or test/" in line, line
    assert line.endswith(f"({root / 'train'}, which --data was converted from, is gone)"), line
    # back, but without its eval split: ROOT (the source is there: nothing more to say)
    (tmp_path / "moved").rename(tmp_path / "data")
    (root / "val").rename(tmp_path / "val")
    assert last_line(cfg, capsys).endswith("--data ROOT`, ROOT with train/ and val/ or test/")


def test_after_a_beton_the_knn_line_names_the_folder_it_was_converted_from(tmp_path, monkeypatch, capsys):
    pytest.importorskip("ffcv")
    root = converted(tmp_path, monkeypatch, "ffcv", "tiny.beton")
    cfg = build_config("cifar", {"data.loader": "ffcv", "data.data": "tiny.beton", "runtime.out": "run"})
    assert f"--data {root}`, the image folder --data was converted from" in last_line(cfg, capsys)
    # a sidecar that describes another .beton (a convert stopped while replacing it): its source is not this one's
    side = sidecar_path(tmp_path / "tiny.beton")
    side.write_text(json.dumps({**json.loads(side.read_text()), "beton_fingerprint": "another"}))
    assert last_line(cfg, capsys).endswith("--data ROOT`, ROOT with train/ and val/ or test/")


def test_the_last_line_hashes_no_beton_that_the_run_hashed_already(tmp_path, monkeypatch):
    # The ffcv loader hashes the .beton at the run's start; the last line's look at its sidecar
    # (converted_from) hashed it once more (ImageNet's tables: ~60 MB read again at the run's end).
    # A .beton replaced since is another file: hashed again, and the sidecar does not describe it.
    beton = tmp_path / "x.beton"
    fake_beton(beton, 4, seed=0)
    hashes, blake2b = [], hashlib.blake2b
    monkeypatch.setattr(hashlib, "blake2b", lambda **kw: hashes.append(kw) or blake2b(**kw))
    fingerprint = beton_fingerprint(beton)  # the loader's, at the start
    meta = {"format": "ffcv", "source": str(tmp_path / "data" / "train"), "beton_fingerprint": fingerprint}
    sidecar_path(beton).write_text(json.dumps(meta))
    cfg = build_config("cifar", {"data.loader": "ffcv", "data.data": str(beton), "runtime.out": "run"})
    assert converted_from(cfg) == tmp_path / "data" / "train" and len(hashes) == 1
    fake_beton(tmp_path / "new.beton", 4, seed=1)
    os.replace(tmp_path / "new.beton", beton)  # as a convert --force publishes it
    assert converted_from(cfg) is None and len(hashes) == 2
