"""The evaluation commands' arguments (knn, lincls, finetune, export), on the CPU: values checked
before any data or checkpoint is read, one-line errors, outputs tried before training, run folders
for --checkpoint, help texts, the fine-tuned network saved, the kNN progress bar."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import make_image_root
from torch import nn

from moco_fast.cli import build_parser, main
from moco_fast.commands import HelpFormatter
from moco_fast.config import ConfigError, build_config, to_dict
from moco_fast.model import MoCo

TINY = {
    "model.arch": "resnet18",
    "model.stem": "imagenet",
    "moco.k": 16,
    "optim.batch_size": 8,
    "optim.epochs": 1,
    "runtime.device": "cpu",
    "data.workers": 0,
}
COMMANDS = ("knn", "lincls", "finetune", "export")


class Stop(Exception):
    """Raised by a stand-in for the training function: the command got past its checks."""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """3 classes x 6 train / 2 test images."""
    return make_image_root(tmp_path_factory.mktemp("data"), per_class=6, classes=3, test_per_class=2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder holding checkpoint.pt of an untrained ResNet-18 (ImageNet stem, 32 px)."""
    out = tmp_path_factory.mktemp("run")
    cfg = build_config("cifar", TINY)
    model = MoCo(cfg.model, cfg.moco, cfg.data.aug.image_size)
    torch.save({"config": to_dict(cfg), "model": model.state_dict(), "epoch": 1}, out / "checkpoint.pt")
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def stop_training(monkeypatch) -> list:
    """Replaces run_lincls and fine_tune with a stand-in that records its config and raises Stop."""
    import moco_fast.finetune
    import moco_fast.lincls

    seen = []

    def stand_in(cfg):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(moco_fast.lincls, "run_lincls", stand_in)
    monkeypatch.setattr(moco_fast.finetune, "fine_tune", stand_in)
    return seen


