"""`moco-fast sweep`: the table of several settings, a result reused only for the same training
settings, resumed or restarted linear classifiers, runs trained further in their folder, and how often
it lists and checks its data. What it refuses before training: test_sweep_checks.py."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from eval_helpers import interrupt_at, state_reads
from run_helpers import SWEEP_RUN, last_error, stub_sweep_runs, sweep_args

from moco_fast.cli import main


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


@pytest.fixture(scope="module")
def finished_sweep(six_root, tmp_path_factory):
    """A sweep folder with one finished setting (moco, K 16, m 0.99); tests work on copies."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    assert main(sweep_args(out, six_root, "--moco-m", "0.99")) == 0
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)  # its run's checkpoint: not kept to the session's end


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


def test_the_table_warns_of_linear_figures_of_another_classifier(
    finished_sweep, six_root, tmp_path, monkeypatch, caplog
):
    # Another grid's setting in the folder, classified with the default lr 30, and this grid's with
    # 0.5: the linear column set both figures side by side without a word (the warning compared the
    # training configs only, and --lincls-lr is the sweep's flag, in none of them).
    from moco_fast import lincls

    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    other = json.loads((out / SWEEP_RUN / "result.json").read_text())
    other.update(name="moco_K32_m0.99_sbn-on", k=32, linear_top1=40.0, lincls_epochs=3, lincls_lr=30.0)
    (out / other["name"]).mkdir()
    (out / other["name"] / "result.json").write_text(json.dumps(other))
    monkeypatch.setattr(lincls, "run_lincls", lambda cfg, *listed: {"top1": 12.5})

    def mixed(*flags: str) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moco_fast"):
            assert main(sweep_args(out, six_root, "--moco-m", "0.99", *flags)) == 0
        return [m for m in caplog.messages if "the table mixes" in m]

    assert mixed("--lincls-epochs", "3", "--lincls-lr", "0.5") == [
        "the table mixes runs whose settings differ beyond the grid: lincls_lr (0.5, 30.0)"
    ]
    assert mixed("--lincls-epochs", "3", "--lincls-lr", "30") == []  # the same classifier: no line
    # a result of an older moco-fast records neither flag (nor its config): its classifier is unknown,
    # and the line named it "lincls_epochs (3, None), lincls_lr (0.5, None)"
    for k in ("lincls_epochs", "lincls_lr", "config"):
        del other[k]
    (out / other["name"] / "result.json").write_text(json.dumps(other))
    assert mixed("--lincls-epochs", "3", "--lincls-lr", "0.5") == []


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
    # a look at whose state it is before anything trains and as the classifier starts (mapped:
    # refuse_others_files), then read once, whole, to compare it: run_lincls's check and its loop read it again
    assert [mapped for name, mapped in reads if name == state.name] == [True, True, False]
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


def test_sweep_stops_where_a_users_classifier_writes_into_its_name(finished_sweep, six_root, tmp_path, capsys):
    # its line said "another moco-fast sweep is writing it now", which hold_sweep_folder rules out, and
    # then "lincls or finetune": the lock names its holder
    from moco_fast.run_folder import hold_output

    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    result = out / SWEEP_RUN / "sweep_lincls.json"
    with hold_output(result, "lincls"):  # as a user's `moco-fast lincls --out` of that name holds it
        assert main(sweep_args(out, six_root, "--moco-m", "0.99", "--lincls-epochs", "2")) == 2
    assert f"{result}: another moco-fast lincls is writing it now" in last_error(capsys)


