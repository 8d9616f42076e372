"""Evaluation on the CPU: linear classification, fine-tuning, export, the sweep table."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import make_image_root
from torch import nn

from moco_fast.cli import build_parser, main
from moco_fast.config import ConfigError, build_config, to_dict
from moco_fast.model import MoCo
from moco_fast.trainer import train

TINY = {
    "model.arch": "resnet18",
    "model.stem": "imagenet",
    "moco.k": 16,
    "moco.bn_splits": 2,
    "optim.batch_size": 8,
    "optim.epochs": 1,
    "runtime.device": "cpu",
    "data.workers": 0,
    "runtime.final_knn": False,
}


@pytest.fixture(scope="module")
def six_root(tmp_path_factory):
    """6 classes (so that top-5 is not trivially 100%): 6 train and 3 test images each."""
    return make_image_root(tmp_path_factory.mktemp("six"), per_class=6, classes=6, test_per_class=3)


@pytest.fixture(scope="module")
def ckpt(six_root, tmp_path_factory):
    """A one-epoch MoCo checkpoint (ResNet-18, ImageNet stem, 32 px)."""
    out = tmp_path_factory.mktemp("run")
    train(build_config("cifar", {**TINY, "data.data": str(six_root), "runtime.out": str(out)}))
    return out / "checkpoint.pt"


def save_untrained_checkpoint(path, preset="cifar", **overrides):
    """A checkpoint of a freshly built model (enough for export: load_model reads config + model)."""
    cfg = build_config(preset, {**TINY, **overrides})
    model = MoCo(cfg.model, cfg.moco, cfg.data.aug.image_size)
    torch.save({"config": to_dict(cfg), "model": model.state_dict(), "epoch": 0}, path)
    return model


# -- lincls ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cached", [False, True])
def test_lincls_reports_topk_and_checks_the_backbone(ckpt, six_root, tmp_path, capsys, cached):
    out = tmp_path / "lincls.json"
    args = ["lincls", "--checkpoint", str(ckpt), "--data", str(six_root), "--epochs", "2", "--batch-size", "8"]
    args += ["--workers", "0", "--device", "cpu", "--out", str(out)] + (["--cached-features"] if cached else [])
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert 0 <= res["top1"] <= res["top5"] <= 100
    assert res["topk"] == 5 and res["num_classes"] == 6 and res["eval_images"] == 18
    assert res["backbone_unchanged"] is True and len(res["history"]) == 2
    assert "top-1" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["lincls", "finetune"])
def test_image_counts_are_of_the_images_really_used(command, ckpt, six_root, tmp_path, capsys):
    # a truncated JPEG passes the header check and is left out of the evaluation when it fails to
    # decode: the accuracy is over 18 images, and the record and the printed line say 18, not 19
    import shutil

    root = shutil.copytree(six_root, tmp_path / "data")
    good = next((root / "test").rglob("*.jpg"))
    data = good.read_bytes()
    (good.parent / "zz_trunc.jpg").write_bytes(data[: int(len(data) * 0.8)])
    (root / "train" / good.parent.name / "zz_trunc.jpg").write_bytes(data[: int(len(data) * 0.8)])
    out = tmp_path / "r.json"
    args = [command, "--checkpoint", str(ckpt), "--data", str(root), "--epochs", "1", "--batch-size", "8"]
    args += ["--workers", "0", "--device", "cpu", "--out", str(out)]
    args += ["--cached-features"] if command == "lincls" else ["--no-save-model"]
    with pytest.warns(UserWarning, match="zz_trunc.jpg"):
        assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["eval_images"] == 18 and res["history"][-1]["eval_images"] == 18
    if command == "lincls":  # the cached features hold the decodable training images alone
        assert res["train_images"] == 36
    assert "(18 eval images" in capsys.readouterr().out


def test_lincls_learns_on_cached_features(ckpt, six_root, tmp_path):
    from moco_fast.lincls import LinclsConfig, run_lincls

    res = run_lincls(
        LinclsConfig(
            str(ckpt), str(six_root), epochs=10, lr=0.02, batch_size=12, workers=0, cached_features=True,
            device="cpu", out=str(tmp_path / "r.json"),
        )
    )  # fmt: skip
    losses = [h["loss"] for h in res["history"]]
    assert losses[-1] < losses[0] * 0.7, losses


def test_backbone_check_catches_changes(ckpt):
    from moco_fast.checkpoint import load_model
    from moco_fast.lincls import BackboneChangedError, check_unchanged, checkpoint_backbone_state

    reference = checkpoint_backbone_state(ckpt)
    backbone = load_model(ckpt)[0].encoder_q.backbone.eval()
    check_unchanged(backbone, reference)  # untouched: passes
    with torch.no_grad():
        backbone(torch.randn(4, 3, 32, 32))  # eval mode: BN statistics stay
    check_unchanged(backbone, reference)
    backbone.train()
    with torch.no_grad():
        backbone(torch.randn(4, 3, 32, 32))  # train mode: running statistics move
    with pytest.raises(BackboneChangedError, match="running_mean"):
        check_unchanged(backbone, reference)
    backbone = load_model(ckpt)[0].encoder_q.backbone
    with torch.no_grad():
        backbone.layer4[1].conv2.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(BackboneChangedError, match=r"layer4\.1\.conv2\.weight"):
        check_unchanged(backbone, reference)


def test_lincls_fails_when_the_backbone_differs(ckpt, six_root, tmp_path, monkeypatch):
    import moco_fast.lincls as lincls

    real = lincls.backbone_tensors

    def tampered(model_state):  # the reference lincls compares the backbone with at the end
        ref = real(model_state)
        ref["conv1.weight"] = ref["conv1.weight"] + 1
        return ref

    monkeypatch.setattr(lincls, "backbone_tensors", tampered)
    cfg = lincls.LinclsConfig(str(ckpt), str(six_root), epochs=1, batch_size=8, workers=0, device="cpu")
    with pytest.raises(lincls.BackboneChangedError, match=r"conv1\.weight"):
        lincls.run_lincls(cfg)
    assert not (ckpt.parent / "lincls.state.pt").exists()  # nothing to resume: the next run starts afresh


def test_lincls_outlives_its_checkpoint_being_trained_further(ckpt, six_root, tmp_path, monkeypatch, caplog):
    # `train --resume` in the checkpoint's folder rewrites checkpoint.pt while lincls runs: the frozen
    # backbone is checked against the checkpoint as lincls read it, and the result is written.
    import moco_fast.lincls as lincls

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ckpt, run / "checkpoint.pt")
    real = lincls.lr_at

    def lr_at(lr, epoch, *args):
        if epoch == 1:  # between the epochs: the run saves its next epoch (atomically, a new file)
            later = torch.load(run / "checkpoint.pt", weights_only=False)
            later["model"]["encoder_q.backbone.conv1.weight"] += 1
            torch.save({**later, "save_id": "a later save"}, tmp_path / "later.pt")
            os.replace(tmp_path / "later.pt", run / "checkpoint.pt")
        return real(lr, epoch, *args)

    monkeypatch.setattr(lincls, "lr_at", lr_at)
    cfg = lincls.LinclsConfig(str(run / "checkpoint.pt"), str(six_root), epochs=2, batch_size=8, workers=0)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        res = lincls.run_lincls(replace(cfg, device="cpu", schedule="cos"))
    assert res["backbone_unchanged"] and (run / "lincls.json").is_file()
    assert "was rewritten during linear classification (trained further?)" in caplog.text


def test_lincls_state_names_the_checkpoint_it_read(ckpt, six_root, tmp_path, monkeypatch):
    # The checkpoint is rewritten while lincls extracts its cached features (before its epochs):
    # the state between epochs names the checkpoint lincls read, so a --resume on the new one is
    # refused instead of going on with a classifier of the old backbone.
    import moco_fast.lincls as lincls
    from moco_fast import checkpoint

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ckpt, run / "checkpoint.pt")
    read = checkpoint.file_stamp(run / "checkpoint.pt")
    real_extract = lincls.extract

    def extract(*args):
        later = torch.load(run / "checkpoint.pt", weights_only=False)
        torch.save({**later, "save_id": "a later save"}, tmp_path / "later.pt")
        os.replace(tmp_path / "later.pt", run / "checkpoint.pt")
        return real_extract(*args)

    monkeypatch.setattr(lincls, "extract", extract)
    interrupt_at(monkeypatch, lincls, 1)
    cfg = lincls.LinclsConfig(str(run / "checkpoint.pt"), str(six_root), epochs=2, batch_size=8, workers=0)
    with pytest.raises(KeyboardInterrupt):
        lincls.run_lincls(replace(cfg, device="cpu", cached_features=True))
    state = torch.load(run / "lincls.state.pt", weights_only=False)
    assert state["config"]["checkpoint_stamp"] == read != checkpoint.file_stamp(run / "checkpoint.pt")


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--schedule", "sixty"], "--schedule"), (["--epochs", "0"], "positive")],
)
def test_lincls_bad_input_is_one_line(ckpt, six_root, capsys, extra, message):
    args = ["lincls", "--checkpoint", str(ckpt), "--data", str(six_root), "--device", "cpu", "--workers", "0"]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_lincls_needs_an_eval_split(ckpt, tmp_path, capsys):
    root = make_image_root(tmp_path / "d", per_class=2, classes=2)
    (root / "test").rename(tmp_path / "elsewhere")
    assert main(["lincls", "--checkpoint", str(ckpt), "--data", str(root), "--device", "cpu"]) == 2
    assert "eval split" in capsys.readouterr().err


# -- lincls and finetune: interrupted and resumed, evaluated every N epochs ---------------------------
def interrupt_at(monkeypatch, module, epoch):
    """Ctrl-C at the start of `epoch` (0-based) of lincls or finetune."""
    real = module.lr_at

    def lr_at(lr, e, *args):
        if e == epoch:
            raise KeyboardInterrupt
        return real(lr, e, *args)

    monkeypatch.setattr(module, "lr_at", lr_at)


def test_lincls_resumes_where_it_was_interrupted(ckpt, six_root, tmp_path, capsys, caplog, monkeypatch):
    import moco_fast.lincls

    def lincls(out, *extra):
        argv = ["lincls", "--checkpoint", str(ckpt), "--data", str(six_root), "--epochs", "3", "--lr", "0.5"]
        return main([*argv, "--batch-size", "8", "--workers", "0", "--device", "cpu", "--out", str(out), *extra])

    whole = tmp_path / "whole.json"
    assert lincls(whole, "--eval-every", "1") == 0
    ref = json.loads(whole.read_text())
    tops = [row["top1"] for row in ref["history"]]
    assert len(tops) == 3 and ref["top1"] == tops[-1]  # top1 stays the last epoch's
    assert ref["best_top1"] == max(tops) and ref["history"][ref["best_epoch"] - 1]["top1"] == max(tops)
    assert f"(best epoch {ref['best_epoch']}: top-1 {max(tops):.2f}%)" in capsys.readouterr().out
    # evaluating along the way draws nothing from the training's random streams
    plain = tmp_path / "plain.json"
    assert lincls(plain) == 0
    assert json.loads(plain.read_text())["top1"] == ref["top1"] and "best_epoch" not in json.loads(plain.read_text())

    # Ctrl-C in the evaluation after epoch 2: the state holds the two epochs, the second unevaluated
    out = tmp_path / "lincls.json"
    calls = []
    real_evaluate = moco_fast.lincls.evaluate

    def evaluate(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args)

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="moco_fast"):
        m.setattr(moco_fast.lincls, "evaluate", evaluate)
        assert lincls(out, "--eval-every", "1") == 130
    state = tmp_path / "lincls.state.pt"
    assert f"lincls: stopped; {state} holds epochs 1-2: --resume continues" in caplog.text
    saved = torch.load(state, weights_only=False)
    assert state.is_file() and not out.exists() and [("top1" in row) for row in saved["history"]] == [True, False]
    capsys.readouterr()
    # what would be thrown away or may not resume is refused before the checkpoint or the data is read
    with monkeypatch.context() as m:
        m.setattr(moco_fast.lincls, "run_lincls", lambda cfg: pytest.fail("ran"))
        assert lincls(out, "--eval-every", "1") == 2  # starting over would drop two epochs silently
        assert f"{state} holds an interrupted lincls run: --resume continues it" in capsys.readouterr().err
        assert lincls(out, "--eval-every", "1", "--resume", "--lr", "0.1") == 2
        assert "was run with other settings: --lr 0.5 (now 0.1)" in capsys.readouterr().err
        assert lincls(out, "--eval-every", "1", "--resume", "--amp", "bf16") == 2  # other features
        assert "--amp 'auto' (now 'bf16')" in capsys.readouterr().err
        # the checkpoint trained further since (`train --resume` keeps lincls.state.pt): another backbone
        # (another save of the run); the same checkpoint copied (a new mtime) is the same backbone
        original = ckpt.read_bytes()
        torch.save({**torch.load(ckpt, weights_only=False), "save_id": "a later save"}, ckpt)
        try:
            assert lincls(out, "--eval-every", "1", "--resume") == 2
            assert "the checkpoint has changed since (trained further?)" in capsys.readouterr().err
        finally:
            ckpt.write_bytes(original)
    partial = tmp_path / ".lincls.state.pt.x1y2.tmp"  # a save that a kill cut short
    partial.write_bytes(b"0" * 100)
    # the same settings spelt otherwise (a trailing slash, the run folder for its checkpoint) resume;
    # the owed evaluation of epoch 2 runs first
    argv = ["lincls", "--checkpoint", str(ckpt.parent), "--data", f"{six_root}/", "--epochs", "3", "--lr", "0.5"]
    argv += ["--batch-size", "8", "--workers", "0", "--device", "cpu", "--out", str(out)]
    assert main([*argv, "--eval-every", "1", "--resume"]) == 0
    res = json.loads(out.read_text())
    assert res["history"] == ref["history"] and res["top1"] == ref["top1"]  # --workers 0: exactly
    assert res["wall_s"] > saved["wall_s"]  # the interrupted part counts
    assert not state.exists() and not partial.exists()
    capsys.readouterr()
    assert lincls(out, "--resume") == 2  # nothing to continue, and a finished result to overwrite
    assert f"--resume: {out} is a finished lincls result and there is no state to continue" in capsys.readouterr().err


@pytest.mark.slow
def test_lincls_resumed_with_workers_ends_as_an_uninterrupted_run(ckpt, six_root, tmp_path, monkeypatch):
    # the DataLoader workers persist across epochs and their random streams are not saved: each
    # image's crop and flip come from (seed, epoch, index) alone (seeded_images), and the order from
    # the saved generator, so a run resumed with workers draws what the uninterrupted one drew
    import moco_fast.lincls

    made, real = [], moco_fast.lincls.new_classifier
    monkeypatch.setattr(moco_fast.lincls, "new_classifier", lambda *a: made.append(real(*a)) or made[-1])

    def lincls(out, *extra):
        argv = ["lincls", "--checkpoint", str(ckpt), "--data", str(six_root), "--epochs", "2", "--lr", "0.5"]
        return main([*argv, "--batch-size", "8", "--workers", "2", "--device", "cpu", "--out", str(out), *extra])

    assert lincls(tmp_path / "whole.json") == 0
    with monkeypatch.context() as m:
        interrupt_at(m, moco_fast.lincls, 1)
        assert lincls(tmp_path / "l.json") == 130
    assert lincls(tmp_path / "l.json", "--resume") == 0
    whole, _, resumed = made
    assert torch.equal(whole.weight, resumed.weight) and torch.equal(whole.bias, resumed.bias)
    ref, res = (json.loads((tmp_path / name).read_text()) for name in ("whole.json", "l.json"))
    assert res["history"] == ref["history"]


def test_a_stop_behind_a_dataloader_error_still_says_how_to_resume(tmp_path, caplog, monkeypatch):
    # SIGTERM to the process group kills the DataLoader workers too: the error that reaches the loop
    # can be the DataLoader's, with the Terminated behind it; the hint must still come
    import time

    from moco_fast.classifier_epochs import EpochLoop
    from moco_fast.lincls import LinclsConfig

    def one_epoch(epoch):
        if epoch == 1:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.") from None
        return {"epoch": epoch + 1, "lr": 0.1, "loss": 1.0}

    cfg = LinclsConfig(str(tmp_path / "none.pt"), epochs=3, out=str(tmp_path / "l.json"))
    loop = EpochLoop("lincls", cfg, tmp_path / "l.json", {"classifier": nn.Linear(2, 2)}, None, time.perf_counter())
    with caplog.at_level(logging.WARNING, logger="moco_fast"), pytest.raises(RuntimeError):
        loop.run(one_epoch, lambda: (50.0, 90.0, 10))
    assert f"lincls: stopped; {tmp_path / 'l.state.pt'} holds epochs 1-1: --resume continues" in caplog.text
    # stopped inside the save of epoch 2: the file still holds epoch 1 alone, and says so
    import moco_fast.classifier_epochs as ce

    real_save, saves = ce.ckpt.save_atomic, []

    def save_atomic(state, path):
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt
        real_save(state, path)

    (tmp_path / "l.state.pt").unlink()
    caplog.clear()
    loop = EpochLoop("lincls", cfg, tmp_path / "l.json", {"classifier": nn.Linear(2, 2)}, None, time.perf_counter())
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="moco_fast"):
        m.setattr(ce.ckpt, "save_atomic", save_atomic)
        with pytest.raises(KeyboardInterrupt):
            loop.run(lambda e: {"epoch": e + 1, "lr": 0.1, "loss": 1.0}, lambda: (50.0, 90.0, 10))
    assert "holds epochs 1-1: --resume continues" in caplog.text


def test_the_loop_itself_refuses_a_state_of_other_settings(tmp_path):
    # the commands check before reading data; a caller of the library (the sweep) meets the loop's check
    import time

    from moco_fast.classifier_epochs import EpochLoop
    from moco_fast.lincls import LinclsConfig

    def loop(**kw):
        cfg = LinclsConfig(str(tmp_path / "none.pt"), epochs=2, out=str(tmp_path / "l.json"), **kw)
        net = nn.Linear(2, 2)
        return EpochLoop("lincls", cfg, tmp_path / "l.json", {"classifier": net}, None, time.perf_counter())

    def stop_in_epoch_2(epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return {"epoch": epoch + 1, "lr": 0.1, "loss": 1.0}

    with pytest.raises(KeyboardInterrupt):
        loop().run(stop_in_epoch_2, lambda: (50.0, 90.0, 10))
    with pytest.raises(ConfigError, match=r"was run with other settings: --lr 30.0 \(now 1.0\)"):
        loop(lr=1.0, resume=True).run(lambda e: {"epoch": e + 1, "lr": 0.1, "loss": 1.0}, lambda: (50.0, 90.0, 10))


@pytest.mark.parametrize("command", ["lincls", "finetune"])
def test_a_second_run_into_the_same_result_stops_at_once(command, ckpt, six_root, tmp_path, capsys):
    from moco_fast.run_folder import hold_output

    out = tmp_path / "l.json"
    argv = [command, "--checkpoint", str(ckpt), "--data", str(six_root), "--epochs", "1", "--batch-size", "8"]
    with hold_output(out, command):  # as a first run holds it
        assert main([*argv, "--workers", "0", "--device", "cpu", "--out", str(out)]) == 2
    assert f"{out}: another moco-fast {command} is writing it now" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # the lock file goes with the run that held it


def test_the_output_lock_follows_a_lock_file_its_holder_removed(tmp_path, monkeypatch):
    # Between this run's open and its flock, the run that held the lock ended and removed the file: a
    # lock on that unlinked file guards nothing, so the run must lock the file now at the path.
    import moco_fast.run_folder as rf

    out = tmp_path / "l.json"
    lock = tmp_path / ".l.state.pt.lock"
    real_flock, tries = rf._try_flock, []

    def holder_ends_first(fd, what):
        tries.append(fd)
        if len(tries) == 1:
            lock.unlink()
        return real_flock(fd, what)

    with monkeypatch.context() as m:
        m.setattr(rf, "_try_flock", holder_ends_first)
        with rf.hold_output(out, "lincls"):
            assert len(tries) == 2 and lock.is_file()
            with pytest.raises(rf.RunFolderBusy):  # a second run finds the file this one holds
                with rf.hold_output(out, "lincls"):
                    pass
    assert not lock.exists()


def test_a_damaged_state_says_how_to_go_on(ckpt, six_root, tmp_path, capsys):
    (tmp_path / "l.state.pt").write_bytes(b"")  # a disk that filled up, say
    argv = ["lincls", "--checkpoint", str(ckpt), "--data", str(six_root), "--epochs", "1", "--batch-size", "8"]
    argv += ["--workers", "0", "--device", "cpu", "--out", str(tmp_path / "l.json")]
    assert main(argv) == 2
    assert "--resume continues it" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "l.state.pt" in err[0] and err[0].endswith("delete it to start over"), err


@pytest.mark.slow
def test_finetune_resumes_where_it_was_interrupted(ckpt, six_root, tmp_path, monkeypatch):
    import moco_fast.finetune

    def finetune(out, *extra):
        argv = ["finetune", "--checkpoint", str(ckpt), "--data", str(six_root), "--epochs", "2", "--lr", "0.05"]
        # with DataLoader workers: they persist across epochs, and the crops still come out the same
        return main([*argv, "--batch-size", "8", "--workers", "2", "--device", "cpu", "--out", str(out), *extra])

    assert finetune(tmp_path / "whole.json") == 0
    out = tmp_path / "ft.json"
    with monkeypatch.context() as m:
        interrupt_at(m, moco_fast.finetune, 1)
        assert finetune(out) == 130
    assert (tmp_path / "ft.state.pt").is_file()
    reads = []  # (file, mapped): the command's early check maps the state, the loop reads it whole once
    real_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda f, *a, **kw: reads.append((Path(f).name, kw.get("mmap"))) or real_load(f, *a, **kw)
    )
    assert finetune(out, "--resume") == 0
    monkeypatch.undo()
    assert [mmap for name, mmap in reads if name == "ft.state.pt"] == [True, False]
    ref, res = (json.loads((tmp_path / name).read_text()) for name in ("whole.json", "ft.json"))
    assert res["history"] == ref["history"] and res["top1"] == ref["top1"]
    whole, resumed = (torch.load(tmp_path / name) for name in ("whole.pt", "ft.pt"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)  # the network and its BN statistics
    assert not (tmp_path / "ft.state.pt").exists()


# -- finetune -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_finetune_from_moco_and_from_scratch(ckpt, six_root, tmp_path):
    from moco_fast.finetune import FinetuneConfig, build_network, fine_tune
    from moco_fast.lincls import checkpoint_backbone_state

    base = dict(checkpoint=str(ckpt), data=str(six_root), epochs=1, batch_size=8, workers=0, device="cpu", lr=0.05)
    base["out"] = str(tmp_path / "ft.json")  # its state stays beside it (fine_tune leaves it to its caller)
    ref = checkpoint_backbone_state(ckpt)
    net, *_ = build_network(FinetuneConfig(**base), 6)
    assert torch.equal(net[0].conv1.weight, ref["conv1.weight"])  # starts from the MoCo backbone
    scratch, *_ = build_network(FinetuneConfig(**base, from_scratch=True), 6)
    assert not torch.equal(scratch[0].conv1.weight, ref["conv1.weight"])
    assert type(scratch[0].layer1[0].bn1) is nn.BatchNorm2d

    res, tuned = fine_tune(FinetuneConfig(**base))
    assert res["init"] == "moco" and 0 <= res["top1"] <= res["top5"] <= 100
    # Every layer trained, BatchNorm included (weights and running statistics).
    state = tuned[0].state_dict()
    for key in ("conv1.weight", "layer1.0.bn1.weight", "layer4.1.bn2.running_mean"):
        assert not torch.equal(state[key], ref[key]), key
    res, _ = fine_tune(FinetuneConfig(**{**base, "out": str(tmp_path / "scratch.json")}, from_scratch=True))
    assert res["init"] == "scratch"


def test_finetune_cli(ckpt, six_root, tmp_path, capsys):
    out = tmp_path / "ft.json"
    args = ["finetune", "--checkpoint", str(ckpt), "--data", str(six_root), "--epochs", "1", "--batch-size", "8"]
    assert main([*args, "--workers", "0", "--device", "cpu", "--out", str(out), "--schedule", "1"]) == 0
    res = json.loads(out.read_text())
    assert res["init"] == "moco" and "fine-tuning from moco" in capsys.readouterr().out
    # the network that ran, the checkpoint's, not --arch's default (resnet50)
    assert (res["config"]["arch"], res["config"]["stem"]) == ("resnet18", "imagenet")
    assert main(["finetune", "--data", str(six_root), "--device", "cpu"]) == 2
    assert "--from-scratch" in capsys.readouterr().err


# -- export ---------------------------------------------------------------------------------------
def test_export_torchvision_round_trip(ckpt, tmp_path, capsys):
    from moco_fast.checkpoint import load_model

    out = tmp_path / "r18.pth"
    assert main(["export", str(ckpt), "--format", "torchvision", "--output", str(out)]) == 0
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(torch.load(out), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    net.fc = nn.Identity()
    ours = load_model(ckpt)[0].backbone()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), ours.eval()(x))
    # No silent overwrite.
    assert main(["export", str(ckpt), "--format", "torchvision", "--output", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--format", "torchvision", "--output", str(out), "--force"]) == 0


def test_export_cifar_stem(tmp_path, capsys):
    path = tmp_path / "cifar.pt"
    model = save_untrained_checkpoint(path, **{"model.stem": "cifar", "moco.shuffle_bn": True})
    out = tmp_path / "r18.pth"
    assert main(["export", str(path), "--format", "torchvision", "--output", str(out)]) == 0
    assert "CIFAR stem" in capsys.readouterr().out
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    net.load_state_dict(torch.load(out), strict=False)
    net.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model.backbone().eval()(x))  # split BN state is plain BN
    assert main(["export", str(path), "--format", "detectron2", "--output", str(tmp_path / "d2.pkl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CIFAR stem" in err[0]


def test_export_detectron2_names_resnet50(tmp_path):
    path = tmp_path / "r50.pt"
    model = save_untrained_checkpoint(path, "v2", **{"model.arch": "resnet50", "model.stem": "imagenet"})
    out = tmp_path / "r50.pkl"
    assert main(["export", str(path), "--format", "detectron2", "--output", str(out)]) == 0
    with open(out, "rb") as fh:
        obj = pickle.load(fh)
    assert obj["__author__"] == "MOCO" and obj["matching_heuristics"] is True
    keys = obj["model"]
    # Names that the official convert-pretrain-to-detectron2.py produces for a ResNet-50.
    for key in (
        "stem.conv1.weight",
        "stem.conv1.norm.weight",
        "stem.conv1.norm.running_var",
        "res2.0.conv1.weight",
        "res2.0.conv3.norm.bias",
        "res2.0.shortcut.weight",
        "res2.0.shortcut.norm.running_mean",
        "res3.3.conv2.norm.weight",
        "res4.5.conv3.weight",
        "res5.0.shortcut.norm.weight",
        "res5.2.conv3.norm.running_var",
    ):
        assert key in keys, key
    assert not [k for k in keys if any(s in k for s in ("layer", "bn", "downsample", "fc", "encoder", "head"))]
    assert len(keys) == len(torchvision.models.resnet50().state_dict()) - 2  # everything but fc
    ref = model.encoder_q.backbone.state_dict()
    assert (keys["res4.5.conv3.weight"] == ref["layer3.5.conv3.weight"].numpy()).all()
    assert (keys["stem.conv1.norm.running_mean"] == ref["bn1.running_mean"].numpy()).all()


# -- sweep ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_two_settings_table_and_resume(six_root, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--out", str(out), "--moco-m", "0,0.99", "--device", "cpu", "--lincls-epochs", "2", "--"]
    args += ["--preset", "cifar", "--data", str(six_root), "--arch", "resnet18", "--stem", "imagenet"]
    # --workers left at its default (auto, -1): the kNN and linear steps must resolve it too.
    args += ["--epochs", "1", "--batch-size", "8", "--moco-k", "16", "--bn-splits", "2"]
    assert main(args) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["m"] for r in rows] == [0.0, 0.99]
    for r in rows:
        assert r["epochs"] == 1 and r["k"] == 16 and r["loss"] > 0
        assert 0 <= r["pretext_acc"] <= 100 and 0 <= r["knn_top1"] <= 100 and 0 <= r["knn_head_top1"] <= 100
        assert 0 <= r["linear_top1"] <= 100
    table = (out / "sweep.md").read_text().splitlines()
    assert len(table) == 4 and "kNN top-1 % (backbone)" in table[0]
    assert (out / "sweep.png").stat().st_size > 0
    assert "| moco | 16 | 0 |" in capsys.readouterr().out
    # A second run skips the finished settings: no training, the same rows.
    metrics = (out / rows[0]["name"] / "metrics.jsonl").read_text()
    assert main(args) == 0
    assert (out / rows[0]["name"] / "metrics.jsonl").read_text() == metrics
    assert json.loads((out / "sweep.json").read_text()) == rows
    # A setting that trained but lost its result.json (a crash after training) is completed from its
    # checkpoint without training again.
    (out / rows[0]["name"] / "result.json").unlink()
    assert main(args) == 0
    again = json.loads((out / "sweep.json").read_text())
    assert (out / rows[0]["name"] / "metrics.jsonl").read_text() == metrics
    assert again[0]["loss"] == rows[0]["loss"] and again[0]["knn_top1"] == rows[0]["knn_top1"]


# The base `moco-fast train` flags of the sweep tests: ResNet-18 at 32 px, one epoch of batches of 8.
SWEEP_TRAIN = ["--preset", "cifar", "--arch", "resnet18", "--stem", "imagenet", "--epochs", "1"]
SWEEP_TRAIN += ["--batch-size", "8", "--moco-k", "16", "--bn-splits", "2", "--workers", "0"]
SWEEP_RUN = "moco_K16_m0.99_sbn-on"


def sweep_args(out, root, *grid, train=()):
    """`moco-fast sweep` on `root` into `out`: the grid flags, then the base train flags (and `train`)."""
    return ["sweep", "--out", str(out), "--device", "cpu", *grid, "--", "--data", str(root), *SWEEP_TRAIN, *train]


@pytest.fixture(scope="module")
def finished_sweep(six_root, tmp_path_factory):
    """A sweep folder with one finished setting (moco, K 16, m 0.99); tests work on copies."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    assert main(sweep_args(out, six_root, "--moco-m", "0.99")) == 0
    return out