# -- help -------------------------------------------------------------------------------------------
def test_every_flag_has_help_that_states_its_default(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for cmd in COMMANDS:
        for action in sub.choices[cmd]._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (cmd, action.dest)
            if action.required or not action.option_strings or action.nargs == 0:
                continue  # nothing to default (required, positional, on/off flags)
            text = HelpFormatter(cmd)._get_help_string(action)
            assert "default" in text, (cmd, action.dest, text)
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "training epochs (default: 90)" in text and "(default: 0.0001)" in text
    with pytest.raises(SystemExit):
        main(["lincls", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 100)" in text and "SGD weight decay (default: 0.0)" in text and "--seed SEED random" in text


def test_resume_help_names_each_commands_own_state_file(capsys):
    # finetune's --resume help named lincls's files (lincls.json -> lincls.state.pt)
    for cmd in ("lincls", "finetune"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"{cmd}.json -> {cmd}.state.pt" in text, cmd
        assert ("lincls.state.pt" in text) == (cmd == "lincls"), cmd


def test_help_does_not_import_torch():
    # `moco-fast --help` and every `moco-fast COMMAND --help` answer in a tenth of a second: the
    # parser's modules leave torch (2 s to import) to the commands' run functions.
    import subprocess
    import sys

    code = "import sys; from moco_fast.cli import build_parser; build_parser(); print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'numpy'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# -- values checked up front ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["knn", "--k", "-1"], "--k must be at least 1"),
        (["knn", "--k", "0"], "--k must be at least 1"),
        (["knn", "--t", "0"], "--t must be above 0"),
        (["knn", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["knn", "--workers", "-2"], "--workers must be -1 (auto)"),
        (["lincls", "--workers", "-2"], "--workers must be -1 (auto)"),
        (["lincls", "--lr", "-1"], "--lr must be above 0"),
        (["lincls", "--image-size", "0"], "--image-size must be at least 8"),
        (["finetune", "--image-size", "4"], "--image-size must be at least 8"),
        (["lincls", "--momentum", "2"], "--momentum must be in [0, 1)"),
        (["finetune", "--momentum", "-0.5"], "--momentum must be in [0, 1)"),
        (["lincls", "--schedule", ","], "--schedule expects epochs like 60,80"),
        (["finetune", "--lr", "0"], "--lr must be above 0"),
        (["lincls", "--eval-every", "-1"], "--eval-every must be 0 or more"),
        (["finetune", "--weight-decay", "-1"], "--weight-decay"),
        (["knn", "--device", "gpu"], "cpu, cuda, cuda:N"),
        (["lincls", "--device", "gpu"], "cpu, cuda, cuda:N"),
        (["finetune", "--device", "gpu"], "cpu, cuda, cuda:N"),
    ],
)
def test_bad_values_are_one_line_errors_before_anything_is_read(argv, message, tmp_path, capsys):
    # The checkpoint does not exist: a value error first shows that nothing was read before the checks.
    assert main([*argv, "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert message in one_line_error(capsys)


def test_export_device_is_checked(run_dir, tmp_path, capsys):
    argv = ["export", str(run_dir), "--format", "torchvision", "--output", str(tmp_path / "x.pth")]
    assert main([*argv, "--device", "gpu"]) == 2
    assert "cuda:N" in one_line_error(capsys)


def test_schedule_milestones_past_the_end_warn(run_dir, monkeypatch, caplog):
    stop_training(monkeypatch)
    base = ["--checkpoint", str(run_dir), "--device", "cpu", "--no-save-model"]
    with caplog.at_level(logging.WARNING, logger="moco_fast"), pytest.raises(Stop):
        main(["lincls", *base[:4], "--epochs", "10"])  # the default --schedule 60,80
    assert "never drops at 60,80" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moco_fast"), pytest.raises(Stop):
        main(["finetune", *base, "--epochs", "10", "--schedule", "5,10"])
    assert "never drops at 10 " in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moco_fast"), pytest.raises(Stop):
        main(["lincls", *base[:4], "--epochs", "10", "--schedule", "6,9"])
    with caplog.at_level(logging.WARNING, logger="moco_fast"), pytest.raises(Stop):
        main(["finetune", *base, "--epochs", "10"])  # cos
    assert "never drops" not in caplog.text


# -- outputs tried before training --------------------------------------------------------------------
def bad_outputs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    bad = {"folder": tmp_path / "a_folder", "under a file": tmp_path / "a_file" / "r.json"}
    if Path("/proc/self").is_dir():
        bad["/proc"] = Path("/proc/moco-fast-test.json")  # not writable, not even for root
    return bad


@pytest.mark.parametrize("cmd", ["lincls", "finetune"])
def test_out_is_checked_before_training(cmd, run_dir, tmp_path, monkeypatch, capsys):
    stop_training(monkeypatch)
    for why, out in bad_outputs(tmp_path).items():
        argv = [cmd, "--checkpoint", str(run_dir / "checkpoint.pt"), "--device", "cpu", "--out", str(out)]
        assert main(argv) == 2, why
        assert one_line_error(capsys).startswith(f"moco-fast {cmd}: error: --out"), why
    assert not (tmp_path / "a_file").is_dir() and not list(Path(tmp_path / "a_folder").iterdir())


def test_finetune_save_model_is_checked_before_training(run_dir, tmp_path, monkeypatch, capsys):
    stop_training(monkeypatch)
    argv = ["finetune", "--checkpoint", str(run_dir), "--device", "cpu", "--out", str(tmp_path / "r.json")]
    for why, path in bad_outputs(tmp_path).items():
        assert main([*argv, "--save-model", str(path)]) == 2, why
        assert "--save-model" in one_line_error(capsys), why
    assert main([*argv[:-1], str(tmp_path / "r.pt")]) == 2  # the model would go where the JSON goes
    assert "--save-model and --out" in one_line_error(capsys)


def test_only_an_earlier_output_of_the_same_kind_is_replaced(run_dir, tmp_path, monkeypatch, capsys):
    # A run folder's own files and other commands' results are not overwritten by --out or --save-model.
    from moco_fast.finetune import PROTOCOL as FINETUNE
    from moco_fast.lincls import PROTOCOL as LINCLS

    stop_training(monkeypatch)
    earlier = {"protocol": FINETUNE, "top1": 60.0, "model": str(tmp_path / "finetune.pt")}
    files = {
        "config.json": json.dumps({"optim": {"lr": 0.03}}),
        "metrics.jsonl": '{"epoch": 1, "loss": 9.1}\n',
        "lincls.json": json.dumps({"protocol": LINCLS, "top1": 50.0}),
        "finetune.json": json.dumps(earlier),
        "sweep_lincls.json": json.dumps({"protocol": LINCLS, "top1": 40.0}),  # the sweep's short classifier
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "finetune.pt")  # the network it names
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18-tv.pth")  # torchvision's own
    exported = torchvision.models.resnet18().state_dict()
    del exported["fc.weight"], exported["fc.bias"]
    torch.save(exported, tmp_path / "r18.pth")  # `moco-fast export`'s: no fc
    ckpt = ["--checkpoint", str(run_dir), "--device", "cpu"]
    refused = [
        ("lincls", "--out", "config.json", []),
        ("lincls", "--out", "metrics.jsonl", []),
        ("lincls", "--out", "finetune.json", []),
        ("lincls", "--out", "sweep_lincls.json", []),
        ("finetune", "--out", "lincls.json", ["--no-save-model"]),
        ("finetune", "--save-model", "lincls.json", ["--out", str(tmp_path / "finetune.json")]),
        ("finetune", "--save-model", "r18.pth", ["--out", str(tmp_path / "finetune.json")]),
        ("finetune", "--save-model", "resnet18-tv.pth", ["--out", str(tmp_path / "finetune.json")]),
        ("finetune", "--save-model", "finetune.pt", ["--out", str(tmp_path / "new.json")]),  # no result names it
    ]
    for cmd, flag, name, extra in refused:
        assert main([cmd, *ckpt, flag, str(tmp_path / name), *extra]) == 2, (cmd, flag, name)
        err = one_line_error(capsys)
        assert err.startswith(f"moco-fast {cmd}: error: {flag} {tmp_path / name} exists and is"), err
    for name, text in files.items():
        assert (tmp_path / name).read_text() == text
    # an earlier result of the same kind, and the network it names, are replaced: the command runs
    with pytest.raises(Stop):
        main(["lincls", *ckpt, "--out", str(tmp_path / "lincls.json")])
    with pytest.raises(Stop):
        main(
            ["finetune", *ckpt, "--out", str(tmp_path / "finetune.json"), "--save-model", str(tmp_path / "finetune.pt")]
        )


def test_another_commands_state_of_the_same_name_is_named_not_offered_for_deletion(
    run_dir, tmp_path, monkeypatch, capsys
):
    # finetune's state for x.json is x.state.pt; lincls --out x.txt would keep its own there
    stop_training(monkeypatch)
    state = tmp_path / "x.state.pt"
    torch.save({"command": "finetune", "config": {}, "epoch": 1, "history": []}, state)
    before = state.read_bytes()
    argv = ["lincls", "--checkpoint", str(run_dir), "--device", "cpu", "--out", str(tmp_path / "x.txt")]
    for resume in ([], ["--resume"]):
        assert main([*argv, *resume]) == 2
        err = one_line_error(capsys)
        assert f"{state} is the state of an interrupted finetune run" in err and "delete" not in err, err
        assert "give --out another name" in err
    assert state.read_bytes() == before


def test_run_folder_and_defaults_reach_the_config(run_dir, tmp_path, monkeypatch):
    seen = stop_training(monkeypatch)
    with pytest.raises(Stop):
        main(["lincls", "--checkpoint", str(run_dir), "--device", "cpu", "--workers", "-1"])
    cfg = seen[-1]
    assert cfg.checkpoint == str(run_dir / "checkpoint.pt") and cfg.out == str(run_dir / "lincls.json")
    assert cfg.workers >= 1  # auto, resolved into a count that a DataLoader takes
    with pytest.raises(Stop):
        main(["finetune", "--from-scratch", "--device", "cpu", "--out", str(tmp_path / "s.json")])
    assert seen[-1].arch == "resnet50" and seen[-1].stem == "auto"


# -- finetune -----------------------------------------------------------------------------------------
def test_finetune_arch_and_stem_must_match_the_checkpoint(run_dir, monkeypatch, capsys):
    stop_training(monkeypatch)
    argv = ["finetune", "--checkpoint", str(run_dir), "--device", "cpu", "--no-save-model"]
    assert main([*argv, "--arch", "resnet50"]) == 2
    assert "--arch resnet50 contradicts the checkpoint, a resnet18" in one_line_error(capsys)
    assert main([*argv, "--from-scratch", "--stem", "cifar"]) == 2
    assert "--stem cifar contradicts" in one_line_error(capsys)
    with pytest.raises(Stop):  # agreeing flags pass
        main([*argv, "--arch", "resnet18", "--stem", "imagenet"])


def test_finetune_saves_the_network_as_torchvision_weights(run_dir, data, tmp_path, capsys):
    from moco_fast.lincls import checkpoint_backbone_state

    out = tmp_path / "res" / "ft.json"
    argv = ["finetune", "--checkpoint", str(run_dir), "--data", str(data), "--epochs", "1", "--batch-size", "8"]
    assert main([*argv, "--workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    weights = out.with_suffix(".pt")
    assert json.loads(out.read_text())["model"] == str(weights)
    assert str(weights) in capsys.readouterr().out
    state = torch.load(weights)
    net = torchvision.models.resnet18(num_classes=3)
    net.load_state_dict(state)  # strict: every key, the classifier included
    ref = checkpoint_backbone_state(run_dir / "checkpoint.pt")
    assert not torch.equal(state["conv1.weight"], ref["conv1.weight"])  # the fine-tuned weights, not the start
    assert not [p.name for p in weights.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_finetune_no_save_model_writes_only_the_json(tmp_path, monkeypatch):
    import moco_fast.finetune

    res = {"init": "scratch", "top1": 50.0, "top5": 100.0, "topk": 3, "eval_images": 6}
    monkeypatch.setattr(moco_fast.finetune, "fine_tune", lambda cfg: (res, None))
    out = tmp_path / "ft.json"
    assert main(["finetune", "--from-scratch", "--device", "cpu", "--out", str(out), "--no-save-model"]) == 0
    assert json.loads(out.read_text()) == res and not out.with_suffix(".pt").exists()


# -- knn, export ---------------------------------------------------------------------------------------
def test_knn_and_export_take_a_run_folder(run_dir, data, tmp_path, capsys):
    argv = ["knn", "--checkpoint", str(run_dir), "--data", str(data), "--k", "3", "--device", "cpu", "--workers", "0"]
    assert main(argv) == 0
    assert "kNN top-1 (backbone, k=3" in capsys.readouterr().out
    out = tmp_path / "r18.pth"
    assert main(["export", str(run_dir), "--format", "torchvision", "--output", str(out)]) == 0
    assert len(torch.load(out)) == len(torchvision.models.resnet18().state_dict()) - 2
    assert main(["export", str(tmp_path), "--format", "torchvision", "--output", str(tmp_path / "x.pth")]) == 2
    assert "is a folder without a checkpoint.pt" in one_line_error(capsys)


def test_export_refuses_a_folder_as_output(run_dir, tmp_path, capsys):
    folder = tmp_path / "exports"
    folder.mkdir()
    for force in ([], ["--force"]):
        assert main(["export", str(run_dir), "--format", "torchvision", "--output", str(folder), *force]) == 2
        assert "--output" in one_line_error(capsys)


def test_export_never_replaces_a_run_s_own_files_even_with_force(run_dir, tmp_path, capsys):
    # --force replaces an earlier export; `--output RUN/config.json --force` overwrote the run's
    # config (and another run's checkpoint.pt its weights), which --resume and the evaluations read.
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    for name in ("config.json", "checkpoint.pt", "metrics.jsonl", "summary.json", "lincls.json"):
        target = other / name
        if not target.exists():
            target.write_text("{}")
        before = target.read_bytes()
        argv = ["export", str(run_dir), "--format", "torchvision", "--output", str(target), "--force"]
        assert main(argv) == 2 and target.read_bytes() == before
        assert one_line_error(capsys) == (
            f"moco-fast export: error: --output {target} exists and is a training run's {name}: "
            "give another path, or delete it first"
        )
    out = tmp_path / "r18.pth"  # an earlier export is replaced with --force
    out.write_bytes(b"old")
    assert main(["export", str(run_dir), "--format", "torchvision", "--output", str(out), "--force"]) == 0
    assert len(torch.load(out)) > 0


def test_knn_feature_pass_shows_a_bar_when_long(data, monkeypatch):
    import moco_fast.knn as knn
    from moco_fast.data import load_splits

    bars = []
    real = knn.progress

    def recording(total, desc, enabled=True):
        bars.append((total, desc, enabled))
        return real(total=total, desc=desc, enabled=False)

    monkeypatch.setattr(knn, "progress", recording)
    train = load_splits(str(data)).train
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    spec = build_config("cifar", {}).data.aug
    feats, labels = knn.extract_features(net, train, spec, torch.device("cpu"), batch_size=2, workers=0)
    assert feats.shape == (18, 3) and labels.shape == (18,)
    knn.extract_features(net, train, spec, torch.device("cpu"), batch_size=64, workers=0)
    assert bars == [(9, "kNN features", True), (1, "kNN features", False)]


# -- outputs never replace the checkpoint a command reads -------------------------------------------
def test_no_command_writes_over_its_own_checkpoint(run_dir, tmp_path, monkeypatch, capsys):
    stop_training(monkeypatch)
    ckpt = tmp_path / "moco_r18.pt"
    ckpt.write_bytes((run_dir / "checkpoint.pt").read_bytes())
    before = ckpt.read_bytes()
    common = ["--checkpoint", str(ckpt), "--device", "cpu"]
    # finetune's default --save-model is the JSON's path with .pt: here the checkpoint itself
    for argv in (
        ["finetune", *common, "--out", str(tmp_path / "moco_r18.json")],
        ["lincls", *common, "--out", str(ckpt)],
        ["export", str(ckpt), "--format", "torchvision", "--output", str(ckpt), "--force"],
    ):
        assert main(argv) == 2, argv
        assert "is the checkpoint this command reads" in one_line_error(capsys), argv
    assert ckpt.read_bytes() == before


def test_knn_weights_do_not_overflow_at_a_small_temperature():
    from moco_fast.knn import knn_predict

    # The query's nearest neighbours are class 1; at t = 0.005, exp(sim / t) overflows fp32.
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05]]), dim=1)
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.2, 1.0]]), dim=1)
    labels = torch.tensor([1, 1, 0, 0])
    for t in (0.1, 0.005):
        assert knn_predict(query, bank, labels, num_classes=2, k=4, t=t).tolist() == [1], t