def test_a_users_classifier_into_the_sweeps_name_is_told_the_sweep_holds_it(
    finished_sweep, six_root, tmp_path, monkeypatch
):
    # run_sweep's own call of hold_output: the tests held that lock through hold_output with the
    # sweep's arguments written out, so a call site passing another command ("lincls") or another
    # result went unseen. A user's lincls into sweep_lincls.json while the sweep's classifier runs
    import moco_fast.lincls as lincls
    from moco_fast.run_folder import RunFolderBusy, hold_output

    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    result, real_run, said = out / SWEEP_RUN / "sweep_lincls.json", lincls.run_lincls, []

    def users_lincls_meanwhile(*args, **kw):
        with pytest.raises(RunFolderBusy) as e, hold_output(result, "lincls"):  # as `moco-fast lincls --out` does
            pass
        said.append(str(e.value))
        return real_run(*args, **kw)

    monkeypatch.setattr(lincls, "run_lincls", users_lincls_meanwhile)
    assert main(sweep_args(out, six_root, "--moco-m", "0.99", "--lincls-epochs", "2")) == 0
    assert said == [f"{result}: another moco-fast sweep is writing it now; wait for it to end or choose another --out"]


def test_sweep_stops_where_a_lock_names_no_holder(finished_sweep, six_root, tmp_path, capsys):
    # a lock file of a moco-fast from before its holders named themselves, held: the sweep's line names
    # the commands that take that lock (run_sweep's call of hold_output, its `unknown`), not itself
    import fcntl

    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    lock = out / SWEEP_RUN / ".sweep_lincls.state.pt.lock"
    lock.touch()
    with lock.open() as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert main(sweep_args(out, six_root, "--moco-m", "0.99", "--lincls-epochs", "2")) == 2
    said = f"{out / SWEEP_RUN / 'sweep_lincls.json'}: another moco-fast lincls or finetune is writing it now"
    assert said in last_error(capsys)


def test_sweep_writes_its_classifier_result_over_one_cut_short(finished_sweep, six_root, tmp_path, caplog):
    # nobody's to keep (an older moco-fast's, cut short by a crash): the classifier writes its own over
    # it, saying nothing of it (the look at whose it is warned at each look, twice)
    out = shutil.copytree(finished_sweep, tmp_path / "sweep")
    result = out / SWEEP_RUN / "sweep_lincls.json"
    result.write_text('{"top1": 5')
    with caplog.at_level(logging.INFO, logger="moco_fast"):
        assert main(sweep_args(out, six_root, "--moco-m", "0.99", "--lincls-epochs", "2")) == 0
    assert str(result) not in caplog.text
    assert json.loads(result.read_text())["continued_by"] == "the same sweep command continues it"


@pytest.mark.parametrize(
    "left",
    [
        *("lincls state", "finetune state", "lincls result", "older lincls state", "lincls result since"),
        *("checkpoint", "finetune result"),
    ],
)
def test_sweep_keeps_classifier_files_it_did_not_leave(left, finished_sweep, six_root, tmp_path, monkeypatch, capsys):
    # A user's own `moco-fast lincls --out` under the sweep's name, stopped with other settings or
    # finished (or another command's state there): the sweep deleted the state as its own classifier's
    # ("starts over"), took another command's for a damaged one, and wrote over the result. It stops
    # before anything runs and keeps them. A state saved before states recorded what continues them
    # (an older sweep's own, or not) is kept too, and said to be one it cannot tell. A result that
    # comes after that first look (while other settings train) was written over: the classifier looks again.
    # A file that is no classifier's state (a training checkpoint) was said to be an older state, a
    # finetune result a lincls one.
    import moco_fast.lincls
    import moco_fast.sweep

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
    elif left == "checkpoint":
        shutil.copyfile(run / "checkpoint.pt", state)
    elif left == "finetune result":  # the fields that say whose it is (a finetune run takes minutes)
        from moco_fast.finetune import PROTOCOL

        result.write_text(json.dumps({"protocol": PROTOCOL, "top1": 50.0, "continued_by": None}))
    else:
        assert main(user) == 0
    kept = {p: p.read_bytes() for p in (result, state) if p.exists()}
    if left.endswith("since"):
        aside, look = result.rename(tmp_path / "aside.json"), moco_fast.sweep.refuse_others_files
        monkeypatch.setattr(moco_fast.sweep, "refuse_others_files", lambda folder: (look(folder), aside.rename(result)))
    assert main(sweep_args(out, six_root, "--moco-m", "0.99", "--lincls-epochs", "2")) == 2
    error = last_error(capsys)
    if " result" in left:
        command = left.split()[0]
        assert f"{result} holds a {command} result that the sweep did not write (a `moco-fast {command} --out`" in error
    elif left == "checkpoint":
        assert f"{state} holds a file that the sweep did not leave: " in error and "--resume" not in error
    else:
        command = left.split()[-2]
        whose = "cannot tell for its own" if left.startswith("older") else "did not leave"
        assert f"{state} holds an interrupted {command} run's state that the sweep {whose}" in error
        assert f"`moco-fast {command} --resume --out {result}`" in error
    assert {p: p.read_bytes() for p in (result, state) if p.exists()} == kept


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