def last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.slow
def test_sweep_reuses_a_result_only_for_the_same_training_settings(
    finished_sweep, six_root, tiny_root, tmp_path, capsys
):
    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    run = out / SWEEP_RUN
    metrics = (run / "metrics.jsonl").read_text()
    # The same settings (a runtime flag aside): reused, nothing trains.
    assert main(sweep_args(out, six_root, "--moco-m", "0.99", train=["--log-every", "3"])) == 0
    assert (run / "metrics.jsonl").read_text() == metrics
    capsys.readouterr()
    # Other training settings: one line that names them, and the finished run is neither continued
    # (more epochs would have resumed it under another schedule) nor overwritten.
    for flags, field in (
        (["--lr", "0.1"], "optim.lr 0.03 -> 0.1"),
        (["--epochs", "2"], "optim.epochs 1 -> 2"),
        (["--data", str(tiny_root)], "data.data"),
        (["--weight-decay", "0.01"], "optim.weight_decay"),
    ):
        assert main(sweep_args(out, six_root, "--moco-m", "0.99", train=flags)) == 2
        err = last_error(capsys)
        assert err.startswith("moco-fast sweep: error:") and "a finished run" in err, err
        assert field in err and "--redo" in err and "--out" in err, err
        assert (run / "metrics.jsonl").read_text() == metrics
        assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == 1
    # An interrupted run (no result.json yet) is not continued under other settings either.
    (run / "result.json").unlink()
    assert main(sweep_args(out, six_root, "--moco-m", "0.99", train=["--epochs", "2"])) == 2
    err = last_error(capsys)
    assert "holds a run trained with other settings" in err and "optim.epochs 1 -> 2" in err and "--redo" in err, err
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == 1
    # --redo deletes the old run and trains the setting again, from scratch.
    assert main(sweep_args(out, six_root, "--moco-m", "0.99", "--redo", train=["--lr", "0.1"])) == 0
    res = json.loads((run / "result.json").read_text())
    assert res["config"]["optim.lr"] == 0.1 and res["epochs"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # no row of the old run
    assert [r["name"] for r in json.loads((out / "sweep.json").read_text())] == [SWEEP_RUN]


@pytest.mark.slow
def test_sweep_table_covers_every_grid_in_the_folder(finished_sweep, six_root, tmp_path, capsys):
    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    first = json.loads((out / "sweep.json").read_text())
    # A second grid into the same folder: end-to-end (K is the batch) and a memory bank with a K
    # larger than the 36 training images (it draws from the bank, so 36 at most).
    assert main(sweep_args(out, six_root, "--mechanism", "end-to-end,memory-bank", "--moco-k", "64")) == 0
    rows = json.loads((out / "sweep.json").read_text())
    names = [SWEEP_RUN, "end-to-end_Kbatch_sbn-on", "memory-bank_K64_sbn-on"]
    assert [r["name"] for r in rows] == names
    assert rows[0] == first[0]
    e2e, bank = rows[1], rows[2]
    assert e2e["k"] == 8 and bank["k"] == 36 and bank["k_asked"] == 64 and "k_asked" not in rows[0]
    table = (out / "sweep.md").read_text()
    assert len(table.splitlines()) == 2 + 3
    assert "| moco | 16 | 0.99 |" in table
    assert "| end-to-end | 8 (batch) |" in table and "| memory-bank | 36 (bank size; 64 asked) |" in table
    assert table in capsys.readouterr().out
    # The first grid again: nothing trains, and the table keeps all three rows in their order.
    assert main(sweep_args(out, six_root, "--moco-m", "0.99")) == 0
    assert json.loads((out / "sweep.json").read_text()) == rows
    assert (out / "sweep.md").read_text() == table


def test_sweep_tells_a_copied_checkpoint_from_one_trained_further(finished_sweep, six_root, tmp_path, caplog):
    out = shutil.copytree(finished_sweep, tmp_path / "sweep", copy_function=shutil.copy)  # new mtimes, as cp -r
    run = out / SWEEP_RUN
    result = (run / "result.json").read_text()
    with caplog.at_level(logging.INFO, logger="moco_fast"):
        assert main(sweep_args(out, six_root, "--moco-m", "0.99")) == 0
    assert (run / "result.json").read_text() == result  # reused: not evaluated again
    assert "changed since" not in caplog.text
    caplog.clear()
    # another save of the run (`train --resume` there): evaluated again
    torch.save(
        {**torch.load(run / "checkpoint.pt", weights_only=False), "save_id": "a later save"}, run / "checkpoint.pt"
    )
    with caplog.at_level(logging.INFO, logger="moco_fast"):
        assert main(sweep_args(out, six_root, "--moco-m", "0.99")) == 0
    assert "its checkpoint changed since its result was written" in caplog.text
    assert json.loads((run / "result.json").read_text())["checkpoint_stamp"] == ["save_id", "a later save"]


def test_sweep_treats_a_cut_short_result_as_unfinished(finished_sweep, six_root, tmp_path, caplog, monkeypatch):
    from moco_fast import checkpoint

    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    run = out / SWEEP_RUN
    metrics = (run / "metrics.jsonl").read_text()
    good = json.loads((run / "result.json").read_text())
    (run / "result.json").write_text(json.dumps(good)[:50])  # left by a crash of an older version
    written = []
    real = checkpoint.atomic_write
    monkeypatch.setattr(checkpoint, "atomic_write", lambda path, write: (written.append(path), real(path, write)))
    with caplog.at_level(logging.INFO, logger="moco_fast"):
        assert main(sweep_args(out, six_root, "--moco-m", "0.99")) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(run / "result.json") in w for w in warnings), warnings
    # Completed from its checkpoint, without training again.
    assert (run / "metrics.jsonl").read_text() == metrics
    again = json.loads((run / "result.json").read_text())
    assert again["loss"] == good["loss"] and again["knn_top1"] == good["knn_top1"]
    assert again["config"] == good["config"]
    # The result and the table are replaced whole, never written in place.
    assert {run / "result.json", out / "sweep.md", out / "sweep.json"} <= set(written)
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and "tmp" in p.name]