def test_sweep_refuses_run_level_train_flags(tmp_path, capsys):
    for flag in ("--resume", "--force", "--print-config"):
        assert main(["sweep", "--out", str(tmp_path / "s"), "--", "--device", "cpu", flag]) == 2
        assert f"{flag} is not a setting" in one_line_error(capsys)
    # a train flag that is wrong is one line of the sweep's, not a usage line of a `train` subcommand
    for bad, says in ((["--bogus-flag"], "unrecognized arguments: --bogus-flag"), (["--epochs", "x"], "--epochs")):
        assert main(["sweep", "--out", str(tmp_path / "s"), "--", "--device", "cpu", *bad]) == 2
        err = one_line_error(capsys)
        assert err.startswith("moco-fast sweep: error: after --:") and says in err, err
    assert not (tmp_path / "s").exists()


def test_sweep_under_torchrun_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    # each setting would create and destroy the process group, and every rank would write the table
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    assert main(["sweep", "--out", str(tmp_path / "s"), "--moco-k", "16,32", "--", "--device", "cpu"]) == 2
    assert "start it without torchrun" in one_line_error(capsys)
    assert not (tmp_path / "s").exists()


def test_the_one_process_commands_under_torchrun_are_refused_before_any_lock(run_dir, data, tmp_path, capsys,
                                                                             monkeypatch):  # fmt: skip
    # lincls under torchrun with 2 processes: rank 1 found rank 0's lock on the result and said
    # "another moco-fast lincls is writing it now", and the lock stayed behind. Every command but
    # train runs in one process: each rank now stops with the same line before it takes a lock.
    seen = stop_training(monkeypatch)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    ckpt, out = str(run_dir / "checkpoint.pt"), tmp_path / "out"
    commands = {
        "knn": ["--checkpoint", ckpt, "--data", str(data), "--device", "cpu"],
        "lincls": ["--checkpoint", ckpt, "--data", str(data), "--device", "cpu", "--out", str(out / "lincls.json")],
        "finetune": ["--checkpoint", ckpt, "--data", str(data), "--device", "cpu", "--out", str(out / "ft.json")],
        "export": [ckpt, "--format", "torchvision", "--output", str(out / "backbone.pt")],
        "convert": [str(data), str(out / "data.beton")],
    }
    for command, args in commands.items():
        assert main([command, *args]) == 2, command
        assert one_line_error(capsys) == (
            f"moco-fast {command}: error: moco-fast {command} runs in one process: start it without torchrun "
            "(every rank would run all of it, writing the same files; `moco-fast train` is the command that runs "
            "on several processes)"
        )
    assert not seen and not out.exists() and sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt"]