def test_a_setting_that_diverges_is_a_row_and_the_sweep_goes_on(six_root, tmp_path, capsys, monkeypatch):
    # a diverged setting (the paper's "fail" of m = 0) ended the whole grid: the settings after it
    # never trained, and the table had no row for it
    from moco_fast import sweep
    from moco_fast.divergence import Diverged

    trained = stub_sweep_runs(monkeypatch)

    def train(cfg, listed):
        trained.append(cfg)
        if cfg.moco.m == 0:
            raise Diverged("the run diverged in epoch 1: 3 tensors of the model hold NaN or inf; lower --lr")

    monkeypatch.setattr(sweep, "_train", train)
    out = tmp_path / "sweep"
    assert main(sweep_args(out, six_root, "--moco-m", "0,0.99")) == 1
    assert [cfg.moco.m for cfg in trained] == [0, 0.99]  # the second setting still trained
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in rows] == ["moco_K16_m0_sbn-on", SWEEP_RUN]
    assert "diverged in epoch 1" in rows[0]["error"] and "error" not in rows[1]
    assert "| moco | 16 | 0 | on | 1 | diverged |" in (out / "sweep.md").read_text()
    assert last_error(capsys) == "moco-fast sweep: error: diverged: moco_K16_m0_sbn-on (sweep.json has each error)"
    assert not (out / "moco_K16_m0_sbn-on" / "result.json").exists()  # tried again by the next sweep


def test_a_diverged_setting_s_row_shows_the_k_it_ran_with(six_root, tmp_path, monkeypatch, request):
    # a diverged row showed K as asked where a finished row shows what ran: end-to-end's K ('-', not
    # the batch) and a memory bank larger than the 36 training images (64, not 36 with the K asked)
    from moco_fast import sweep
    from moco_fast.divergence import Diverged

    stub_sweep_runs(monkeypatch)

    def train(cfg, listed):
        raise Diverged("the run diverged in epoch 1: 3 tensors of the model hold NaN or inf; lower --lr")

    monkeypatch.setattr(sweep, "_train", train)
    out = tmp_path / "sweep"
    assert main(sweep_args(out, six_root, "--mechanism", "end-to-end,memory-bank", "--moco-k", "64")) == 1
    e2e, bank = json.loads((out / "sweep.json").read_text())
    assert e2e["k"] == 8 and bank["k"] == 36 and bank["k_asked"] == 64 and "k_asked" not in e2e
    table = (out / "sweep.md").read_text()
    assert "| end-to-end | 8 (batch) | on | 1 | diverged |" in table, table  # no m column: no key encoder
    assert "| memory-bank | 36 (bank size; 64 asked) | on | 1 | diverged |" in table, table
    # on a .beton (no listing): its header's 32 images, where the row showed the 64 asked
    pytest.importorskip("ffcv")
    beton = request.getfixturevalue("tiny_beton")
    out = tmp_path / "on_beton"
    grid = ("--mechanism", "memory-bank", "--moco-k", "64")
    assert main(sweep_args(out, beton, *grid, train=("--loader", "ffcv"))) == 1
    assert "| memory-bank | 32 (bank size; 64 asked) | on | 1 | diverged |" in (out / "sweep.md").read_text()
    # on a shard set (--loader dali): its meta.json's 36 images, where the row showed the 64 asked
    pytest.importorskip("nvidia.dali")
    shards = tmp_path / "shards"
    assert main(["convert", str(six_root), str(shards), "--format", "wds", "--workers", "1"]) == 0
    out = tmp_path / "on_shards"
    assert main(sweep_args(out, shards, *grid, train=("--loader", "dali"))) == 1
    assert "| memory-bank | 36 (bank size; 64 asked) | on | 1 | diverged |" in (out / "sweep.md").read_text()