def test_sweep_linear_classifier_lr(finished_sweep, six_root, tmp_path, monkeypatch):
    from moco_fast import lincls

    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    run = out / SWEEP_RUN
    metrics = (run / "metrics.jsonl").read_text()
    seen = []
    monkeypatch.setattr(lincls, "run_lincls", lambda cfg: seen.append(cfg) or {"top1": 12.5})
    args = sweep_args(out, six_root, "--moco-m", "0.99", "--lincls-epochs", "3", "--lincls-lr", "0.5")
    assert main(args) == 0
    assert [(c.epochs, c.lr, c.cached_features) for c in seen] == [(3, 0.5, True)]
    assert Path(seen[0].out).name == "sweep_lincls.json"  # `moco-fast lincls`'s lincls.json is not replaced
    # Other evaluation flags evaluate the finished checkpoint again; they do not train it again.
    assert (run / "metrics.jsonl").read_text() == metrics
    res = json.loads((run / "result.json").read_text())
    assert res["linear_top1"] == 12.5 and res["lincls_epochs"] == 3 and res["lincls_lr"] == 0.5
    assert main(args) == 0 and len(seen) == 1  # the same flags again: reused
    assert main(sweep_args(out, six_root, "--moco-m", "0.99", "--lincls-epochs", "3", "--lincls-lr", "0")) == 2