def test_finetune_needs_two_images_per_batch(run_dir, data, tmp_path, capsys):
    from moco_fast.finetune import FinetuneConfig, fine_tune

    # A ResNet-18 with the ImageNet stem at 32 px ends in 1 x 1 maps: with one image per batch its
    # BatchNorm failed mid-training ("Expected more than 1 value per channel when training").
    argv = ["finetune", "--checkpoint", str(run_dir), "--data", str(data), "--epochs", "1", "--workers", "0"]
    assert main([*argv, "--device", "cpu", "--batch-size", "1", "--out", str(tmp_path / "ft.json")]) == 2
    assert "--batch-size must be at least 2 for fine-tuning (got 1)" in one_line_error(capsys)
    assert not list(tmp_path.iterdir())
    # the library says so too, before the data is listed
    cfg = FinetuneConfig(str(run_dir / "checkpoint.pt"), str(tmp_path / "nowhere"), batch_size=1, device="cpu")
    with pytest.raises(ConfigError, match="--batch-size must be at least 2"):
        fine_tune(cfg)


def test_finetune_from_scratch_checks_arch_before_the_data(tmp_path, monkeypatch, capsys):
    import moco_fast.finetune

    listed = []
    monkeypatch.setattr(moco_fast.finetune, "load_splits_with_eval", lambda data: listed.append(data))
    argv = ["finetune", "--from-scratch", "--data", str(tmp_path / "nowhere"), "--device", "cpu"]
    assert main([*argv, "--arch", "vgg16", "--out", str(tmp_path / "s.json")]) == 2
    assert "unknown arch 'vgg16'" in one_line_error(capsys) and not listed
    with pytest.raises(ConfigError, match="unknown arch 'vgg16'"):  # the library too
        moco_fast.finetune.fine_tune(moco_fast.finetune.FinetuneConfig(from_scratch=True, arch="vgg16", device="cpu"))
    assert not listed


