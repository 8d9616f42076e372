"""The evaluation commands' arguments (knn, lincls, finetune, export, sweep), on the CPU: help texts,
values checked before any data or checkpoint is read, one-line errors, run folders and defaults
for --checkpoint, what finetune needs of the checkpoint and the data, files that are not
checkpoints, a single class, a class folder linked to another (knn), and the commands refused under
torchrun."""

from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch
import torchvision
from conftest import make_image_root
from eval_cli_helpers import Stop, one_line_error, stop_training

from moco_fast.cli import build_parser, main
from moco_fast.commands import HelpFormatter
from moco_fast.config import ConfigError

COMMANDS = ("knn", "lincls", "finetune", "export")


# -- help -------------------------------------------------------------------------------------------
def test_every_flag_has_help_that_states_its_default(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for cmd in (*COMMANDS, "train", "convert", "sweep"):
        for action in sub.choices[cmd]._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (cmd, action.dest)
            # nothing to default: required, positional, a flag that only says "do this" (--force,
            # train's --resume [PATH]); an --x/--no-x pair has a default, and train's come from the preset
            if action.required or not action.option_strings or action.nargs == "?":
                continue
            if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
                continue
            text = HelpFormatter(cmd)._get_help_string(action)
            if "default" not in text:
                missing.append((cmd, action.option_strings[0]))
    assert not missing, missing
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "training epochs (default: 90)" in text and "(default: 0.0001)" in text
    assert "with --from-scratch and no checkpoint (default: resnet50)" in text  # --arch: config.SCRATCH_ARCH
    with pytest.raises(SystemExit):
        main(["lincls", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 100)" in text and "SGD weight decay (default: 0.0)" in text and "--seed SEED random" in text


def test_sweep_help_says_the_linear_classifiers_schedule(tmp_path, monkeypatch, capsys):
    # --lincls-epochs said "for this many epochs" alone: its lr drops were in no help or doc, so a
    # figure could not be matched with a lincls run. The schedule named is the one the classifier runs
    import moco_fast.lincls
    from moco_fast.config import build_config
    from moco_fast.sweep_eval import _linear

    ran = []
    monkeypatch.setattr(moco_fast.lincls, "run_lincls", lambda cfg, *a: ran.append(cfg) or {"top1": 0.0})
    cfg = build_config("cifar", {"data.data": str(tmp_path / "data"), "runtime.device": "cpu"})
    _linear(cfg, tmp_path, None, 100, 30.0)
    first, second = ran[0].schedule.split(",")
    assert (moco_fast.lincls.LinclsConfig.epochs, moco_fast.lincls.LinclsConfig.schedule) == (100, ran[0].schedule)
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    said = f"for this many epochs, its lr x0.1 at {first}% and {second}% of them as lincls' {first},{second} of 100"
    assert said in text


def test_train_help_names_each_presets_own_defaults():
    # train's flags default to the preset's value: a help that gave only v2's (--epochs "default 200")
    # was wrong for the demo preset that plain `moco-fast train` runs (8 epochs, batch 128, K 1024)
    from moco_fast.commands.train import FLAG_FIELDS
    from moco_fast.config import PRESETS, TrainConfig, build_config

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: " ".join(a.help.split()) for a in sub.choices["train"]._actions}
    base = build_config("v2")
    wrong = []
    for preset, overrides in PRESETS.items():
        for dest, field in FLAG_FIELDS.items():
            if field not in overrides or field == "runtime.out":  # --out's default names a folder per preset
                continue
            section, name = field.split(".")
            value, v2 = overrides[field], getattr(getattr(base, section), name)
            if value == v2:
                continue
            text = helps[dest]
            forms = {str(value), f"{value:g}"} if isinstance(value, (int, float)) else {str(value)}
            said = isinstance(value, bool) or any(f in text for f in forms)
            if preset not in text or not said:
                wrong.append((preset, dest, value, text))
    assert not wrong, wrong
    assert TrainConfig().optim.epochs == 200 and "default 200" in helps["epochs"]
    # without --data every preset trains the demo set at its own 32 px, v2 too
    from moco_fast.commands.train import config_from_args

    v2_on_demo = config_from_args(parser.parse_args(["train", "--preset", "v2"]))
    assert v2_on_demo.data.aug.image_size == 32 and "32 with any preset on the demo set" in helps["image_size"]


def test_the_preset_help_names_the_loaders_that_make_plain_train_run_v2():
    # without --data plain train runs the demo preset only with a loader that reads the demo set as it
    # is: the help said "demo without --data", and `train --loader synthetic` ran v2 (200 epochs, ResNet-50)
    from moco_fast.commands.train import config_from_args

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(next(a for a in sub.choices["train"]._actions if a.dest == "preset").help.split())
    default = text[text.index("(default") :]
    for loader in ("torch", "resident", "dali", "ffcv", "synthetic"):
        preset = config_from_args(parser.parse_args(["train", "--loader", loader])).preset
        assert (loader in default) == (preset == "v2"), (loader, preset, default)


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
        (["knn", "--t", "inf"], "--t must be above 0 and finite (got inf)"),  # was a plain vote, unsaid
        (["knn", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["knn", "--image-size", "4"], "--image-size must be at least 8"),
        (["knn", "--workers", "-2"], "--workers must be -1 (auto)"),
        (["lincls", "--workers", "-2"], "--workers must be -1 (auto)"),
        (["lincls", "--lr", "-1"], "--lr must be above 0"),
        (["lincls", "--image-size", "0"], "--image-size must be at least 8"),
        (["finetune", "--image-size", "4"], "--image-size must be at least 8"),
        (["lincls", "--image-size", "22400"], "--image-size must be at most 4096"),  # allocated for ever
        (["finetune", "--image-size", "22400"], "--image-size must be at most 4096"),
        (["lincls", "--momentum", "2"], "--momentum must be in [0, 1)"),
        (["finetune", "--momentum", "-0.5"], "--momentum must be in [0, 1)"),
        (["lincls", "--schedule", ","], "--schedule expects epochs like 60,80"),
        (["finetune", "--lr", "0"], "--lr must be above 0"),
        (["lincls", "--eval-every", "-1"], "--eval-every must be 0 or more"),
        (["finetune", "--weight-decay", "-1"], "--weight-decay"),
        (["lincls", "--weight-decay", "inf"], "--weight-decay must be 0 or more and finite (got inf)"),  # diverged
        (["finetune", "--weight-decay", "inf"], "--weight-decay must be 0 or more and finite (got inf)"),
        (["lincls", "--seed", str(2**64)], "--seed must be in 0..4294967295"),  # torch's seed overflowed
        (["finetune", "--seed", "-1"], "--seed must be in 0..4294967295"),
        (["finetune", "--save-model", "m.pt", "--no-save-model"], "--save-model m.pt and --no-save-model contradict"),
        (["knn", "--device", "gpu"], "cpu, cuda, cuda:N"),
        (["lincls", "--device", "gpu"], "cpu, cuda, cuda:N"),
        (["finetune", "--device", "gpu"], "cpu, cuda, cuda:N"),
    ],
)
def test_bad_values_are_one_line_errors_before_anything_is_read(argv, message, tmp_path, capsys):
    # The checkpoint does not exist: a value error first shows that nothing was read before the checks.
    assert main([*argv, "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert message in one_line_error(capsys)


@pytest.mark.parametrize("cmd", ["knn", "lincls", "finetune"])
def test_a_missing_gpu_is_named_as_the_device_flag_gave_it(cmd, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU machine, also on a GPU one
    assert main([cmd, "--device", "cuda:3", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert one_line_error(capsys).endswith("--device cuda:3 was asked for but no CUDA GPU is available")  # said cuda


@pytest.mark.parametrize("cmd", ["lincls", "finetune"])
def test_a_large_image_size_within_the_bound_passes_the_checks(cmd, run_dir, tmp_path, monkeypatch):
    seen = stop_training(monkeypatch)
    argv = [cmd, "--checkpoint", str(run_dir), "--device", "cpu", "--out", str(tmp_path / "r.json")]
    argv += ["--no-save-model"] if cmd == "finetune" else []
    with pytest.raises(Stop):  # 4096 (config.MAX_IMAGE_SIZE): fine-tuning at high resolution stays possible
        main([*argv, "--image-size", "4096"])
    assert seen[-1].image_size == 4096


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
    assert "--stem cifar contradicts the checkpoint, a network with the imagenet stem (" in one_line_error(capsys)
    with pytest.raises(Stop):  # agreeing flags pass
        main([*argv, "--arch", "resnet18", "--stem", "imagenet"])


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


def test_export_takes_the_checkpoint_and_out_as_the_other_commands_name_them(run_dir, tmp_path, capsys):
    # knn, lincls and finetune take --checkpoint and --out: export took only its argument and --output,
    # and `export --checkpoint RUN --out FILE` (a user of those) was "unrecognized arguments: --checkpoint"
    first, second = tmp_path / "a.pth", tmp_path / "b.pth"
    assert main(["export", str(run_dir), "--format", "torchvision", "--output", str(first)]) == 0
    assert main(["export", "--checkpoint", str(run_dir), "--format", "torchvision", "--out", str(second)]) == 0
    a, b = torch.load(first), torch.load(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    argv = ["--format", "torchvision", "--output", str(tmp_path / "c.pth")]
    assert main(["export", str(run_dir), "--checkpoint", str(run_dir), *argv]) == 2
    assert one_line_error(capsys).endswith("the checkpoint is given twice (CHECKPOINT and --checkpoint): give it once")
    assert main(["export", *argv]) == 2
    assert "give the checkpoint to export: moco-fast export CHECKPOINT" in one_line_error(capsys)
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), *argv]) == 2
    assert one_line_error(capsys).endswith(f"--checkpoint: checkpoint not found: {tmp_path / 'none.pt'}")
    assert not (tmp_path / "c.pth").exists()


def test_knn_scores_a_state_dict_at_the_image_size_given(data, tmp_path, monkeypatch, capsys):
    # A file without a recipe is read at 224 px: an export of a 32 px run (the demo's) took 15 min on
    # the demo set on a CPU, against a minute for its checkpoint, with no flag to say 32 px
    import moco_fast.knn

    sizes = []

    def knn_score(net, train, eval, aug, *args):
        sizes.append(aug.image_size)
        raise Stop

    monkeypatch.setattr(moco_fast.knn, "knn_score", knn_score)
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    argv = ["knn", "--checkpoint", str(path), "--data", str(data), "--device", "cpu"]
    for extra in ([], ["--image-size", "32"]):
        with pytest.raises(Stop):
            main([*argv, *extra])
    assert sizes == [224, 32]


def test_knn_refuses_a_class_folder_linked_to_another(run_dir, tmp_path, capsys):
    # the command lists with labelled=True: the link is one line and exit 2, not a warning and a score
    root = make_image_root(tmp_path / "data", per_class=2, classes=2, test_per_class=1)
    b = sorted((root / "train").iterdir())[1]
    (root / "train" / "linkcls").symlink_to(b.name)
    argv = ["knn", "--checkpoint", str(run_dir), "--data", str(root), "--k", "1", "--device", "cpu", "--workers", "0"]
    assert main(argv) == 2
    said = capsys.readouterr()
    assert said.out == "" and len(said.err.strip().splitlines()) == 1, said
    assert "are one folder" in said.err and str(b) in said.err and str(root / "train" / "linkcls") in said.err


# -- refused before anything runs -------------------------------------------------------------------
def test_sweep_refuses_run_level_train_flags(tmp_path, capsys):
    # also abbreviated, as argparse takes them: `--forc` and `--print-conf` passed a check of the
    # words, and were applied or dropped without a word (`--resu x`: train's "checkpoint not found")
    abbreviated = {"--resume": "--resu=x", "--force": "--forc", "--print-config": "--print-conf"}
    for flag, short in abbreviated.items():
        for given in (flag, short):
            assert main(["sweep", "--out", str(tmp_path / "s"), "--", "--device", "cpu", given]) == 2
            assert f"{flag} is not a setting" in one_line_error(capsys)
    for given in (["--out=x"], ["--ou", "x"], ["--out="]):
        assert main(["sweep", "--out", str(tmp_path / "s"), "--", "--device", "cpu", *given]) == 2
        assert "give the sweep folder as `moco-fast sweep --out DIR`, not after `--`" in one_line_error(capsys)
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
    import gzip
    import tarfile
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
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256))  # torch.load: "invalid load key, '\xff'."
    (tmp_path / "photo.pth").write_bytes(jpeg)
    (tmp_path / "r18.pth.gz").write_bytes(gzip.compress((run_dir / "checkpoint.pt").read_bytes()[:4096]))
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:  # convert's WebDataset: torch.load read it as its legacy tar
        tar.add(d2, arcname="000000.jpg")
    kinds = {
        "lincls.json": "it holds JSON text",
        "notes.txt": "it is a text file",
        "model_final.pkl": "it is a pickle, not a torch checkpoint",
        "empty.pt": "it is empty",
        "images.zip": "it is a zip file without the data.pkl",
        "cut.pt": "it is a zip file (torch's format) that cannot be opened: cut short or damaged?",
        "photo.pth": "it is neither torch.save's zip nor a pickle (an image, a compressed file?)",
        "r18.pth.gz": "it is neither torch.save's zip nor a pickle (an image, a compressed file?)",
        "shard.tar": "it is a tar archive, not torch's legacy format (a WebDataset shard?)",
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


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda c: c["optim"].update(epochs="two"), 'optim.epochs is "two", not an integer'),
        (lambda c: c["data"]["aug"].update(image_size="32"), 'data.aug.image_size is "32", not an integer'),
        (lambda c: c.update(model=None), "model is null, not an object of settings"),
    ],
    ids=["epochs", "image_size", "model"],
)
def test_a_checkpoint_whose_config_holds_a_value_of_another_type_is_named(
    run_dir, data, tmp_path, capsys, change, said
):
    # config.from_dict names a value of another type with a TypeError, which each command that reads a
    # checkpoint's config let out as a traceback (exit 1)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    change(state["config"])
    bad = tmp_path / "edited.pt"
    torch.save(state, bad)
    for argv in (
        ["knn", "--checkpoint", str(bad), "--data", str(data)],
        ["lincls", "--checkpoint", str(bad), "--out", str(tmp_path / "r.json")],
        ["finetune", "--checkpoint", str(bad), "--out", str(tmp_path / "r.json")],
        ["export", str(bad), "--format", "torchvision", "--output", str(tmp_path / "x.pth")],
        ["train", "--resume", str(bad), "--out", str(tmp_path / "run"), "--print-config"],
    ):
        assert main([*argv, "--device", "cpu"]) == 2, argv
        assert one_line_error(capsys).endswith(f"error: {bad}: its saved config cannot be read ({said})"), argv


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
    # the printed accuracy: top-k only where it says more than top-1, and not where k is every class
    # (it printed "top-3 100.00%" on 3 classes, whatever the backbone)
    assert accuracy_text({"top1": 50.0, "top5": 90.0, "topk": 5, "num_classes": 6}) == "top-1 50.00%  top-5 90.00%"
    assert accuracy_text({"top1": 50.0, "top5": 100.0, "topk": 3, "num_classes": 3}) == "top-1 50.00%"
    assert accuracy_text({"top1": 50.0, "top5": 100.0, "topk": 5, "num_classes": 5}) == "top-1 50.00%"
    assert accuracy_text({"top1": 100.0, "top5": 100.0, "topk": 1, "num_classes": 1}) == "top-1 100.00%"


@pytest.mark.parametrize("command", ["lincls", "finetune", "knn"])
def test_default_workers_are_at_most_the_cores(command, monkeypatch):
    # lincls' 4 workers on a 2-core machine made torch warn ("suggested max number of worker"), with
    # its source line, twice a run; a count given on the command line is kept as given
    import moco_fast.cores
    from moco_fast.commands import resolve_eval_runtime

    monkeypatch.setattr(moco_fast.cores, "available_cores", lambda: 1)
    args = build_parser().parse_args([command, "--checkpoint", "x.pt", "--device", "cpu"])
    resolve_eval_runtime(args)
    assert args.workers == 1
    args = build_parser().parse_args([command, "--checkpoint", "x.pt", "--device", "cpu", "--workers", "3"])
    resolve_eval_runtime(args)
    assert args.workers == 3