def test_sweep_continues_or_restarts_a_linear_classifier_it_left(
    finished_sweep, six_root, tmp_path, monkeypatch, caplog
):
    # Interrupted in a setting's linear classifier, the sweep continues it with the same flags and
    # starts it over with others (its own state: no error for the user to clear).
    import moco_fast.lincls

    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    state = out / SWEEP_RUN / "sweep_lincls.state.pt"
    args = sweep_args(out, six_root, "--moco-m", "0.99", "--lincls-epochs", "2")
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="moco_fast"):
        interrupt_at(m, moco_fast.lincls, 1)
        assert main(args) == 130
    assert state.is_file()
    # what continues it is the sweep, not lincls's --resume
    assert f"lincls: stopped; {state} holds epochs 1-1: the same sweep command continues it" in caplog.text
    assert f"sweep: stopped in {SWEEP_RUN}; the same sweep command continues" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="moco_fast"):
        assert main(args) == 0
    assert "--resume: lincls continues after epoch 1 of 2" in caplog.text and not state.exists()
    with monkeypatch.context() as m:
        interrupt_at(m, moco_fast.lincls, 1)
        assert main(sweep_args(out, six_root, "--moco-m", "0.99", "--lincls-epochs", "4")) == 130
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="moco_fast"):
        assert main(sweep_args(out, six_root, "--moco-m", "0.99", "--lincls-epochs", "3")) == 0
    assert "its linear classifier stopped with other settings or checkpoint; it starts over" in caplog.text
    res = json.loads((out / SWEEP_RUN / "result.json").read_text())
    assert res["lincls_epochs"] == 3 and not state.exists()