def test_a_sweep_on_data_without_eval_images_says_its_table_has_no_knn(
    six_root, tmp_path, caplog, monkeypatch, request
):
    # a sweep on a .beton (or a folder without val/ or test/) wrote a table of losses alone, its
    # kNN columns left out without a word: it names why and the knn that measures a setting
    stub_sweep_runs(monkeypatch)
    caplog.set_level(logging.WARNING, logger="moco_fast")
    assert main(sweep_args(tmp_path / "flat", six_root / "train", "--moco-m", "0.9")) == 0
    out = tmp_path / "flat"
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("no kNN in the table")]
    assert said == [
        "no kNN in the table: --data gives no eval images (a .beton, shards, synthetic data, no val/ or test/); "
        "it shows each setting's loss and pretext accuracy. For a setting's figure run `moco-fast knn "
        f"--checkpoint {out}/SETTING/checkpoint.pt --data ROOT`, ROOT with train/ and val/ or test/"
    ], said
    # a .beton: the root its source split is in (recorded by convert), which has an eval split
    pytest.importorskip("ffcv")
    beton = request.getfixturevalue("tiny_beton")
    caplog.clear()
    assert main(sweep_args(tmp_path / "b", beton, "--moco-m", "0.9", train=("--loader", "ffcv"))) == 0
    root = json.loads(Path(f"{beton}.json").read_text())["source"].rsplit("/", 1)[0]
    assert any(f"--data {root}`, the image folder --data was converted from" in r.getMessage() for r in caplog.records)
    # with an eval split, the table has its kNN: no such line
    caplog.clear()
    assert main(sweep_args(tmp_path / "both", six_root, "--moco-m", "0.9")) == 0
    assert not [r for r in caplog.records if "no kNN" in r.getMessage()]


def test_a_linear_classifier_that_diverges_still_stops_the_sweep(six_root, tmp_path, capsys, monkeypatch):
    # a diverged training is a row and the grid goes on; a diverged classifier (--lincls-lr, the same
    # for every setting) is no failure of the setting's training and must not be shown as one
    from moco_fast import sweep
    from moco_fast.divergence import Diverged

    trained = stub_sweep_runs(monkeypatch)

    def evaluate(cfg, s, *a):
        raise Diverged("the classifier's weights became NaN or inf in epoch 1: lower --lr")

    monkeypatch.setattr(sweep, "evaluate_setting", evaluate)
    out = tmp_path / "sweep"
    assert main(sweep_args(out, six_root, "--moco-m", "0,0.99")) == 2 and len(trained) == 1
    assert "classifier's weights became NaN" in last_error(capsys)
    rows = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").exists() else []
    assert not [r for r in rows if "error" in r]


