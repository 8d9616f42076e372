"""`moco-fast sweep`: the table of several settings, a result reused only for the same training
settings, resumed or restarted linear classifiers, runs trained further in their folder, grid flags
and folder names, and the errors it finds before training."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_image_root
from eval_helpers import interrupt_at, state_reads
from run_helpers import tiny_args

from moco_fast.cli import build_parser, main
from moco_fast.config import MAX_SEED


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
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)  # its run's checkpoint: not kept to the session's end


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
    # Completed from its checkpoint, without training again, and says so
    assert (run / "metrics.jsonl").read_text() == metrics
    assert [m for m in caplog.messages if m.startswith(f"{run} trained for its ") and "nothing to train" in m]
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
    monkeypatch.setattr(lincls, "run_lincls", lambda cfg, *listed: seen.append(cfg) or {"top1": 12.5})
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
    finished_sweep, six_root, tmp_path, monkeypatch, caplog, listed
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
    assert f"lincls: stopped; {state} holds epoch 1: the same sweep command continues it" in caplog.text
    assert f"sweep: stopped in {SWEEP_RUN}; the same sweep command continues" in caplog.text
    caplog.clear()
    # the sweep lists the data once, before any setting, for every setting's kNN and classifier and to
    # compare the state with: listed again by each classifier, its warnings were said again
    listed.clear()
    reads = state_reads(monkeypatch)
    with caplog.at_level(logging.INFO, logger="moco_fast"):
        assert main(args) == 0
    assert "--resume: lincls continues after epoch 1 of 2" in caplog.text and not state.exists()
    assert listed == ["train", "test"]
    # a look at whose state it is before anything trains (mapped: refuse_others_files), then read once,
    # whole, to compare it: run_lincls's check and its loop read it again
    assert [mapped for name, mapped in reads if name == state.name] == [True, False]
    with monkeypatch.context() as m:
        interrupt_at(m, moco_fast.lincls, 1)
        assert main(sweep_args(out, six_root, "--moco-m", "0.99", "--lincls-epochs", "4")) == 130
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="moco_fast"):
        assert main(sweep_args(out, six_root, "--moco-m", "0.99", "--lincls-epochs", "3")) == 0
    assert "its linear classifier stopped with other settings, checkpoint or images; it starts over" in caplog.text
    res = json.loads((out / SWEEP_RUN / "result.json").read_text())
    assert res["lincls_epochs"] == 3 and not state.exists()


@pytest.mark.parametrize(
    "changed, said",
    [
        ("images", "stopped with other settings, checkpoint or images"),
        ("state", "left a state that cannot be read (cut short or damaged?)"),
    ],
)
def test_sweep_restarts_a_linear_classifier_whose_images_or_state_changed(
    changed, said, finished_sweep, six_root, tmp_path, monkeypatch, caplog
):
    # Between a stop in a setting's linear classifier and the rerun, images added to --data (lincls
    # refuses its state then, and the sweep exited 2) or its state damaged (a record failing its
    # checksum, which the whole read checks; its line said "other settings"): the sweep starts its
    # own state over, and says why
    import moco_fast.lincls

    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    state = out / SWEEP_RUN / "sweep_lincls.state.pt"
    args = sweep_args(out, six_root, "--moco-m", "0.99", "--lincls-epochs", "2")
    with monkeypatch.context() as m:
        interrupt_at(m, moco_fast.lincls, 1)
        assert main(args) == 130
    assert state.is_file()
    first = next((six_root / "train").glob("*/*"))
    added = first.with_name("added" + first.suffix)
    if changed == "images":
        shutil.copy(first, added)  # six_root is the session's: taken out again below
    else:
        with open(state, "r+b") as fh:
            fh.seek(200)  # in the pickle's record
            fh.write(b"\xff" * 1000)
    try:
        with caplog.at_level(logging.INFO, logger="moco_fast"):
            assert main(args) == 0
    finally:
        added.unlink(missing_ok=True)
    assert f"{out / SWEEP_RUN}: its linear classifier {said}; it starts over" in caplog.text
    assert "--resume: lincls continues" not in caplog.text and not state.exists()
    assert json.loads((out / SWEEP_RUN / "result.json").read_text())["lincls_epochs"] == 2


@pytest.mark.parametrize("left", ["lincls state", "finetune state", "lincls result", "older lincls state"])
def test_sweep_keeps_classifier_files_it_did_not_leave(left, finished_sweep, six_root, tmp_path, monkeypatch, capsys):
    # A user's own `moco-fast lincls --out` under the sweep's name, stopped with other settings or
    # finished (or another command's state there): the sweep deleted the state as its own classifier's
    # ("starts over"), took another command's for a damaged one, and wrote over the result. It stops
    # before anything runs and keeps them. A state saved before states recorded what continues them
    # (an older sweep's own, or not) is kept too, and said to be one it cannot tell.
    import moco_fast.lincls

    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    run = out / SWEEP_RUN
    result, state = run / "sweep_lincls.json", run / "sweep_lincls.state.pt"
    user = ["lincls", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(six_root), "--device", "cpu"]
    user += ["--epochs", "3", "--cached-features", "--workers", "0", "--out", str(result)]
    if left == "lincls state":
        with monkeypatch.context() as m:
            interrupt_at(m, moco_fast.lincls, 1)
            assert main(user) == 130
    elif left == "finetune state":
        torch.save({"command": "finetune", "continued_by": None, "config": {}, "epoch": 1, "history": []}, state)
    elif left == "older lincls state":
        torch.save({"command": "lincls", "config": {}, "epoch": 1, "history": []}, state)
    else:
        assert main(user) == 0
    kept = {p: p.read_bytes() for p in (result, state) if p.exists()}
    assert main(sweep_args(out, six_root, "--moco-m", "0.99", "--lincls-epochs", "2")) == 2
    error = last_error(capsys)
    if left == "lincls result":
        assert f"{result} holds a result that the sweep did not write" in error
    else:
        command = left.split()[-2]
        whose = "cannot tell for its own" if left.startswith("older") else "did not leave"
        assert f"{state} holds an interrupted {command} run's state that the sweep {whose}" in error
        assert f"`moco-fast {command} --resume --out {result}`" in error
    assert {p: p.read_bytes() for p in (result, state) if p.exists()} == kept


@pytest.mark.parametrize("columns", [80, 100])
def test_sweep_help_is_wrapped_and_names_every_flag(columns, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(columns))
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= columns
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


def test_a_bad_flag_of_every_setting_is_named_without_a_settings_name(tiny_root, tmp_path, capsys):
    # it read "setting moco_K4_m0.9_sbn-on: --seed must be ...", as if that setting alone were wrong
    args = ["sweep", "--out", str(tmp_path), "--moco-m", "0.9,0.99", "--", "--data", str(tiny_root), "--seed", "-3"]
    assert main([*args, "--batch-size", "8", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"moco-fast sweep: error: --seed must be in 0..{MAX_SEED} (got -3)"
    ]
    assert not any(tmp_path.iterdir())


def test_a_memory_bank_k_below_1_is_refused_before_training(tiny_root, tmp_path, capsys):
    # it failed in the model's build, after the sweep had made the setting's folder
    args = ["sweep", "--out", str(tmp_path), "--mechanism", "memory-bank", "--moco-k", "0"]
    assert (
        main([*args, "--device", "cpu", "--", "--data", str(tiny_root), "--batch-size", "8", "--bn-splits", "2"]) == 2
    )
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "moco-fast sweep: error: --moco-k must be at least 1 (got 0)"
    )
    assert not any(tmp_path.iterdir())


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
    monkeypatch.setattr(sweep, "_train", lambda cfg, listed: trained.append(cfg))
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


def test_a_sweep_and_a_training_run_never_share_a_folder(six_root, tmp_path, capsys, monkeypatch):
    """A sweep's --out holding a run, or a run's --out holding a sweep's table: refused before
    anything trains (each would put its files among the other's)."""
    trained = stub_sweep_runs(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n')
    assert main(sweep_args(run, six_root, "--moco-m", "0.99")) == 2
    assert last_error(capsys).endswith(f"--out {run} holds a training run: give the sweep a folder of its own")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"] and not trained
    sweep_out = tmp_path / "sweep"
    assert main(sweep_args(sweep_out, six_root, "--moco-m", "0.99")) == 0  # writes its table
    assert main(tiny_args(six_root, sweep_out)) == 2
    assert "is a sweep's folder: a run needs a folder of its own" in last_error(capsys)
    assert not (sweep_out / "checkpoint.pt").exists() and not (sweep_out / "config.json").exists()


def test_a_second_sweep_into_a_running_sweeps_folder_stops_at_once(six_root, tmp_path, capsys, monkeypatch):
    # two sweeps in one --out each trained and evaluated the settings that neither had finished
    from moco_fast.run_folder import hold_sweep_folder

    trained = stub_sweep_runs(monkeypatch)
    out = tmp_path / "sweep"
    with hold_sweep_folder(out):  # the first sweep, running
        assert main(sweep_args(out, six_root, "--moco-m", "0.99")) == 2
        assert last_error(capsys).endswith(
            f"{out}: another moco-fast sweep is running there now; wait for it to end or choose another --out"
        )
        assert not trained and not any(out.iterdir())
    assert not out.exists()  # the folder the first one made, left empty, goes with it
    assert main(sweep_args(out, six_root, "--moco-m", "0.99")) == 0 and len(trained) == 1


# -- sweep: grid flags and folder names -------------------------------------------------------------
def test_a_sweep_folder_within_the_images_it_reads_is_refused(tmp_path, capsys, monkeypatch):
    """--out under --data's train (or eval) folder: the table's sweep.png (an image) and the sweep's
    folder became a class of the next setting's training data and of its kNN (the demo grid's
    second setting trained on 81 images of 11 classes, the first on 80 of 10)."""
    trained = stub_sweep_runs(monkeypatch)
    root = make_image_root(tmp_path / "data", per_class=4, classes=2, test_per_class=2)
    for within in (root / "train" / "sweep", root / "test" / "sweeps" / "a"):
        assert main(sweep_args(within, root, "--moco-m", "0.99")) == 2
        split = "train" if "train" in within.parts else "test"
        assert last_error(capsys).endswith(
            f"--out {within} lies within {root / split}, whose images the sweep reads: its files (sweep.png) "
            "would be read as training images; give a folder outside it"
        )
        assert not within.exists()
    assert main(sweep_args(root / "train", root / "train", "--moco-m", "0.99")) == 2  # a class-folder root
    assert "lies within" in last_error(capsys) and not trained
    assert main(sweep_args(root / "sweeps", root, "--moco-m", "0.99")) == 0  # beside the splits: read by none
    assert len(trained) == 1


def stub_sweep_runs(monkeypatch) -> list:
    """Replaces a sweep setting's training and evaluation with stand-ins; returns the settings trained."""
    from moco_fast import sweep

    trained = []
    monkeypatch.setattr(sweep, "_train", lambda cfg, listed: trained.append(cfg))
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


def test_sweep_refuses_a_folder_whose_table_files_are_not_a_sweeps(six_root, tmp_path, capsys, monkeypatch):
    # --out holding the user's sweep.md or sweep.png, beside no sweep.json (the mark of a sweep's
    # folder): the first table overwrote them without a word, and a plot-less machine deleted the png
    trained = stub_sweep_runs(monkeypatch)
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("sweep.md", "sweep.png"):
        (out / name).write_text("my notes")
        assert main(sweep_args(out, six_root, "--moco-m", "0.99")) == 2
        assert last_error(capsys).endswith(
            f"--out {out} holds {name} but no sweep.json: not a sweep's table, which the sweep would overwrite; "
            "move it away or choose another --out"
        )
        assert not trained and (out / name).read_text() == "my notes"
        (out / name).unlink()
    assert main(sweep_args(out, six_root, "--moco-m", "0.99")) == 0 and len(trained) == 1
    assert (out / "sweep.json").is_file() and (out / "sweep.md").is_file()  # its own, which it rewrites


def test_a_sweep_warns_of_eval_copies_of_training_images_once(finished_sweep, six_root, tmp_path, caplog, monkeypatch):
    # the check before training listed the data and warned, then each setting's kNN listed it again
    # and warned again: once per setting. Now every setting's kNN reads the check's listing
    import moco_fast.sweep

    data = shutil.copytree(six_root, tmp_path / "data")
    first = next((data / "train").glob("*/*"))
    shutil.copy(first, data / "test" / first.parent.name / first.name)  # an eval image copied from train/

    def trained(cfg, listed):  # the finished setting's checkpoint and metrics, instead of training each
        Path(cfg.runtime.out).mkdir(parents=True)
        for name in ("checkpoint.pt", "metrics.jsonl"):
            shutil.copy(finished_sweep / SWEEP_RUN / name, Path(cfg.runtime.out) / name)

    monkeypatch.setattr(moco_fast.sweep, "_train", trained)
    out = tmp_path / "sweep"
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main(sweep_args(out, data, "--moco-m", "0.9,0.99")) == 0
    said = [m for m in caplog.messages if "are byte copies of training images" in m]
    assert len(said) == 1 and "1 of the 19 images of the eval split" in said[0], caplog.messages
    rows = json.loads((out / "sweep.json").read_text())
    assert len(rows) == 2 and all(r["knn_top1"] is not None for r in rows)


@pytest.mark.slow
def test_a_sweep_lists_its_data_once_for_all_its_settings(six_root, tmp_path, listed):
    # the check before training listed --data, then every setting's training loader listed it again
    # (header-checked): minutes a setting on ImageNet, for the same listing
    out = tmp_path / "sweep"
    assert main(sweep_args(out, six_root, "--moco-m", "0.9,0.99")) == 0
    assert listed == ["train", "test"]
    rows = json.loads((out / "sweep.json").read_text())
    assert len(rows) == 2 and all(r["knn_top1"] is not None for r in rows)


def test_a_sweep_warns_of_few_images_a_bn_split_once_a_setting_it_trains(finished_sweep, six_root, tmp_path, caplog):
    # SWEEP_TRAIN's 4 images a BN split. Said by trainer.validate, it came from the check of every setting
    # before the first trains and again from each setting's run (3 lines here); the run that trains says
    # it now: m 0.9 trains, m 0.99 is reused
    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main(sweep_args(out, six_root, "--moco-m", "0.9,0.99")) == 0
    said = [m for m in caplog.messages if "gives each BN sub-batch 4 images" in m]
    assert len(said) == 1, caplog.messages


@pytest.fixture
def headers(monkeypatch) -> list[str]:
    """Each image whose header is checked (data.check_image) from here on."""
    import moco_fast.data

    checked, check_image = [], moco_fast.data.check_image
    monkeypatch.setattr(moco_fast.data, "check_image", lambda path: checked.append(path) or check_image(path))
    return checked


def test_a_sweep_that_trains_nothing_lists_its_data_without_checking_each_image(
    finished_sweep, six_root, tmp_path, monkeypatch, headers
):
    # every setting reused, or its checkpoint evaluated again: the check before training opened every
    # image to check its header (minutes on ImageNet), a check for a training loader, where only the
    # kNN reads the listing (which leaves out what it cannot decode)
    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    assert main(sweep_args(out, six_root, "--moco-m", "0.99")) == 0  # reused
    assert main(sweep_args(out, six_root, "--moco-m", "0.99", train=["--knn-k", "5"])) == 0  # evaluated again
    assert not headers
    trained = stub_sweep_runs(monkeypatch)
    assert main(sweep_args(out, six_root, "--moco-m", "0.99", "--redo")) == 0 and len(trained) == 1
    assert len(headers) == 54  # a setting trains on it: its 36 training and 18 eval images, as its loader checks them


def test_redo_says_nothing_of_the_results_it_deletes(six_root, tmp_path, caplog, monkeypatch):
    # the sweep read its folder's results before --redo deleted the grid's: a cut-short result.json
    # of a setting about to train anew was named as ignored, as if it counted
    trained = stub_sweep_runs(monkeypatch)
    out = tmp_path / "sweep"
    (out / SWEEP_RUN).mkdir(parents=True)
    (out / SWEEP_RUN / "result.json").write_text('{"name": ')
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main(sweep_args(out, six_root, "--moco-m", "0.99", "--redo")) == 0 and len(trained) == 1
    assert not [m for m in caplog.messages if "ignoring" in m], caplog.messages


def test_a_sweep_whose_classifiers_are_reused_lists_its_data_without_checking_each_image(
    finished_sweep, six_root, tmp_path, monkeypatch, headers
):
    # --lincls-epochs with every setting's classifier done (the same sweep run again for its table):
    # every image was opened to check its header, for a classifier that reads none
    from moco_fast import lincls

    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    monkeypatch.setattr(lincls, "run_lincls", lambda cfg, *listed: {"top1": 12.5})
    args = sweep_args(out, six_root, "--moco-m", "0.99", "--lincls-epochs", "3")
    assert main(args) == 0 and headers  # its classifier runs: the listing it reads is checked
    headers.clear()
    assert main(args) == 0  # reused
    assert not headers