def test_sweep_help_is_wrapped_and_names_every_flag(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= 100
    parser = next(a for a in build_parser()._actions if a.dest == "command").choices["sweep"]
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.option_strings[-1] in text, action.option_strings


def test_sweep_grid_merges_repeated_runs():
    from moco_fast.sweep import expand

    settings = expand([256, 4096], [0.0, 0.99], ["moco", "end-to-end", "memory-bank"], [True])
    names = [s.name for s in settings]
    assert len(names) == len(set(names)) == 4 + 1 + 2
    assert "end-to-end_Kbatch_sbn-on" in names and "memory-bank_K4096_sbn-on" in names


def test_sweep_rejects_a_bad_setting_before_training(tiny_root, tmp_path, capsys):
    args = ["sweep", "--out", str(tmp_path), "--moco-k", "4,64", "--", "--data", str(tiny_root)]
    assert main([*args, "--batch-size", "8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "moco_K4_" in err and "smaller than the keys" in err
    assert not any(tmp_path.iterdir())  # nothing trained


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    import sys

    from moco_fast.sweep_table import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot([{"name": "a", "knn_top1": 50.0}], tmp_path / "p.png") is False
    assert not (tmp_path / "p.png").exists()


# -- learning ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_short_run_knn_beats_random_init(tmp_path):
    """192 MoCo steps (ResNet-18, ImageNet stem, 32 px, 4 classes x 100 images) beat a random backbone.

    Measured on the 2-core CPU (docs/experiments.md): seeds 0/1/2 gave kNN 51.5/49.5/49.0% against
    41.0/43.3/44.2% for random init, ~70 s each. Split BN needs enough images per split: with 4 per
    split (batch 32, 8 splits) the same run does not learn.
    """
    root = make_image_root(tmp_path / "data", per_class=100, classes=4, test_per_class=100)
    cfg = build_config(
        "demo",
        {
            "data.data": str(root),
            "runtime.out": str(tmp_path / "run"),
            "runtime.device": "cpu",
            "runtime.channels_last": False,  # faster on the CPU
            "data.workers": 1,
            "optim.epochs": 16,
            "optim.batch_size": 32,
            "optim.lr": 0.24,  # 0.03 for this batch of 32
            "moco.k": 256,
            "moco.bn_splits": 2,
            "runtime.knn_baseline": True,
            "runtime.seed": 0,
        },
    )
    row = train(cfg)
    assert row["final_knn_top1"] > row["random_knn_top1"], row


@pytest.mark.slow
def test_sweep_follows_a_run_trained_further_in_its_folder(finished_sweep, six_root, tmp_path, capsys):
    # `train --resume --epochs 2` in a setting's folder: its result.json describes the old checkpoint
    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    run = out / SWEEP_RUN
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--device", "cpu", "--no-final-knn"]) == 0
    capsys.readouterr()
    # the grid as it was (1 epoch): not the stale 1-epoch row, an error naming the difference
    assert main(sweep_args(out, six_root, "--moco-m", "0.99")) == 2
    assert "optim.epochs 2 -> 1" in last_error(capsys)
    # the grid at 2 epochs: the checkpoint is evaluated (no training), its row says 2 epochs
    metrics = (run / "metrics.jsonl").read_text()
    assert main(sweep_args(out, six_root, "--moco-m", "0.99", train=["--epochs", "2"])) == 0
    assert (run / "metrics.jsonl").read_text() == metrics
    res = json.loads((run / "result.json").read_text())
    assert res["epochs"] == 2 and res["loss"] == json.loads(metrics.splitlines()[-1])["loss"]
    rows = [json.loads(line) for line in metrics.splitlines()]
    assert res["wall_s"] >= sum(r["epoch_time_s"] for r in rows)  # both epochs' training counted


def test_sweep_stops_before_training_on_what_would_fail_later(six_root, tmp_path, capsys, monkeypatch):
    from moco_fast import sweep

    trained = []
    monkeypatch.setattr(sweep, "_train", lambda cfg: trained.append(cfg))
    out = tmp_path / "sweep"
    # the logs of a run without its checkpoint (it died in its first epoch)
    (out / SWEEP_RUN).mkdir(parents=True)
    (out / SWEEP_RUN / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n')
    assert main(sweep_args(out, six_root, "--moco-m", "0.5,0.99")) == 2
    assert "--redo" in last_error(capsys) and not trained
    # --redo with a device this machine lacks, or missing data: nothing is deleted
    if not torch.cuda.is_available():
        cuda = ["sweep", "--out", str(out), "--device", "cuda", "--moco-m", "0.99", "--redo", "--"]
        assert main([*cuda, "--data", str(six_root), *SWEEP_TRAIN]) == 2
        assert (out / SWEEP_RUN / "metrics.jsonl").is_file()
    assert main(sweep_args(out, tmp_path / "nowhere", "--moco-m", "0.99", "--redo")) == 2
    assert (out / SWEEP_RUN / "metrics.jsonl").is_file() and not trained
    # a linear classifier needs an eval split: said before the synthetic loader trains
    args = ["sweep", "--out", str(tmp_path / "s2"), "--device", "cpu", "--lincls-epochs", "1", "--"]
    assert main([*args, "--loader", "synthetic", *SWEEP_TRAIN]) == 2
    assert "--lincls-epochs needs an image folder" in last_error(capsys) and not trained


# -- sweep: grid flags and folder names -------------------------------------------------------------
def stub_sweep_runs(monkeypatch) -> list:
    """Replaces a sweep setting's training and evaluation with stand-ins; returns the settings trained."""
    from moco_fast import sweep

    trained = []
    monkeypatch.setattr(sweep, "_train", lambda cfg: trained.append(cfg))
    monkeypatch.setattr(
        sweep, "evaluate_setting", lambda cfg, s, *a: {"name": s.name, "mechanism": s.mechanism, "k": s.k, "m": s.m}
    )
    return trained


def test_sweep_distinct_momenta_never_share_a_folder(six_root, tmp_path, capsys, monkeypatch):
    from moco_fast import sweep

    # the usual values keep the folder names they always had, so that earlier sweeps are found again
    names = [s.name for s in sweep.expand([16], [0.99, 0.999, 0.0, 0.9, 1.0, 1e-05], ["moco"], [True])]
    assert names == [f"moco_K16_m{m}_sbn-on" for m in ("0.99", "0.999", "0", "0.9", "1", "1e-05")]
    trained = stub_sweep_runs(monkeypatch)
    out = tmp_path / "sweep"
    # `{:g}` wrote both as m1: the second setting reused the first one's run, one row for two settings
    assert main(sweep_args(out, six_root, "--moco-m", "1,0.9999999")) == 0
    folders = [Path(cfg.runtime.out).name for cfg in trained]
    assert folders == ["moco_K16_m1_sbn-on", "moco_K16_m0.9999999_sbn-on"]
    assert [r["m"] for r in json.loads((out / "sweep.json").read_text())] == [1.0, 0.9999999]
    table = (out / "sweep.md").read_text()
    assert "| moco | 16 | 1 |" in table and "| moco | 16 | 0.9999999 |" in table
    # the guard: settings that would share a folder stop the sweep before anything trains
    monkeypatch.setattr(sweep, "number_text", lambda v: f"{v:g}")
    assert main(sweep_args(tmp_path / "s2", six_root, "--moco-m", "1,0.9999999")) == 2
    assert "would share the folder" in last_error(capsys) and len(trained) == 2
    assert not (tmp_path / "s2").exists()


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (["--moco-k", ","], "--moco-k ',' is an empty list"),
        (["--moco-m", ""], "--moco-m '' is an empty list"),
        (["--shuffle-bn", " , "], "--shuffle-bn ' , ' is an empty list"),
        (["--moco-k", "16,,64"], "(got '16,,64': an empty item)"),
        (["--moco-k", "16,4.5"], "'4.5' is not an integer"),
        (["--moco-m", "0.9,x"], "'x' is not a number"),
        (["--shuffle-bn", "on,maybe"], "'maybe' is not on or off"),
    ],
)
def test_sweep_empty_or_malformed_grid_lists_are_one_line_errors(
    grid, message, six_root, tmp_path, capsys, monkeypatch
):
    trained = stub_sweep_runs(monkeypatch)
    assert main(sweep_args(tmp_path / "sweep", six_root, *grid)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moco-fast sweep: error:") and message in err[0], err
    assert not trained and not (tmp_path / "sweep").exists()


def test_sweep_says_train_flags_go_after_the_separator(six_root, tmp_path, capsys):
    for argv in (["--data", str(six_root)], ["--moco-k", "16", "--data", str(six_root), "--epochs", "1"]):
        with pytest.raises(SystemExit) as e:
            main(["sweep", "--out", str(tmp_path / "s"), *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "moco-fast sweep: error: unrecognized arguments: --data" in err, err
        assert "flags go after `--`" in err and "-- --data ROOT" in err, err
    # a train argument without the `--` before it
    assert main(["sweep", "--out", str(tmp_path / "s"), str(six_root)]) == 2
    assert "flags go after `--`" in last_error(capsys)
    assert not (tmp_path / "s").exists()


def test_sweep_linear_classifier_on_a_single_class_is_an_error(tmp_path, capsys, caplog, monkeypatch):
    trained = stub_sweep_runs(monkeypatch)
    one = make_image_root(tmp_path / "one", per_class=8, classes=1, test_per_class=2)
    assert main(sweep_args(tmp_path / "s", one, "--moco-m", "0.99", "--lincls-epochs", "1")) == 2
    assert "holds a single class (airplane)" in last_error(capsys) and not trained
    with caplog.at_level(logging.WARNING, logger="moco_fast"):  # kNN alone: a warning
        assert main(sweep_args(tmp_path / "s", one, "--moco-m", "0.99")) == 0
    assert (
        "holds a single class (airplane): every neighbour votes for it, so kNN top-1 is 100%" in caplog.text
        and len(trained) == 1
    )
