"""Checkpoints from elsewhere (moco_fast/foreign.py): an official MoCo checkpoint (facebookresearch/moco's
main_moco.py format) and a plain torchvision ResNet state dict, read by knn, lincls and export."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torchvision
from eval_cli_helpers import one_line_error

import moco_fast.knn
import moco_fast.lincls
from moco_fast.cli import main

EVAL = ["--device", "cpu", "--workers", "0"]


def known_resnet18(seed: int) -> torch.nn.Module:
    """A torchvision ResNet-18 whose weights and BN statistics are all drawn from `seed` (no tensor
    at its init value, so a load that missed one shows)."""
    net = torchvision.models.resnet18()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.1 + (0.5 if "running_var" in name else 0.0))
            else:
                t.fill_(seed)
    return net


def official_checkpoint(path, arch: str = "resnet18", legacy: bool = False) -> dict[str, torch.Tensor]:
    """An official MoCo v2 checkpoint at `path` (main_moco.py's save_checkpoint: epoch, arch,
    state_dict under DDP's `module.`, optimizer) whose query encoder is known_resnet18(1) with a
    512-512-128 MLP head as fc.0/fc.2, its key encoder another network; returns the query encoder's
    torchvision state dict (fc included). `legacy`: torch's format before 1.6 (not a zip), in which
    the released checkpoints were saved."""
    q, k = known_resnet18(1), known_resnet18(2)
    for net in (q, k):
        net.fc = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))
    sd = {f"module.encoder_q.{n}": t for n, t in q.state_dict().items()}
    sd.update({f"module.encoder_k.{n}": t for n, t in k.state_dict().items()})
    sd["module.queue"] = torch.nn.functional.normalize(torch.randn(128, 16), dim=0)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    obj = {"epoch": 200, "arch": arch, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return q.state_dict()


def backbone_of(query: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in query.items() if not n.startswith("fc.")}


def assert_same(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(state) == sorted(expected)
    for n, t in expected.items():
        assert torch.equal(state[n].cpu(), t), n


def record_nets(monkeypatch) -> list:
    """moco_fast.knn.knn_score, recording each network it is given (a copy of its state dict)."""
    seen, real = [], moco_fast.knn.knn_score

    def recording(net, *args, **kwargs):
        seen.append({n: t.detach().clone() for n, t in net.state_dict().items()})
        return real(net, *args, **kwargs)

    monkeypatch.setattr(moco_fast.knn, "knn_score", recording)
    return seen


def test_knn_reads_an_official_moco_checkpoint(data, tmp_path, monkeypatch, capsys, caplog):
    path = tmp_path / "moco_v2_200ep_pretrain.pth.tar"
    query = official_checkpoint(path)
    seen = record_nets(monkeypatch)
    assert main(["knn", "--checkpoint", str(path), "--data", str(data), "--k", "3", "--features", "both", *EVAL]) == 0
    out = capsys.readouterr().out
    assert "official MoCo checkpoint, resnet18, epoch 200: the query encoder's backbone and head" in caplog.text
    assert "kNN top-1 (backbone, k=3" in out and "kNN top-1 (head, k=3" in out
    backbone, encoder = seen
    assert_same(backbone, {n: t for n, t in backbone_of(query).items()})  # the query encoder's, not the key's
    assert_same(encoder, {("backbone." + n): t for n, t in backbone_of(query).items()} | head_of(query))


def head_of(query: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"head." + n[3:]: t for n, t in query.items() if n.startswith("fc.")}


def test_lincls_on_an_official_checkpoint_trains_on_its_query_backbone(data, tmp_path, monkeypatch, capsys):
    path = tmp_path / "checkpoint_0199.pth.tar"
    query = official_checkpoint(path, legacy=True)
    checked = []
    real = moco_fast.lincls.check_unchanged

    def recording(backbone, reference):
        checked.append(({n: t.detach().clone() for n, t in backbone.state_dict().items()}, reference))
        return real(backbone, reference)

    monkeypatch.setattr(moco_fast.lincls, "check_unchanged", recording)
    argv = ["lincls", "--checkpoint", str(path), "--data", str(data), "--epochs", "1", "--image-size", "32"]
    assert main([*argv, "--batch-size", "8", "--out", str(tmp_path / "l.json"), *EVAL]) == 0
    assert "linear classification: top-1" in capsys.readouterr().out
    (evaluated, reference) = checked[0]
    assert_same(evaluated, backbone_of(query))
    assert_same(reference, backbone_of(query))


def test_an_arch_that_contradicts_the_official_checkpoint_is_one_line(data, tmp_path, capsys):
    path = tmp_path / "moco.pth.tar"
    official_checkpoint(path)
    assert main(["knn", "--checkpoint", str(path), "--data", str(data), "--arch", "resnet50", *EVAL]) == 2
    assert one_line_error(capsys).endswith("--arch resnet50 contradicts the checkpoint, a resnet18 (leave --arch out)")


def test_an_arch_that_does_not_fit_an_official_checkpoint_without_one_is_one_line(data, tmp_path, capsys):
    # a save that does not name its arch took --arch unchecked: a resnet50 was built, and the error was
    # that "the saved weights do not fit the model its config describes", after a line naming a resnet50
    path = tmp_path / "moco.pth.tar"
    official_checkpoint(path)
    state = torch.load(path)
    del state["arch"]
    torch.save(state, path)
    for argv in (["knn", "--checkpoint", str(path), "--data", str(data), *EVAL],
                 ["export", str(path), "--format", "torchvision", "--output", str(tmp_path / "out.pth")]):  # fmt: skip
        assert main([*argv, "--arch", "resnet50"]) == 2
        assert one_line_error(capsys).endswith(
            f"--arch resnet50: the tensors of {path} are not a resnet50's; leave --arch out"
        )
    assert not (tmp_path / "out.pth").exists()


def official_detectron2_names(query: dict[str, torch.Tensor]) -> set[str]:
    """The names facebookresearch/moco's detection/convert-pretrain-to-detectron2.py gives the query
    encoder's tensors, written out here from its rules, its fc (a head detectron2 ignores) left out."""
    names = set()
    for k in query:
        if k.startswith("fc."):
            continue
        if "layer" not in k:
            k = "stem." + k
        for t in (1, 2, 3, 4):
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        names.add(k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm"))
    return names


def test_export_to_detectron2_from_an_official_checkpoint(tmp_path, capsys):
    path = tmp_path / "moco_v1_200ep_pretrain.pth.tar"
    query = official_checkpoint(path)
    out = tmp_path / "r18.pkl"
    assert main(["export", str(path), "--format", "detectron2", "--output", str(out)]) == 0
    assert "of the resnet18 query backbone (detectron2)" in capsys.readouterr().out
    with open(out, "rb") as fh:
        obj = pickle.load(fh)
    assert set(obj["model"]) == official_detectron2_names(query)
    assert (obj["model"]["stem.conv1.weight"] == query["conv1.weight"].numpy()).all()
    assert (obj["model"]["res5.1.conv2.norm.running_var"] == query["layer4.1.bn2.running_var"].numpy()).all()


def test_a_torchvision_state_dict_is_read_as_its_inferred_arch(data, tmp_path, monkeypatch, capsys, caplog):
    net = known_resnet18(3)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)  # torchvision's weights as torch.save writes them, fc included
    seen = record_nets(monkeypatch)
    argv = ["knn", "--checkpoint", str(path), "--data", str(data), "--k", "3", *EVAL]
    assert main([*argv, "--features", "both"]) == 0
    out = capsys.readouterr().out
    assert "torchvision resnet18 state dict: the backbone (it has no MoCo head)" in caplog.text
    assert "has no MoCo head: backbone figures only" in caplog.text
    assert "kNN top-1 (backbone, k=3" in out and "(head," not in out
    assert_same(seen[0], backbone_of(net.state_dict()))
    assert main([*argv, "--features", "head"]) == 2
    assert one_line_error(capsys).endswith(f"--features head: {path} has no MoCo head; use --features backbone")


@pytest.mark.parametrize("arch", ["resnet34", "resnet101", "wide_resnet50_2", "resnext50_32x4d", "resnet50w2"])
def test_the_arch_of_a_state_dict_is_inferred_from_its_shapes(arch, tmp_path):
    from moco_fast.backbone import resnet
    from moco_fast.foreign import as_training_state

    with torch.device("meta"):  # the shapes alone
        state = resnet(arch).state_dict()
    cfg = as_training_state(state, tmp_path / "x.pth", say=False)["config"]
    assert (cfg["model"]["arch"], cfg["model"]["stem"]) == (arch, "imagenet")


def test_a_dict_that_is_no_checkpoint_is_a_one_line_error(data, tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save({"encoder": torch.zeros(3), "step": 7}, path)
    assert main(["knn", "--checkpoint", str(path), "--data", str(data), *EVAL]) == 2
    line = one_line_error(capsys)
    assert f"{path} is not a checkpoint moco-fast can read: a dict with the keys 'encoder', 'step'" in line


@pytest.mark.parametrize("command", ["lincls", "finetune"])
def test_a_classifier_s_state_between_epochs_is_named_as_such(command, data, tmp_path, capsys):
    # finetune.state.pt holds the network being fine-tuned: given as a checkpoint it was "a dict with
    # the keys 'command', 'config', 'epoch', 'history', 'wall_s' and 4 more", which said nothing of
    # what it is or how to get the network out of it.
    path = tmp_path / f"{command}.state.pt"
    state = {"command": command, "config": {}, "epoch": 1, "history": [{"epoch": 1, "lr": 0.1, "loss": 1.0}]}
    torch.save({**state, "wall_s": 1.0, "rng": None, "generator": None, "optimizer": {}}, path)
    for argv in (["knn", "--checkpoint", str(path), "--data", str(data), *EVAL],
                 ["export", str(path), "--format", "torchvision", "--output", str(tmp_path / "out.pth")]):  # fmt: skip
        assert main(argv) == 2
        line = one_line_error(capsys)
        assert f"{path} is not a checkpoint moco-fast can read: it is the state of an interrupted {command} run" in line
        assert f"`moco-fast {command} --resume` with that run's flags finishes it" in line
    assert not (tmp_path / "out.pth").exists()


def test_finetune_starts_from_a_torchvision_state_dict(data, tmp_path, monkeypatch, capsys):
    import moco_fast.finetune

    net = known_resnet18(4)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{n}": t for n, t in net.state_dict().items()}}, path)  # main_lincls.py's
    started, real = [], moco_fast.finetune.build_network

    def recording(cfg, classes):
        built = real(cfg, classes)
        started.append({n: t.detach().clone() for n, t in built[0][0].state_dict().items()})
        return built

    monkeypatch.setattr(moco_fast.finetune, "build_network", recording)
    out = tmp_path / "ft.json"
    argv = ["finetune", "--checkpoint", str(path), "--data", str(data), "--epochs", "1", "--image-size", "32"]
    assert main([*argv, "--batch-size", "4", "--out", str(out), "--no-save-model", *EVAL]) == 0
    # it said 'from moco': the file holds a plain network, which says nothing of how it was trained
    assert f"fine-tuning from the torchvision state dict {path}: " in capsys.readouterr().out
    assert json.loads(out.read_text())["init"] == "torchvision"
    assert_same(started[0], backbone_of(net.state_dict()))
    assert main([*argv, "--arch", "resnet34", "--out", str(tmp_path / "x.json"), *EVAL]) == 2
    assert one_line_error(capsys).endswith(
        f"--arch resnet34: the tensors of {path} are not a resnet34's; leave --arch out"
    )


def test_an_unknown_arch_is_refused_before_the_checkpoint_is_read(tmp_path, capsys):
    missing = str(tmp_path / "none.pth")
    for argv in (
        ["knn", "--checkpoint", missing],
        ["lincls", "--checkpoint", missing],
        ["export", missing, "--format", "torchvision", "--output", str(tmp_path / "x.pth")],
    ):
        assert main([*argv, "--arch", "resnet5", "--device", "cpu"]) == 2
        assert "unknown arch 'resnet5'" in one_line_error(capsys), argv


def test_a_cifar_stem_state_dict_keeps_its_stem_and_the_cifar_recipe(tmp_path):
    from moco_fast.backbone import build_backbone
    from moco_fast.foreign import as_training_state

    with torch.device("meta"):  # what `export --format torchvision` writes for a CIFAR-stem run
        state = build_backbone("resnet18", "cifar")[0].state_dict()
    cfg = as_training_state(state, tmp_path / "x.pth", say=False)["config"]
    assert (cfg["model"]["arch"], cfg["model"]["stem"], cfg["data"]["aug"]["image_size"]) == ("resnet18", "cifar", 32)


def test_results_of_downloaded_checkpoints_that_share_a_folder_do_not_collide(run_dir, tmp_path, monkeypatch):
    from eval_cli_helpers import Stop, stop_training

    from moco_fast.finetune import FinetuneConfig, result_path

    seen = stop_training(monkeypatch)
    for name in ("moco_v1_200ep_pretrain.pth.tar", "moco_v2_800ep_pretrain.pth.tar"):
        official_checkpoint(tmp_path / name)
        with pytest.raises(Stop):
            main(["lincls", "--checkpoint", str(tmp_path / name), "--device", "cpu"])
    assert [cfg.out for cfg in seen] == [
        str(tmp_path / "moco_v1_200ep_pretrain.lincls.json"),
        str(tmp_path / "moco_v2_800ep_pretrain.lincls.json"),
    ]
    assert result_path(FinetuneConfig(str(tmp_path / "r50.pth"))) == tmp_path / "r50.finetune.json"
    # a run's checkpoint keeps the run folder's names
    scratch = FinetuneConfig(str(run_dir / "checkpoint.pt"), from_scratch=True)
    assert result_path(scratch) == run_dir / "finetune_scratch.json"