# -- files that are not checkpoints -------------------------------------------------------------------
def test_a_file_that_is_not_a_checkpoint_is_named_as_such(run_dir, data, tmp_path, monkeypatch, capsys):
    import zipfile

    stop_training(monkeypatch)
    d2 = tmp_path / "model_final.pkl"  # the detectron2 export of a checkpoint: a plain pickle
    assert main(["export", str(run_dir), "--format", "detectron2", "--output", str(d2)]) == 0
    (tmp_path / "lincls.json").write_text(json.dumps({"top1": 12.5, "top5": 50.0}, indent=2))
    (tmp_path / "notes.txt").write_text("epochs 200, lr 0.03\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as z:
        z.writestr("a.txt", "not a checkpoint")
    (tmp_path / "cut.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes()[:4096])  # a copy cut short
    kinds = {
        "lincls.json": "it holds JSON text",
        "notes.txt": "it is a text file",
        "model_final.pkl": "it is a pickle, not a torch checkpoint",
        "empty.pt": "it is empty",
        "images.zip": "it is a zip file without the data.pkl",
        "cut.pt": "it is a zip file (torch's format) that cannot be opened: cut short or damaged?",
    }
    capsys.readouterr()
    for name, what in kinds.items():
        path = str(tmp_path / name)
        for argv in (
            ["knn", "--checkpoint", path, "--data", str(data)],
            ["lincls", "--checkpoint", path, "--out", str(tmp_path / "r.json")],
            ["finetune", "--checkpoint", path, "--out", str(tmp_path / "r.json")],
            ["export", path, "--format", "torchvision", "--output", str(tmp_path / "x.pth")],
        ):
            assert main([*argv, "--device", "cpu"]) == 2, argv
            err = one_line_error(capsys)
            assert f"{path} is not a moco-fast checkpoint: {what}" in err, (argv, err)
    # lincls's default --out is lincls.json beside the checkpoint: here the file itself, but what is
    # wrong is that it is no checkpoint (it said "--out .../lincls.json is the checkpoint this command reads")
    assert main(["lincls", "--checkpoint", str(tmp_path / "lincls.json"), "--device", "cpu"]) == 2
    err = one_line_error(capsys)
    assert "lincls.json is not a moco-fast checkpoint: it holds JSON text" in err and "--out" not in err, err
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "r.json").exists()


def test_checkpoints_in_torch_legacy_format_still_load(run_dir, tmp_path, capsys):
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    for protocol in (2, 4):
        old = tmp_path / f"legacy{protocol}.pt"
        torch.save(state, old, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
        out = tmp_path / f"r18_{protocol}.pth"
        assert main(["export", str(old), "--format", "torchvision", "--output", str(out)]) == 0
        assert len(torch.load(out)) == len(torchvision.models.resnet18().state_dict()) - 2


# -- one class ------------------------------------------------------------------------------------------
def test_classification_on_a_single_class_is_an_error(run_dir, tmp_path, monkeypatch, capsys, caplog):
    import moco_fast.lincls
    from moco_fast.commands import accuracy_text

    one = make_image_root(tmp_path / "one", per_class=4, classes=1, test_per_class=2)
    listed = []
    real = moco_fast.lincls.load_splits
    monkeypatch.setattr(moco_fast.lincls, "load_splits", lambda *a, **k: listed.append(a) or real(*a, **k))
    # lincls printed "top-1 100.00%  top-1 100.00%" for any backbone, without a word
    base = ["--checkpoint", str(run_dir), "--data", str(one), "--epochs", "1", "--workers", "0", "--device", "cpu"]
    for cmd in ("lincls", "finetune"):
        assert main([cmd, *base, "--batch-size", "2", "--out", str(tmp_path / f"{cmd}.json")]) == 2
        err = one_line_error(capsys)
        assert f"{one / 'train'} holds a single class (airplane)" in err and "100%" in err, err
        assert not (tmp_path / f"{cmd}.json").exists()
    assert not listed  # said before the images are listed
    # kNN warns (its accuracy is 100% too)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main(["knn", *base[:4], "--k", "3", "--device", "cpu", "--workers", "0"]) == 0
    assert "holds a single class (airplane): every neighbour votes for it, so kNN top-1 is 100%" in caplog.text
    # the printed accuracy: top-k only where it says more than top-1
    assert accuracy_text({"top1": 50.0, "top5": 100.0, "topk": 3}) == "top-1 50.00%  top-3 100.00%"
    assert accuracy_text({"top1": 100.0, "top5": 100.0, "topk": 1}) == "top-1 100.00%"


def test_lincls_prints_top1_and_topk(run_dir, data, tmp_path, capsys):
    argv = ["lincls", "--checkpoint", str(run_dir), "--data", str(data), "--epochs", "1", "--cached-features"]
    assert main([*argv, "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "l.json")]) == 0
    res = json.loads((tmp_path / "l.json").read_text())
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert res["topk"] == 3  # 3 classes
    assert line.startswith(f"linear classification: top-1 {res['top1']:.2f}%  top-3 {res['top5']:.2f}%  (6 eval"), line
