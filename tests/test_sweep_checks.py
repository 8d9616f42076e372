"""`moco-fast sweep`'s checks before anything trains: its help, grid lists and settings' folder names,
flags and settings that would fail later, and an --out that is not a sweep's to use (a run's, another
sweep's now, within the images it reads, holding someone's table files)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import make_image_root
from run_helpers import (
    SWEEP_RUN,
    SWEEP_TRAIN,
    last_error,
    read_only_prefix,
    stub_sweep_runs,
    sweep_args,
    tiny_args,
)

from moco_fast.cli import build_parser, main
from moco_fast.config import MAX_SEED
from moco_fast.folder_locks import HOLDER_NAME


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


def test_a_sweep_out_that_may_not_be_written_is_one_line_naming_it(six_root, tmp_path):
    """An --out in a folder that may not be written (a read-only mount; mode 555 where that binds), or
    one that may not be written itself: one line naming --out and the folder, before anything trains.
    It was mkdir's bare "Permission denied: PATH", and for an existing folder, that of the first
    setting's folder."""
    import subprocess
    import sys

    ro = tmp_path / "ro"
    ro.mkdir()
    prefix = read_only_prefix([ro])
    command = [*prefix, sys.executable, "-m", "moco_fast"]
    try:
        done = [
            subprocess.run(
                [*command, *sweep_args(out, six_root, "--moco-m", "0.99")], capture_output=True, text=True, timeout=300
            )
            for out in (ro / "new", ro)
        ]
    finally:
        ro.chmod(0o755)
    for run, out in zip(done, (ro / "new", ro)):
        err = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(err) == 1, run.stderr[-2000:]
        assert err[0] in (
            f"moco-fast sweep: error: --out {out}: cannot write in {ro} ({why})"
            for why in ("Permission denied", "Read-only file system")
        ), err
    assert list(ro.iterdir()) == []


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
        assert not trained and [p.name for p in out.iterdir()] == [HOLDER_NAME]  # the first's, naming it
    assert not out.exists()  # the folder the first one made, left empty, goes with it
    assert main(sweep_args(out, six_root, "--moco-m", "0.99")) == 0 and len(trained) == 1


# A train refused by a sweep's folder (before its table is written) said "another moco-fast train is
# writing there", a sweep refused by a train's folder "another moco-fast sweep is running there": a
# folder's flock names no holder, and each line named the refused command. The holder names itself
@pytest.mark.parametrize("holder, command", [("sweep", "train"), ("train", "sweep")])
def test_a_folder_held_by_the_other_command_names_it(holder, command, six_root, tmp_path, capsys, monkeypatch):
    from moco_fast.run_folder import hold_run_folder, hold_sweep_folder

    trained = stub_sweep_runs(monkeypatch)
    out = tmp_path / "new"
    hold = hold_sweep_folder if holder == "sweep" else hold_run_folder
    argv = tiny_args(six_root, out) if command == "train" else sweep_args(out, six_root, "--moco-m", "0.99")
    doing = "writing" if command == "train" else "running"
    with hold(out):  # the other command, running there
        assert main(argv) == 2
        assert last_error(capsys).endswith(
            f"{out}: another moco-fast {holder} is {doing} there now; wait for it to end or choose another --out"
        )
        assert [p.name for p in out.iterdir()] == [HOLDER_NAME]
    assert not out.exists() and not trained  # the holder's file goes with it, and the folder it made


def test_a_settings_folder_that_the_sweep_trains_in_names_the_sweep(six_root, tmp_path, monkeypatch):
    # the sweep trains each setting through trainer.train, whose lock on the setting's folder named
    # "train": a user's `moco-fast train --out` into it was told another train was writing there
    from moco_fast import sweep, trainer
    from moco_fast.run_folder import RunFolderBusy, ensure_not_busy, hold_run_folder

    said = []

    def a_users_train_meanwhile(cfg, out, *args):
        with pytest.raises(RunFolderBusy) as e, hold_run_folder(out) as held:  # as train() does
            ensure_not_busy([held], out)
        said.append(str(e.value))
        return {"loss": 1.0}

    monkeypatch.setattr(trainer, "_train_held", a_users_train_meanwhile)
    monkeypatch.setattr(sweep, "evaluate_setting", lambda cfg, s, *a: {"name": s.name, "mechanism": s.mechanism})
    out = tmp_path / "sweep"
    assert main(sweep_args(out, six_root, "--moco-m", "0.99")) == 0
    assert said == [
        f"{out / SWEEP_RUN}: another moco-fast sweep is writing there now; wait for it to end or choose another --out"
    ]


