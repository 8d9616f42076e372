"""What a run folder holds across commands: `--resume` continues a run as it was configured,
a finished run is not redone, another run's folder is not overwritten without --force, and bad
flag values are one-line errors before anything starts."""

import json
import os
import shutil
import stat

import pytest
import torch

from moco_fast import checkpoint as ckpt
from moco_fast.cli import main
from moco_fast.data import DataError


def tiny_args(data, out, epochs=1):
    return [
        "train", "--data", str(data), "--preset", "cifar", "--arch", "resnet18", "--stem", "imagenet",
        "--epochs", str(epochs), "--batch-size", "8", "--moco-k", "16", "--bn-splits", "2",
        "--device", "cpu", "--workers", "0", "--out", str(out), "--no-final-knn",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    """One finished 1-epoch run, trained once for the module; tests change copies of it (`run`)."""
    out = tmp_path_factory.mktemp("runs") / "one-epoch"
    assert main(tiny_args(tiny_root, out)) == 0
    return out


@pytest.fixture
def run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_only_out_continues_the_run_as_configured(tiny_root, run, capsys):
    out = run
    # No preset, data or model flags: they come from the checkpoint (the defaults would differ:
    # demo preset, K 1024, 8 BN splits, the demo set).
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2", "--device", "cpu", "--workers", "0"]) == 0
    assert [r["epoch"] for r in rows(out)] == [1, 2]
    saved = json.loads((out / "config.json").read_text())
    assert saved["moco"]["k"] == 16 and saved["data"]["data"] == str(tiny_root) and saved["optim"]["epochs"] == 2
    assert "finished epoch 2" in capsys.readouterr().out


def test_resuming_a_finished_run_changes_nothing(tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*tiny_args(tiny_root, out), "--final-knn"]
    assert main(args) == 0
    summary, config = (out / "summary.json").read_text(), (out / "config.json").read_text()
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    capsys.readouterr()
    assert main([*args, "--resume", "--lr", "0.5"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "summary.json").read_text() == summary and len(rows(out)) == 1
    assert (out / "config.json").read_text() == config  # flags that trained nothing are not recorded
    after = torch.load(out / "checkpoint.pt", weights_only=False)
    assert torch.equal(after["model"]["encoder_q.head.weight"], state["model"]["encoder_q.head.weight"])


def test_another_runs_folder_is_not_overwritten_without_force(tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_root, out, epochs=2)) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(tiny_args(tiny_root, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run already" in err[0] and "--force" in err[0], err
    assert (out / "checkpoint.pt").read_bytes() == before
    # --force starts over: the old rows and TensorBoard events go with the old checkpoint
    old_events = set((out / "tb").iterdir())
    assert main([*tiny_args(tiny_root, out), "--force"]) == 0
    assert [r["epoch"] for r in rows(out)] == [1]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert not old_events & set((out / "tb").iterdir())


def test_resume_drops_rows_logged_after_the_checkpoint(tiny_root, run):
    out = run
    with open(out / "metrics.jsonl", "a") as fh:  # as if a run died between its row and its checkpoint
        fh.write(json.dumps({"epoch": 2, "loss": 9.9}) + "\n" + '{"epoch": 3, "lo')
    assert main([*tiny_args(tiny_root, out, epochs=2), "--resume"]) == 0
    got = rows(out)
    assert [r["epoch"] for r in got] == [1, 2] and got[1]["loss"] != 9.9


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--bn-splits", "0", "--bn-splits must be at least 1"),
        ("--log-every", "0", "--log-every must be at least 1"),
        ("--image-size", "0", "--image-size must be at least 8"),
        ("--device", "gpu", "--device 'gpu'"),
        ("--workers", "-2", "--workers must be at least -1"),
        ("--lr", "-1", "--lr must be positive"),
        ("--knn-k", "0", "--knn-k must be at least 1"),
        ("--knn-t", "0", "--knn-t must be positive"),
    ],
)
def test_bad_values_are_one_line_errors(tiny_root, tmp_path, capsys, flag, value, says):
    args = tiny_args(tiny_root, tmp_path / "never")
    if flag in args:
        i = args.index(flag)
        args[i + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "never").exists()


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt.save_atomic({"x": 1}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == 0o644


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    with pytest.raises(DataError, match="not a checkpoint"):
        ckpt.load(tmp_path / "t.pt")
    torch.save({"config": {}, "model": {}}, tmp_path / "d.pt")
    with pytest.raises(DataError):
        ckpt.load_model(tmp_path / "d.pt")


def test_resuming_another_run_into_a_run_folder_needs_force(tiny_root, run, tmp_path, capsys):
    a, c = run, tmp_path / "c"
    assert main([*tiny_args(tiny_root, c, epochs=3), "--seed", "7"]) == 0
    before = (c / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    resume_a = [*tiny_args(tiny_root, c, epochs=2), "--resume", str(a / "checkpoint.pt")]
    assert main(resume_a) == 2
    assert "holds another run" in capsys.readouterr().err
    assert (c / "checkpoint.pt").read_bytes() == before
    # --force: c's files go, a's run continues there (its epoch 2 only: epoch 1 was logged in a)
    (c / "lincls.json").write_text("{}")  # an evaluation of the old run goes with it
    assert main([*resume_a, "--force"]) == 0
    assert [r["epoch"] for r in rows(c)] == [2] and not (c / "lincls.json").exists()
    assert torch.load(c / "checkpoint.pt", weights_only=False)["config"]["runtime"]["seed"] == 0


def test_leftover_rows_without_a_checkpoint_count_as_a_run(tiny_root, run, capsys):
    out = run
    (out / "checkpoint.pt").unlink()  # as if a run died before its first checkpoint
    capsys.readouterr()
    assert main(tiny_args(tiny_root, out)) == 2
    assert "holds a run already" in capsys.readouterr().err
    assert main([*tiny_args(tiny_root, out), "--force"]) == 0
    assert [r["epoch"] for r in rows(out)] == [1]


def test_resume_without_out_finds_the_presets_folder(tmp_path, monkeypatch):
    # The demo preset writes runs/demo: `train --resume` alone continues that run as configured.
    from moco_fast.cli import build_parser
    from moco_fast.commands.train import config_from_args
    from moco_fast.config import build_config, to_dict

    monkeypatch.chdir(tmp_path)
    saved = build_config("demo", {"optim.epochs": 3, "moco.k": 512, "optim.lr": 0.05})
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    torch.save({"config": to_dict(saved), "epoch": 1}, tmp_path / "runs" / "demo" / "checkpoint.pt")
    cfg = config_from_args(build_parser().parse_args(["train", "--resume"]))
    assert (cfg.moco.k, cfg.optim.epochs, cfg.optim.lr) == (512, 3, 0.05)
    assert cfg.runtime.out == "runs/demo"
