"""`moco-fast lincls` and `finetune` on the CPU: top-k results on the images really used, cached
features, the check that the backbone did not change, a checkpoint trained further or a bad input
named in one line; fine-tuning from MoCo and from scratch; and a short MoCo run whose kNN beats a
random backbone."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import ON_GPU, make_image_root
from eval_helpers import checkpoint_backbone_state, interrupt_at, state_reads
from torch import nn

from moco_fast.cli import main
from moco_fast.config import build_config
from moco_fast.trainer import train


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


@pytest.mark.parametrize("cached", [False, True])
def test_an_eval_split_where_nothing_decodes_is_an_error_not_0_percent(cached, ckpt, six_root, tmp_path, capsys):
    # every val/ image cut short (each passes the header check): lincls said "top-1 0.00%  top-5 0.00%
    # (0 eval images" and wrote it as its result
    root = shutil.copytree(six_root, tmp_path / "data")
    for f in (root / "test").rglob("*.jpg"):
        f.write_bytes(f.read_bytes()[: int(f.stat().st_size * 0.8)])
    out = tmp_path / "r.json"
    args = ["lincls", "--checkpoint", str(ckpt), "--data", str(root), "--epochs", "1", "--batch-size", "8"]
    args += ["--workers", "0", "--device", "cpu", "--out", str(out), *(["--cached-features"] if cached else [])]
    with pytest.warns(UserWarning, match="failed to decode"):
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"moco-fast lincls: error: none of the 18 images in {root / 'test'} could be decoded", err
    assert not out.exists()


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


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=ON_GPU),
    ],
)
def test_cached_feature_epochs_cover_each_row_once_in_the_seeded_order(device):
    from moco_fast.lincls import tensor_batches

    dev = torch.device(device)
    x = torch.arange(40, dtype=torch.float32, device=dev).view(20, 2)  # row i holds 2i, 2i + 1
    y = torch.arange(20, device=dev)
    first = tensor_batches(x, y, 8, True, torch.Generator().manual_seed(3))  # before any sync check
    if dev.type == "cuda":  # the epoch's order reaches the device without the host waiting for it
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        again = tensor_batches(x, y, 8, True, torch.Generator().manual_seed(3))
    finally:
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert [len(b[1]) for b in again] == [8, 8, 4]
    labels = torch.cat([b[1] for b in again]).cpu()
    assert sorted(labels.tolist()) == list(range(20)) and labels.tolist() != list(range(20))
    assert labels.tolist() == torch.cat([b[1] for b in first]).cpu().tolist()  # the seed decides
    assert all(torch.equal(bx[:, 0], 2.0 * by) for bx, by in again)  # each row keeps its label
    plain = tensor_batches(x, y, 8, False, None)
    assert torch.cat([b[1] for b in plain]).cpu().tolist() == list(range(20))
    # gathered batch by batch as the epoch goes (all at once: a second copy of the features on the
    # device), and again for another pass (the evaluation's batches serve every epoch)
    x.add_(100.0)
    assert [len(b[1]) for b in plain] == [8, 8, 4] and len(plain) == 3
    assert all(torch.equal(bx[:, 0], 2.0 * by + 100.0) for bx, by in plain)


def test_backbone_check_catches_changes(ckpt):
    from moco_fast.checkpoint import load_model
    from moco_fast.lincls import BackboneChangedError, check_unchanged

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


# -- finetune -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_finetune_from_moco_and_from_scratch(ckpt, six_root, tmp_path):
    from moco_fast.finetune import FinetuneConfig, build_network, fine_tune

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


@pytest.mark.parametrize("command", ["lincls", "lincls cached", "finetune"])
def test_classifier_batches_reach_a_gpu_from_pinned_memory(ckpt, six_root, tmp_path, monkeypatch, command):
    # A copy to a GPU from pageable memory may wait for the steps queued before it: lincls and
    # finetune's hosts waited for the last step at every batch, training and evaluation alike. Each
    # of their loaders is asked for the run's device, and on a GPU gives pinned batches.
    import moco_fast.finetune as finetune
    import moco_fast.lincls as lincls
    from moco_fast.data import list_images

    class Asked(Exception):
        pass

    asked, real = [], lincls.image_batches

    def batches(*a, **k):
        asked.append(k.get("device"))
        if len(asked) == 2:  # both loaders made: the training one and the evaluation one
            raise Asked
        return real(*a, **k)

    base = dict(checkpoint=str(ckpt), data=str(six_root), epochs=1, batch_size=8, workers=0, device="cpu")
    base["out"] = str(tmp_path / "r.json")
    monkeypatch.setattr(finetune if command == "finetune" else lincls, "image_batches", batches)
    with pytest.raises(Asked):
        if command == "finetune":
            finetune.fine_tune(finetune.FinetuneConfig(**base))
        else:
            lincls.run_lincls(lincls.LinclsConfig(**base, cached_features=command.endswith("cached")))
    assert asked == [torch.device("cpu")] * 2
    images = list_images(six_root / "train")
    for training in (True, False):
        for device, pinned in ((torch.device("cuda"), True), (torch.device("cpu"), False), (None, False)):
            loader = real(images, 8, training, 4, 0, 0, device=device)
            assert (loader if training else loader.loader).pin_memory is pinned
    # --cached-features' labels: copied without waiting for their batch's forward
    copies, to = [], torch.Tensor.to
    monkeypatch.setattr(
        torch.Tensor, "to", lambda t, *a, **k: (t.dtype == torch.long and copies.append(k)) or to(t, *a, **k)
    )
    x, y = torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1])
    norm = lincls.Normalizer(lincls.AugSpec(), torch.device("cpu"))
    lincls.extract(lambda x: x.mean((2, 3)), [(x, y)] * 2, norm, torch.device("cpu"), None, "features")
    assert copies == [{"non_blocking": True}] * 2


def test_finetune_reads_the_checkpoint_s_bytes_once(ckpt, six_root, tmp_path, monkeypatch, capsys):
    # with --arch or --stem, check_arch read the whole checkpoint (and its checksums) before the
    # network was built from a second whole read: a ResNet-50 run's file is hundreds of MB. Its config
    # is read through checkpoint.read_config now, its tensors mapped, not read
    reads = state_reads(monkeypatch)
    out = tmp_path / "ft.json"
    args = ["finetune", "--checkpoint", str(ckpt), "--data", str(six_root), "--epochs", "1", "--batch-size", "8"]
    args += ["--arch", "resnet18", "--stem", "imagenet", "--workers", "0", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    whole = [name for name, mmap in reads if name == ckpt.name and not mmap]
    assert len(whole) == 1, reads  # the one read that builds the network; the check maps it
    assert json.loads(out.read_text())["config"]["arch"] == "resnet18"
    # --arch contradicting the checkpoint: the same line as before
    capsys.readouterr()
    assert main([*args, "--arch", "resnet50"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "moco-fast finetune: error: --arch resnet50 contradicts the checkpoint, a resnet18 (with --checkpoint the "
        "network is the checkpoint's architecture; leave --arch out)"
    )


def test_a_classifier_s_default_image_size_reads_a_legacy_format_state_dict(ckpt, tmp_path):
    # default_image_size mapped the checkpoint (mmap), which torch refuses for its legacy, non-zip
    # format (an older torchvision download): "cannot read checkpoint ...: mmap can only be used ..."
    from moco_fast.classifier_settings import default_image_size
    from moco_fast.finetune import FinetuneConfig

    backbone = checkpoint_backbone_state(ckpt)
    legacy = tmp_path / "resnet18-legacy.pth"
    torch.save(backbone, legacy, _use_new_zipfile_serialization=False)
    cfg = FinetuneConfig(checkpoint=str(legacy), data=str(tmp_path), out=str(tmp_path / "ft.json"))
    assert default_image_size(cfg) == 224  # a torchvision state dict's config: the ImageNet stem's v2 size


def test_read_config_of_a_named_pipe_is_the_missing_checkpoint_s_error(tmp_path):
    # read_config asked zipfile.is_zipfile before load's check for a regular file: its open of a FIFO
    # waited for a writer, forever (a child process, so that a hang fails the test instead of the run)
    import subprocess
    import sys

    fifo = tmp_path / "ckpt.pt"
    os.mkfifo(fifo)
    code = f"from moco_fast.checkpoint import read_config\nread_config({str(fifo)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert f"FileNotFoundError: checkpoint not found: {fifo}" in done.stderr