def test_a_sweep_without_a_gpu_says_once_that_it_trains_on_the_cpu(six_root, tmp_path, caplog, monkeypatch):
    # --device auto without a CUDA GPU: each setting's train() said "no CUDA GPU here", once a setting
    from moco_fast import sweep, trainer

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(trainer, "_train_held", lambda *args: {"loss": 1.0})
    monkeypatch.setattr(sweep, "evaluate_setting", lambda cfg, s, *a: {"name": s.name, "mechanism": s.mechanism})
    argv = ["sweep", "--out", str(tmp_path / "sweep"), "--moco-m", "0.99,0.9", "--", "--data", str(six_root)]
    with caplog.at_level(logging.INFO, logger="moco_fast"):
        assert main([*argv, *SWEEP_TRAIN]) == 0
    assert caplog.messages.count("no CUDA GPU here: training on the CPU (--device auto)") == 1, caplog.messages


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
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--out", str(tmp_path / "s"), str(six_root)])
    assert e.value.code == 2 and "flags go after `--`" in last_error(capsys)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        # a train flag before --out: every word from it on was read as train flags, --out with them
        (["--gpus", "2", "--out", "S"], "unrecognized arguments: --gpus 2 (`moco-fast train` flags go after `--`"),
        (["--moco-k", "16", "--gpus", "2", "--out", "S", "--", "--data", "D"], "unrecognized arguments: --gpus 2 ("),
        (
            ["--out", "S", "--moco-m", "0.9", "--epochs", "1", "--", "--data", "D"],
            "unrecognized arguments: --epochs 1 (",
        ),
        (["D", "--out", "S"], "unrecognized arguments: D (`moco-fast train` flags go after `--`"),
        # a sweep flag after `--`: --out was said to be missing, the others were unknown train flags
        (["--", "--data", "D", "--out", "S"], "give the sweep folder as `moco-fast sweep --out DIR`, not after `--`"),
        # abbreviated, as train's parser takes it: it said '--out is required'
        (["--", "--data", "D", "--ou", "S"], "give the sweep folder as `moco-fast sweep --out DIR`, not after `--`"),
        (["--", "--o=S", "--data", "D"], "give the sweep folder as `moco-fast sweep --out DIR`, not after `--`"),
        (["--out", "S", "--", "--data", "D", "--redo"], "--redo is a flag of the sweep, not of its training runs"),
        (["--out", "S", "--", "--lincls-epochs=2", "--data", "D"], "--lincls-epochs is a flag of the sweep, not of"),
    ],
)
def test_sweep_flags_in_the_wrong_place_are_errors_that_say_where_they_go(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", *argv])
    err = last_error(capsys)
    assert e.value.code == 2 and err.startswith("moco-fast sweep: error: ") and message in err, err


@pytest.mark.parametrize(
    "argv", [["--help", "--", "--out", "S"], ["--out", "S", "--he", "--", "--redo"], ["-h", "--", "--ou", "S"]]
)
def test_help_before_the_separator_is_shown_whatever_follows_it(argv, capsys):
    # a sweep flag after `--` was an error before argparse read the --help
    with pytest.raises(SystemExit) as e:
        main(["sweep", *argv])
    out, err = capsys.readouterr()
    assert e.value.code == 0 and out.startswith("usage: moco-fast sweep") and not err, err


def test_the_sweeps_own_flags_go_before_the_separator_in_any_order():
    parse = build_parser().parse_args
    base = ["--", "--data", "D", "--epochs", "1", "--moco-k", "64"]
    for own in (
        ["--out", "S", "--redo", "--moco-k", "16,32"],
        ["--moco-k", "16,32", "--redo", "--out", "S"],
        ["--redo", "--out=S", "--moco-k=16,32"],
    ):
        args = parse(["sweep", *own, *base])
        assert (args.out, args.moco_k, args.redo) == ("S", "16,32", True), own
        assert args.train_args == ["--data", "D", "--epochs", "1", "--moco-k", "64"], own
    assert parse(["sweep", "--out", "S"]).train_args == []


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


def test_more_workers_than_the_cores_take_are_refused_before_the_data_is_listed(tmp_path, capsys, monkeypatch):
    # train's check (bd7a260) came in the first setting's training, after the sweep had listed the data
    # (minutes on ImageNet): here a --data that is not there was named first
    monkeypatch.setattr("moco_fast.trainer.available_cores", lambda: 2)
    monkeypatch.setattr("moco_fast.cores.available_cores", lambda: 2)  # the --workers cap's count
    args = ["sweep", "--out", str(tmp_path / "sweep"), "--moco-m", "0.9,0.99", "--device", "cpu", "--"]
    assert (
        main([*args, "--data", str(tmp_path / "nowhere"), "--batch-size", "8", "--bn-splits", "2", "--workers", "17"])
        == 2
    )
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith("moco-fast sweep: error: --workers 17: this machine has 2 CPU cores")
    )
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    "option, said",
    [("threads=17", "--loader-option threads 17"), ("prefetch=0", "DALI loader option prefetch must be")],
)
def test_dali_options_are_refused_before_the_data_is_listed(option, said, tmp_path, capsys, monkeypatch):
    # the early check of --workers did not read DALI's options: threads past the cores (each setting's
    # train() checks them) were named after the sweep had listed the data, here a --data that is not there
    monkeypatch.setattr("moco_fast.cores.available_cores", lambda: 2)
    args = ["sweep", "--out", str(tmp_path / "sweep"), "--moco-m", "0.9,0.99", "--device", "cpu", "--"]
    flags = ["--loader", "dali", "--loader-option", option, "--batch-size", "8", "--bn-splits", "2"]
    assert main([*args, "--data", str(tmp_path / "nowhere"), *flags, "--workers", "1"]) == 2
    assert said in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "sweep").exists()