def test_another_grids_diverged_setting_keeps_its_row(six_root, tmp_path, capsys, monkeypatch):
    # a diverged setting has no result.json, and the table was rebuilt from the results alone: a second
    # grid in the same folder dropped the first one's 'diverged' row (the paper's "fail" cell)
    from moco_fast import sweep
    from moco_fast.divergence import Diverged

    stub_sweep_runs(monkeypatch)

    def train(cfg, listed):
        if cfg.moco.m == 0:
            raise Diverged("the run diverged in epoch 1: 3 tensors of the model hold NaN or inf; lower --lr")

    monkeypatch.setattr(sweep, "_train", train)
    out = tmp_path / "sweep"
    assert main(sweep_args(out, six_root, "--moco-m", "0,0.99")) == 1
    capsys.readouterr()
    assert main(sweep_args(out, six_root, "--moco-m", "0.9")) == 0  # its own grid ran whole
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in rows] == ["moco_K16_m0_sbn-on", SWEEP_RUN, "moco_K16_m0.9_sbn-on"]
    assert "diverged in epoch 1" in rows[0]["error"]
    assert "| moco | 16 | 0 | on | 1 | diverged |" in (out / "sweep.md").read_text()
    assert "diverged:" not in capsys.readouterr().err
    assert main(sweep_args(out, six_root, "--moco-m", "0")) == 1  # its own grid tries it again
    assert last_error(capsys) == "moco-fast sweep: error: diverged: moco_K16_m0_sbn-on (sweep.json has each error)"


def stub_diverging_runs(monkeypatch, stop: dict) -> None:
    """Stubbed sweep runs where the setting of m `stop["m"]` diverges and that of `stop["interrupt"]` is
    stopped by Ctrl-C (each read when it trains: a test changes them between sweeps)."""
    from moco_fast import sweep
    from moco_fast.divergence import Diverged

    stub_sweep_runs(monkeypatch)

    def train(cfg, listed):
        if cfg.moco.m == stop.get("m"):
            raise Diverged("the run diverged in epoch 1: 3 tensors of the model hold NaN or inf; lower --lr")
        if cfg.moco.m == stop.get("interrupt"):
            raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "_train", train)


def test_a_diverged_row_not_yet_tried_again_survives_an_interrupted_sweep(six_root, tmp_path, capsys, monkeypatch):
    # this grid's diverged rows were left out of the table until the sweep tried them again: a sweep
    # stopped before that wrote its partial table without the row, and no later sweep found it again
    stop = {"m": 0.0}
    stub_diverging_runs(monkeypatch, stop)
    from moco_fast import sweep

    out = tmp_path / "sweep"
    assert main(sweep_args(out, six_root, "--moco-m", "0.9,0.5,0")) == 1
    stop.update(m=-1.0, interrupt=0.5)  # the next sweep of the grid stops before it tries m=0 again
    monkeypatch.setattr(sweep, "plan_setting", lambda cfg, s, found, evaluation: "train")
    assert main(sweep_args(out, six_root, "--moco-m", "0.9,0.5,0")) == 130
    rows = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())}
    assert "diverged in epoch 1" in rows["moco_K16_m0_sbn-on"]["error"]
    assert (
        (out / "sweep.md")
        .read_text()
        .endswith("stopped; the same sweep command runs them): moco_K16_m0.5_sbn-on, moco_K16_m0_sbn-on\n")
    )
    capsys.readouterr()
    stop.pop("interrupt")  # tried again, it finishes: its result replaces the row
    assert main(sweep_args(out, six_root, "--moco-m", "0.9,0.5,0")) == 0
    rows = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())}
    assert "error" not in rows["moco_K16_m0_sbn-on"] and len(rows) == 3


def test_redo_drops_its_grids_diverged_rows_with_their_results(six_root, tmp_path, monkeypatch):
    # --redo deleted the grid's folders and a partial table lost their results' rows, but kept the
    # diverged one of the run it deleted: 'diverged' beside settings the table no longer had
    stop = {"m": 0.0}
    stub_diverging_runs(monkeypatch, stop)
    out = tmp_path / "sweep"
    assert main(sweep_args(out, six_root, "--moco-m", "0.9,0.5,0")) == 1
    stop.update(m=None, interrupt=0.5)  # --redo stops in its second setting, before the diverged one
    assert main(sweep_args(out, six_root, "--moco-m", "0.9,0.5,0", "--redo")) == 130
    rows = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())}
    assert set(rows) == {"moco_K16_m0.9_sbn-on"}, rows
    assert "diverged" not in (out / "sweep.md").read_text()


def test_a_diverged_setting_is_named_where_stdout_s_reader_went_away(six_root, tmp_path, capsys, monkeypatch):
    # `moco-fast sweep ... | head`: the table's print failed at the closed pipe (a table longer than the
    # pipe's buffer), the command ended there quietly (closed_stdout) and the diverged line, said after
    # the table, was lost: exit status 1 without a word. A line-buffered stream fails at the first line.
    import os
    import sys

    stub_diverging_runs(monkeypatch, {"m": 0.0})
    read, write = os.pipe()
    os.close(read)
    with open(write, "w", buffering=1) as stream:
        monkeypatch.setattr(sys, "stdout", stream)
        status = main(sweep_args(tmp_path / "sweep", six_root, "--moco-m", "0,0.99"))
        monkeypatch.undo()
        with contextlib.suppress(OSError):  # its buffer is /dev/null's by now (closed_stdout._discard)
            stream.close()
    assert last_error(capsys) == "moco-fast sweep: error: diverged: moco_K16_m0_sbn-on (sweep.json has each error)"
    assert status == 1  # its own, as where the lines were lost at the last flush (closed_stdout.failed_with)


@pytest.mark.parametrize("where", ["training", "evaluation"])
def test_a_sweep_whose_stderr_went_away_starts_no_next_setting(where, six_root, tmp_path, caplog, monkeypatch):
    # stderr's reader gone after a setting's last sync (marked by its training) or in its evaluation
    # (no training to mark it): the sweep started the next setting, its folder and its steps up to its
    # first sync, only to stop there; it stops before it now, saying which settings it did not run
    import os
    import sys

    from moco_fast import closed_stdout, sweep

    monkeypatch.setattr(closed_stdout, "_stderr_gone", False)  # put back after the test, for the others
    trained = stub_sweep_runs(monkeypatch)
    evaluate = sweep.evaluate_setting
    read, write = os.pipe()
    os.close(read)
    gone = open(write, "w")

    def evaluate_and_lose_stderr(cfg, s, *a):
        if cfg.moco.m != 0.9:  # the first setting's
            pass
        elif where == "training":
            with closed_stdout.closed_stderr_stops():
                assert closed_stdout.stderr_went_away(gone)
        else:
            monkeypatch.setattr(sys, "stderr", gone)
        return evaluate(cfg, s, *a)

    monkeypatch.setattr(sweep, "evaluate_setting", evaluate_and_lose_stderr)
    out = tmp_path / "sweep"
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        status = main(sweep_args(out, six_root, "--moco-m", "0.9,0.5,0"))
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    with contextlib.suppress(OSError):
        gone.close()
    assert status == 141
    assert [cfg.moco.m for cfg in trained] == [0.9]
    assert [r["name"] for r in json.loads((out / "sweep.json").read_text())] == ["moco_K16_m0.9_sbn-on"]
    line = "stopped before moco_K16_m0.5_sbn-on (not run: moco_K16_m0.5_sbn-on, moco_K16_m0_sbn-on)"
    assert line in caplog.text
    # the line went where stderr went: the table says it too
    note = (
        "Not finished (the sweep stopped; the same sweep command runs them): moco_K16_m0.5_sbn-on, moco_K16_m0_sbn-on"
    )
    assert (out / "sweep.md").read_text().splitlines()[-1] == note
    if where == "evaluation":
        assert closed_stdout.stderr_gone()


def test_a_sweep_stopped_in_its_first_setting_names_the_settings_it_left(six_root, tmp_path, monkeypatch):
    # no row yet: sweep.md is the line alone (an empty table was a header without columns, "|  |")
    stub_diverging_runs(monkeypatch, {"interrupt": 0.9})
    out = tmp_path / "sweep"
    assert main(sweep_args(out, six_root, "--moco-m", "0.9,0.5")) == 130
    note = (
        "Not finished (the sweep stopped; the same sweep command runs them): moco_K16_m0.9_sbn-on, moco_K16_m0.5_sbn-on"
    )
    assert (out / "sweep.md").read_text() == note + "\n"
    assert json.loads((out / "sweep.json").read_text()) == [] and not (out / "sweep.png").exists()


@pytest.mark.parametrize("grid", ["0.99,0.9,0", "0.9,0.99,0"])  # the reused setting before the stop, after it
def test_a_sweep_whose_stderr_is_gone_reuses_finished_settings_and_names_only_those_left(
    grid, finished_sweep, six_root, tmp_path, caplog, monkeypatch
):
    # a reused setting runs nothing that stderr's loss would stop: the sweep stops before the first one
    # it would run, and neither its line nor sweep.md names a reused setting as not finished
    from moco_fast import closed_stdout

    out = shutil.copytree(finished_sweep, tmp_path / "sweep")  # m 0.99 finished
    monkeypatch.setattr(closed_stdout, "_stderr_gone", True)  # as a training marks it; put back after
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        status = main(sweep_args(out, six_root, "--moco-m", grid))
    assert status == 141
    left = "moco_K16_m0.9_sbn-on, moco_K16_m0_sbn-on"
    assert f"stopped before moco_K16_m0.9_sbn-on (not run: {left})" in caplog.text
    note = f"Not finished (the sweep stopped; the same sweep command runs them): {left}"
    assert (out / "sweep.md").read_text().splitlines()[-1] == note
    assert [r["name"] for r in json.loads((out / "sweep.json").read_text())] == ["moco_K16_m0.99_sbn-on"]


def test_a_sweep_stopped_in_a_reused_setting_does_not_name_it_unfinished(
    finished_sweep, six_root, tmp_path, monkeypatch
):
    # a reused setting is finished: a stop while the sweep passes over it leaves only those after it
    from moco_fast import sweep

    out = shutil.copytree(finished_sweep, tmp_path / "sweep")  # m 0.99 finished
    run_setting = sweep._run_setting

    def stopped_in_reuse(cfg, s, plan, *a):
        if plan == "reuse":
            raise KeyboardInterrupt
        return run_setting(cfg, s, plan, *a)

    monkeypatch.setattr(sweep, "_run_setting", stopped_in_reuse)
    assert main(sweep_args(out, six_root, "--moco-m", "0.99,0.9")) == 130
    note = "Not finished (the sweep stopped; the same sweep command runs them): moco_K16_m0.9_sbn-on"
    assert (out / "sweep.md").read_text().splitlines()[-1] == note


def test_a_sweep_stopped_in_the_table_write_after_a_setting_names_the_settings_left(six_root, tmp_path, monkeypatch):
    # Ctrl-C while the table was written after a setting: no stop line, and sweep.md without the note
    # (or the table before that setting, where it came between sweep.json and sweep.md)
    from moco_fast import sweep

    stub_sweep_runs(monkeypatch)
    write_table = sweep.write_table
    calls = []

    def interrupted_once(rows, out, not_run=()):
        calls.append(list(not_run))
        if len(calls) == 1:
            raise KeyboardInterrupt
        write_table(rows, out, not_run)

    monkeypatch.setattr(sweep, "write_table", interrupted_once)
    out = tmp_path / "sweep"
    assert main(sweep_args(out, six_root, "--moco-m", "0.9,0.5")) == 130
    assert calls == [[], ["moco_K16_m0.5_sbn-on"]]
    note = "Not finished (the sweep stopped; the same sweep command runs them): moco_K16_m0.5_sbn-on"
    assert (out / "sweep.md").read_text().splitlines()[-1] == note
    assert [r["name"] for r in json.loads((out / "sweep.json").read_text())] == ["moco_K16_m0.9_sbn-on"]
