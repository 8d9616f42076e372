"""`train --resume`: a run continues as it was configured (only --out needed), a finished run is not
redone, rows logged after the checkpoint are dropped, a run that checkpointed never starts over, a
run without a checkpoint starts over with its own settings, and a kill while a restart clears the
old run leaves a folder that resumes."""

import json
import logging
import shlex
import shutil

import pytest
import torch
from distributed_helpers import torchrun_env
from run_helpers import ForkedCommands, rows, tiny_args

from moco_fast.cli import main
from moco_fast.config import ConfigError


def test_resume_with_only_out_continues_the_run_as_configured(tiny_root, run, capsys, caplog):
    out = run
    # No preset, data or model flags: they come from the checkpoint (the defaults would differ:
    # demo preset, K 1024, 8 BN splits, the demo set).
    argv = ["train", "--resume", "--out", str(out), "--epochs", "2", "--device", "cpu", "--workers", "0"]
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main([*argv, "--image-size", "24"]) == 0
    # what changed is named field by field, and the lr schedule stretched to the new length with its figures
    assert "--resume with changed settings: data.aug.image_size 32 -> 24" in caplog.text
    assert "--resume: --epochs 2 (the run was scheduled for 1): the cosine schedule now spans 2 epochs" in caplog.text
    assert "epoch 2 trains at lr 0.0004687 where epoch 1 had 0.0009375" in caplog.text, caplog.text
    # a field that only one side has (a --loader-option added on resume) is named too
    from moco_fast.config import from_dict, to_dict
    from moco_fast.resume import warn_changed

    saved = to_dict(from_dict(json.loads((out / "config.json").read_text())))
    now = from_dict(json.loads((out / "config.json").read_text()))
    now.data.loader_options["hw_decoder_load"] = "0.9"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        warn_changed(saved, now)
    assert "data.loader_options.hw_decoder_load None -> '0.9'" in caplog.text
    # a run trained by 2 processes and extended in 1: its last epoch's lr was that of the 2-process batch
    from moco_fast.resume import warn_rescheduled

    caplog.clear()
    now.optim.epochs = 3
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        warn_rescheduled(from_dict(saved), now, 2, 1, 2)
    assert "epoch 3 trains at lr 0.0002344 where epoch 2 had 0.0009375" in caplog.text, caplog.text
    assert [r["epoch"] for r in rows(out)] == [1, 2]
    saved = json.loads((out / "config.json").read_text())
    assert saved["moco"]["k"] == 16 and saved["data"]["data"] == str(tiny_root) and saved["optim"]["epochs"] == 2
    assert "finished epoch 2" in capsys.readouterr().out


def test_a_run_saved_before_data_loader_module_resumes(run, capsys, caplog):
    # data.loader_module came after runs that were saved without it: their checkpoint and config.json
    # lack it, and they resume as they were (a built-in loader's module is none: None, as saved now)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    del state["config"]["data"]["loader_module"]
    torch.save(state, run / "checkpoint.pt")
    config = json.loads((run / "config.json").read_text())
    del config["data"]["loader_module"]
    (run / "config.json").write_text(json.dumps(config))
    argv = ["train", "--resume", "--out", str(run), "--epochs", "2", "--device", "cpu", "--workers", "0"]
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main(argv) == 0
    assert "changed settings" not in caplog.text, caplog.text
    assert [r["epoch"] for r in rows(run)] == [1, 2]
    assert json.loads((run / "config.json").read_text())["data"]["loader_module"] is None


def test_resuming_a_finished_run_changes_nothing(tiny_root, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    args = [*tiny_args(tiny_root, out), "--final-knn"]
    assert main(args) == 0
    summary, config = (out / "summary.json").read_text(), (out / "config.json").read_text()
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="moco_fast"):
        assert main([*args, "--resume", "--lr", "0.5"]) == 0
    # once, as the command's last line: an INFO line said it before in other words
    out_said = capsys.readouterr().out
    assert out_said.endswith(f"nothing to do: {out} trained for its 1 epoch already\n")
    assert caplog.messages and not [m for m in caplog.messages if "already" in m], caplog.messages
    assert (out / "summary.json").read_text() == summary and len(rows(out)) == 1
    assert (out / "config.json").read_text() == config  # flags that trained nothing are not recorded
    after = torch.load(out / "checkpoint.pt", weights_only=False)
    assert torch.equal(after["model"]["encoder_q.head.weight"], state["model"]["encoder_q.head.weight"])


def test_resume_drops_rows_logged_after_the_checkpoint(tiny_root, run):
    out = run
    with open(out / "metrics.jsonl", "a") as fh:  # as if a run died between its row and its checkpoint
        fh.write(json.dumps({"epoch": 2, "loss": 9.9}) + "\n" + '{"epoch": 3, "lo')
    # --bn-splits may change on resume (a run from N processes, plain BN, resumes in one with split BN)
    assert main([*tiny_args(tiny_root, out, epochs=2), "--resume", "--bn-splits", "4"]) == 0
    got = rows(out)
    assert [r["epoch"] for r in got] == [1, 2] and got[1]["loss"] != 9.9


def test_a_resume_at_another_image_size_keeps_the_stem_of_the_weights(tmp_path, capsys):
    # trained at 16 px, where --stem auto makes the CIFAR stem; resumed at 96 px, where auto would make
    # the ImageNet one (the weights then did not fit: "the saved weights do not fit the model")
    from moco_fast.cli import build_parser
    from moco_fast.commands.train import config_from_args
    from moco_fast.config import from_dict, to_dict
    from moco_fast.resume import check_same_model

    out = tmp_path / "run"
    out.mkdir()
    args = build_parser().parse_args(["train", "--loader", "synthetic", "--image-size", "16", "--out", str(out)])
    trained = to_dict(config_from_args(args))
    assert trained["model"]["stem"] == "auto"
    torch.save({"config": trained, "model": {}, "optimizer": {}, "epoch": 1}, out / "checkpoint.pt")
    capsys.readouterr()
    # at the same size, or a size on the same side of 64 px, "auto" stays as saved (the sweep compares it)
    for same in ([], ["--image-size", "24"]):
        assert main(["train", "--resume", "--out", str(out), *same, "--print-config"]) == 0
        assert from_dict(json.loads(capsys.readouterr().out)).model.stem == "auto"
    assert main(["train", "--resume", "--out", str(out), "--image-size", "96", "--print-config"]) == 0
    resumed = from_dict(json.loads(capsys.readouterr().out))
    assert resumed.model.stem == "cifar" and resumed.data.aug.image_size == 96
    check_same_model(trained, resumed)  # the same network
    resumed.model.stem = "auto"  # `--stem auto` typed: the ImageNet stem at 96 px, another network
    with pytest.raises(ConfigError, match="stem='cifar' \\(now 'imagenet'\\)"):
        check_same_model(trained, resumed)


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


def test_resume_on_data_whose_images_changed_in_place_says_so(tiny_root, run, caplog):
    # the same --data, a class folder added since (here: the checkpoint's count made one less)
    from moco_fast import checkpoint as ckpt

    state = ckpt.load(run / "checkpoint.pt")
    ckpt.save_atomic({**state, "num_images": state["num_images"] - 1}, run / "checkpoint.pt")
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main([*tiny_args(tiny_root, run, epochs=2), "--resume"]) == 0
    now = state["num_images"]
    assert f"the data has {now} images now, the run trained on {now - 1}" in caplog.text, caplog.text


def test_leftover_rows_without_a_checkpoint_count_as_a_run(tiny_root, run, capsys):
    out = run
    (out / "checkpoint.pt").unlink()  # as if a run died before its first checkpoint
    capsys.readouterr()
    assert main(tiny_args(tiny_root, out)) == 2
    assert "holds a run already" in capsys.readouterr().err
    # --resume asks to go on with that run: with no checkpoint to go on from, it starts over there
    assert main([*tiny_args(tiny_root, out, epochs=2), "--resume"]) == 0
    assert [r["epoch"] for r in rows(out)] == [1, 2]


def test_resume_before_a_checkpoint_starts_over_with_the_runs_own_settings(tiny_root, run, tmp_path, capsys):
    # `train --resume --out RUN` alone, where the run stopped before its first checkpoint: its
    # config.json decides, as a checkpoint's config would (it trained the default demo recipe)
    from moco_fast.config import from_dict

    (run / "checkpoint.pt").unlink()
    saved = from_dict(json.loads((run / "config.json").read_text()))
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--moco-m", "0.9", "--print-config"]) == 0
    printed = from_dict(json.loads(capsys.readouterr().out))
    assert (printed.moco.k, printed.optim.batch_size, printed.data.data) == (saved.moco.k, 8, str(tiny_root))
    assert printed.moco.m == 0.9  # a flag given changes it
    # a folder with no run and a command line with nothing to train: a mistyped --out
    assert main(["train", "--resume", "--out", str(tmp_path / "runn")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        f"--resume: {tmp_path / 'runn'} holds no run to resume (no checkpoint.pt, no config.json): check --out, or give the run's flags (--data, --preset, --epochs...) to start it there"
    )
    assert not (tmp_path / "runn").exists()
    # where and how to run is no run: these trained the default recipe in the mistyped folder
    for flag in (["--device", "cpu"], ["--workers", "0"], ["--gpus", "1"], ["--amp", "off"], ["--no-final-knn"]):
        assert main(["train", "--resume", "--out", str(tmp_path / "runn"), *flag, "--print-config"]) == 2, flag
        assert "holds no run to resume" in capsys.readouterr().err
    for flag in (["--image-size", "24"], ["--preset", "cifar"], ["--epochs", "2"]):  # a run described: it starts there
        assert main(["train", "--resume", "--out", str(tmp_path / "runn"), *flag, "--print-config"]) == 0, flag


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


def test_resume_computes_a_final_knn_that_was_interrupted(tiny_root, run, capsys):
    # The 1-epoch run has no summary (as if Ctrl-C struck during its final kNN): --resume computes it
    # without training, and the random-init baseline is the same network after more epochs.
    before = (run / "checkpoint.pt").read_bytes()
    assert main([*tiny_args(tiny_root, run), "--resume", "--final-knn", "--knn-baseline"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epoch"] == 1 and 0 <= summary["final_knn_top1"] <= 100
    assert (run / "checkpoint.pt").read_bytes() == before and len(rows(run)) == 1
    assert main([*tiny_args(tiny_root, run, epochs=2), "--resume", "--final-knn", "--knn-baseline"]) == 0
    later = json.loads((run / "summary.json").read_text())
    assert later["epoch"] == 2 and later["random_knn_top1"] == summary["random_knn_top1"]


def test_resume_never_starts_over_a_run_that_checkpointed(tiny_root, run, capsys):
    # Its checkpoint moved away: rows past epoch 1 or an evaluation beside it show that the run got
    # further than its first checkpoint, so --resume is refused rather than wiping the folder.
    (run / "checkpoint.pt").rename(run.parent / "elsewhere.pt")
    (run / "lincls.json").write_text("{}")
    capsys.readouterr()
    assert main([*tiny_args(tiny_root, run, epochs=2), "--resume"]) == 2
    err = capsys.readouterr().err
    assert (run / "lincls.json").is_file()
    # the error names the missing checkpoint (not "--resume continues the run there", to one who gave
    # it), and no line before it says that the run starts over
    assert "no checkpoint.pt (moved or deleted?): put it back" in err and "starts over with" not in err, err
    assert main(["train", "--resume", "--out", str(run)]) == 2  # its config.json's settings: the same
    err = capsys.readouterr().err
    assert "put it back" in err and "starts over with" not in err, err
    (run / "lincls.json").unlink()
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 2, "loss": 1.0}) + "\n")
    assert main([*tiny_args(tiny_root, run, epochs=3), "--resume"]) == 2
    assert [r["epoch"] for r in rows(run)] == [1, 2]


def test_a_run_trained_with_gpus_resumes_where_those_workers_cannot_start(tiny_root, run, monkeypatch, caplog):
    # --gpus is how a launch runs, not what the run is: a checkpoint of `--gpus 2` continues in one
    # process on a machine without those GPUs, and under torchrun, whose --nproc_per_node decides.
    import logging

    from moco_fast.cli import build_parser
    from moco_fast.commands.train import config_from_args

    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["config"]["runtime"]["gpus"] = 2
    torch.save(state, run / "checkpoint.pt")
    with monkeypatch.context() as m:
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
            m.setenv(name, value)
        cfg = config_from_args(build_parser().parse_args(["train", "--resume", "--out", str(run)]))
    assert cfg.runtime.gpus == 1
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--device", "cpu", "--workers", "0"]) == 0
    assert "--resume: the run was trained with --gpus 2, which this launch cannot start" in caplog.text
    assert [r["epoch"] for r in rows(run)] == [1, 2]


def test_a_memory_bank_run_resumed_on_other_data_says_why_it_cannot(tiny_root, fresh_root, tmp_path, capsys):
    out = tmp_path / "mb"
    assert main([*tiny_args(tiny_root, out), "--mechanism", "memory-bank"]) == 0
    capsys.readouterr()
    argv = ["train", "--resume", "--out", str(out), "--data", str(fresh_root), "--epochs", "2"]
    assert main([*argv, "--device", "cpu", "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bank holds a feature for each of its 32 training images" in err[0], err
    assert "the data now has 16" in err[0]


# Run by a `train` in a child process: SIGKILL once the old run's files are cleared (the new
# config.json not written yet), or as clear_run reaches metrics.jsonl.
KILL_AFTER_THE_CLEAR = """
import moco_fast.trainer as trainer
clear = trainer.clear_run
trainer.clear_run = lambda out: (clear(out), os.kill(os.getpid(), signal.SIGKILL))
"""
KILL_AT_THE_ROWS = """
from pathlib import Path
unlink = Path.unlink
def dying_unlink(self, missing_ok=False):
    if self.name == "metrics.jsonl":
        os.kill(os.getpid(), signal.SIGKILL)
    return unlink(self, missing_ok=missing_ok)
Path.unlink = dying_unlink
"""


def killed_train(train, argv: list[str], kill: str) -> None:
    rc, err = train(argv, kill)
    assert rc == -9, err


@pytest.mark.slow
def test_a_kill_while_a_restart_clears_the_old_run_leaves_a_folder_that_resumes(tiny_root, run, tmp_path, capsys):
    # clear_run took config.json with the rest, and the new one came later: a kill in between (seen
    # once in 8 SIGKILLs of a --resume restart) left an empty folder, and --resume needed the flags
    resume = ["train", "--resume", "--out", str(run)]  # device and workers too come from the run's config
    (run / "checkpoint.pt").unlink()  # stopped in its first epoch: --resume starts it over
    with ForkedCommands(tmp_path) as train:  # each killed command in a process of its own
        killed_train(train, resume, KILL_AFTER_THE_CLEAR)
        assert main(resume) == 0
        assert [r["epoch"] for r in rows(run)] == [1] and json.loads((run / "config.json").read_text())["moco"][
            "k"
        ] == 16
        # --force with other settings: the old run's config.json stays until the new one replaces it
        killed_train(train, [*tiny_args(tiny_root, run), "--force", "--moco-k", "32"], KILL_AFTER_THE_CLEAR)
        assert main(resume) == 0 and json.loads((run / "config.json").read_text())["moco"]["k"] == 16
        # a kill in the clear itself: the checkpoint goes last, so no rows past epoch 1 outlive it (a
        # folder that --resume refuses to start over)
        with open(run / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"epoch": 2, "loss": 1.0}) + "\n")
        killed_train(train, [*tiny_args(tiny_root, run), "--force"], KILL_AT_THE_ROWS)
    capsys.readouterr()
    assert main([*resume, "--epochs", "2"]) == 0, capsys.readouterr().err
    assert [r["epoch"] for r in rows(run)] == [1, 2]


def test_resume_of_the_run_in_out_with_force_is_refused(run, capsys):
    # --force was dropped without a word: the run went on (finished: "nothing to do") where a fresh one was asked for
    before = (run / "checkpoint.pt").read_bytes()
    for given in ([], [str(run)], [str(run / "checkpoint.pt")]):
        assert main(["train", "--out", str(run), "--resume", *given, "--force", "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--resume continues the run in" in err[0] and "--force" in err[0], err
    assert (run / "checkpoint.pt").read_bytes() == before


def test_a_finished_run_resumed_on_other_data_says_which_its_final_knn_reads(tiny_root, run, tmp_path, caplog):
    # its owed final kNN read the new --data, and summary.json (which names no data) took its figures without a word
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(tiny_root, moved)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main([*tiny_args(moved, run), "--resume", "--final-knn"]) == 0
    assert (
        f"the run trained on --data {tiny_root}; its final kNN, where still owed, reads --data {moved}" in caplog.text
    )
    assert (run / "summary.json").is_file()


@pytest.mark.parametrize(("rank", "epoch"), [(1, 0), (0, 3)])
def test_new_random_streams_from_the_largest_seed(rank, epoch, caplog):
    # seed + rank (+ 1_000_003 x epoch) passed numpy's 2**32 - 1: rank 1 of `--seed MAX_SEED` (train's
    # start), a resumed run on another number of processes, raised numpy's ValueError. The line of
    # a checkpoint of one process said "written by 1 processes".
    import numpy as np

    from moco_fast.config import MAX_SEED, TrainConfig
    from moco_fast.resume import restore_rng

    cfg = TrainConfig()
    cfg.runtime.seed = MAX_SEED
    with caplog.at_level(logging.INFO, logger="moco_fast"):
        restore_rng({"rng": None}, cfg, world=2, rank=rank, epoch=epoch)  # saved by 1 process, resumed by 2
    assert caplog.messages == ["--resume: the checkpoint was written by 1 process, now 2: new random streams"]
    drawn = np.random.randint(2**31), torch.randint(2**31, ()).item()
    restore_rng({"rng": None}, cfg, world=2, rank=rank, epoch=epoch)
    assert (np.random.randint(2**31), torch.randint(2**31, ()).item()) == drawn


def test_a_resume_names_the_moco_settings_it_changes(caplog):
    # --moco-m, --moco-t, --symmetric, --shuffle-bn and --bn-splits may change on --resume; config.json
    # then records the new values for the whole run, and the change went without a word
    from moco_fast.config import build_config, to_dict
    from moco_fast.resume import warn_changed

    saved = to_dict(build_config("cifar"))
    now = build_config("cifar", {"moco.m": 0.9, "moco.t": 0.2, "moco.shuffle_bn": False})
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        warn_changed(saved, now)
        warn_changed(saved, build_config("cifar"))  # nothing changed: nothing said
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "--resume with changed settings: moco.m 0.99 -> 0.9; moco.t 0.1 -> 0.2; moco.shuffle_bn True -> False"
    ]


def test_a_resume_compares_loader_options_by_the_values_the_loader_reads(caplog):
    # options are saved as typed: threads=02 resumed with threads=2 (or prefetch=2 given, DALI's default,
    # where none was saved) is the same run, and was named as a changed setting
    from moco_fast.config import build_config, to_dict
    from moco_fast.resume import warn_changed

    saved = to_dict(build_config("cifar", {"data.loader": "dali", "data.loader_options": {"threads": "02"}}))
    same = build_config("cifar", {"data.loader": "dali", "data.loader_options": {"threads": "2", "prefetch": "2"}})
    other = build_config("cifar", {"data.loader": "dali", "data.loader_options": {"threads": "3"}})
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        warn_changed(saved, same)
        warn_changed(saved, other)
    said = [r.getMessage() for r in caplog.records]
    assert said == ["--resume with changed settings: data.loader_options.threads '02' -> '3'"]


def test_a_resume_compares_shuffle_bn_as_the_saved_run_ran_it(caplog):
    # a checkpoint from before config.json recorded it says shuffle BN on beside --sync-bn of 2
    # processes; resumed the same way (shuffle BN off, as it ran) it warned of a change
    from moco_fast.config import as_run, build_config, to_dict
    from moco_fast.resume import saved_as_run, warn_changed

    asked = build_config("cifar", {"runtime.sync_bn": True})
    saved = to_dict(asked)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        warn_changed(saved_as_run(saved, 2), as_run(asked, 2))  # the same: nothing said
        warn_changed(saved_as_run(saved, 2), as_run(asked, 1))  # one process: shuffle BN runs again
    said = [r.getMessage() for r in caplog.records]
    assert said == ["--resume with changed settings: moco.shuffle_bn False -> True"]


@pytest.mark.parametrize("world", [0, -2, "two", [2], float("inf")])
def test_a_saved_world_size_that_is_no_count_of_processes_counts_as_unknown(world):
    # a config.json or checkpoint edited by hand or damaged: a negative world_size (or --gpus) was
    # taken as the number of processes that trained the run, which the checks of a resume divide by
    # and compare with; it falls back as a missing one does (the checkpoint's random streams,
    # config.json's --gpus), as 0 did already. One that is no number ended a checkpoint's resume in a
    # ValueError's traceback (config.json's: "cannot be read"), and an infinite one (1e999 in JSON)
    # in an OverflowError's, config.json's too
    from moco_fast.resume import SavedRun

    config = {"runtime": {"gpus": 2, "sync_bn": False}}
    assert SavedRun.of_config({**config, "world_size": world}).world == SavedRun.of_config(config).world == 2
    assert SavedRun.of_config({"runtime": {"gpus": world}, "world_size": world}).world == 1
    state = {"config": config, "rng_per_rank": [None, None]}
    assert SavedRun.of({**state, "world_size": world}).world == SavedRun.of(state).world == 2
    assert SavedRun.of({"config": config, "world_size": world}).world == 1


def test_a_resume_in_another_precision_says_so(tiny_root, run, caplog):
    # --amp auto is bf16 on CUDA and fp32 on the CPU: a run moved between the two went on in the other
    # precision without a word (lincls and finetune refuse it; train names what changes and goes on)
    from moco_fast.config import build_config
    from moco_fast.resume import warn_other_amp

    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["amp_ran"] == "off"  # --device cpu, --amp auto
    to_fp32 = (
        "--resume: the run trained in bf16 autocast and goes on in fp32 (--amp auto on cpu): its numerics change "
        "(--amp bf16 keeps bf16 autocast)"
    )

    def amp_lines(saved) -> list[str]:
        torch.save(saved, run / "checkpoint.pt")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moco_fast"):
            assert main([*tiny_args(tiny_root, run, epochs=2), "--resume"]) == 0
        return [r.getMessage() for r in caplog.records if "autocast" in r.getMessage()]

    runtime = state["config"]["runtime"]
    # trained with --device auto on a GPU (bf16), resumed on the CPU
    assert amp_lines({**state, "amp_ran": "bf16"}) == [to_fp32]
    # a checkpoint from before amp_ran, of a run on --device cuda
    old = {k: v for k, v in state.items() if k != "amp_ran"}
    assert amp_lines({**old, "config": {**state["config"], "runtime": {**runtime, "device": "cuda"}}}) == [to_fp32]

    cpu, cuda, cfg = torch.device("cpu"), torch.device("cuda"), build_config("cifar")  # --amp auto
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        warn_other_amp(state, cfg, cpu)  # as it ran: nothing
        warn_other_amp({**old, "config": {**state["config"], "runtime": {**runtime, "device": "auto"}}}, cfg, cpu)
        warn_other_amp(state, cfg, cuda)  # from the CPU to a GPU (named, not used)
        warn_other_amp({**state, "amp_ran": "fp16"}, cfg, cpu)  # --amp fp16 needs a GPU: no --amp keeps it
    assert [r.getMessage() for r in caplog.records] == [
        "--resume: the run trained in fp32 and goes on in bf16 autocast (--amp auto on cuda): its numerics change "
        "(--amp off keeps fp32)",
        "--resume: the run trained in fp16 autocast and goes on in fp32 (--amp auto on cpu): its numerics change",
    ]


def test_a_resume_into_fp16_of_a_run_without_it_starts_the_loss_scale_afresh():
    # a run that trained in bf16 or fp32 saved its disabled scaler's empty state, which an --amp fp16
    # resume's scaler refused with a RuntimeError (on the CPU's GradScaler here: fp16 trains on GPUs only)
    from moco_fast.resume import load_scaler

    fp16 = torch.amp.GradScaler("cpu", enabled=True)
    load_scaler(fp16, torch.amp.GradScaler("cpu", enabled=False).state_dict())
    assert fp16.get_scale() == fp16.state_dict()["scale"] == 65536.0  # GradScaler's own start
    load_scaler(fp16, {**fp16.state_dict(), "scale": 1024.0})  # an fp16 run's: continued
    assert fp16.get_scale() == 1024.0


@pytest.mark.parametrize(
    ("section", "key", "value", "said"),
    [
        ("optim", "epochs", "two", 'optim.epochs is "two", not an integer'),
        ("optim", "lr", None, "optim.lr is null, not a number"),
        ("model", "mlp", "yes", 'model.mlp is "yes", not true or false'),
        ("data", "data", 7, "data.data is 7, not a string or null"),
        ("moco", "k", 4.5, "moco.k is 4.5, not an integer"),
        ("optim", "lr_steps", [0.5, "x"], 'optim.lr_steps is [0.5, "x"], not a list of numbers'),
        ("data", "loader_options", {"a": 1}, 'data.loader_options is {"a": 1}, not an object of strings'),
    ],
)
def test_a_config_json_edited_by_hand_with_a_value_of_another_type_is_named(
    tiny_root, tmp_path, capsys, section, key, value, said
):
    # a run stopped before its first checkpoint starts over from its config.json: a value of another
    # type there ("epochs": "two", "lr": null) ended in a TypeError's traceback in the checks of the
    # flags, and "mlp": "yes" or "data": 7 went on (printed, trained) as if they were settings
    out = tmp_path / "run"
    assert main([*tiny_args(tiny_root, out), "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    config[section][key] = value
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", "--out", str(out), "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"moco-fast train: error: --resume: {out / 'config.json'} cannot be read ({said}): correct it, move it "
        "away, or choose another --out"
    ]


@pytest.mark.parametrize("flags", [["--arch", "resnet34"], ["--dim", "64"], ["--moco-k", "32"]])
def test_a_resume_with_another_model_is_refused_before_the_data_is_read(run, capsys, caplog, flags):
    # the checkpoint's model settings cannot change on --resume, but the run read its data (minutes on
    # a large folder; the resident loader decodes all of it) and built the model before it said so,
    # and --print-config, which makes the checks of the flags, printed the config as a run's
    argv = ["train", "--resume", "--out", str(run), "--epochs", "2", *flags]
    assert main([*argv, "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the checkpoint was trained with other" in err[0], err
    with caplog.at_level(logging.INFO, logger="moco_fast"):
        assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == err
    assert not [r for r in caplog.records if r.getMessage().startswith("data:")], caplog.text


def test_a_finished_run_resumed_on_the_demo_set_or_from_random_images_says_which_its_final_knn_reads(caplog):
    # only two --data paths were compared: a run on --loader synthetic (no eval split, no final kNN)
    # resumed with --loader torch computed its owed final kNN on the demo set, which it never trained
    # on, and summary.json took those figures without a word; the demo set resumed on --data too
    from moco_fast.config import build_config, to_dict
    from moco_fast.resume import warn_other_data

    synthetic = to_dict(build_config("v2", {"data.loader": "synthetic"}))
    demo = to_dict(build_config("demo"))
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        warn_other_data(synthetic, build_config("v2", {"data.loader": "synthetic"}))  # the same: nothing
        warn_other_data(demo, build_config("demo", {"data.loader": "torch"}))  # another loader, the same images
        warn_other_data(synthetic, build_config("v2", {"data.loader": "torch"}))
        warn_other_data(demo, build_config("demo", {"data.data": "/data/cifar10"}))
    assert caplog.messages == [
        "--resume: the run trained on random images (--loader synthetic); its final kNN, where still owed, reads "
        "the demo set",
        "--resume: the run trained on the demo set; its final kNN, where still owed, reads --data /data/cifar10",
    ]


def test_a_synthetic_run_resumed_with_another_batch_size_names_no_images_changed(tmp_path, caplog):
    # --loader synthetic's images are its steps x the batch: resumed with --batch-size 4 it said "the
    # data has 8 images now, the run trained on 16 (images or class folders added or removed since)"
    out = tmp_path / "run"
    argv = ["train", "--loader", "synthetic", "--synthetic-steps", "2", "--image-size", "32", "--preset", "cifar"]
    argv += ["--arch", "resnet18", "--stem", "imagenet", "--moco-k", "16", "--bn-splits", "2", "--device", "cpu"]
    argv += ["--workers", "0", "--out", str(out)]
    assert main([*argv, "--epochs", "1", "--batch-size", "8"]) == 0
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main([*argv, "--epochs", "2", "--batch-size", "4", "--resume"]) == 0
    assert "optim.batch_size 8 -> 4" in caplog.text and "images now" not in caplog.text, caplog.text


def test_a_run_whose_data_folder_moved_says_that_resume_reads_its_saved_data(run, tmp_path, capsys):
    # the run's --data, saved in its checkpoint, is gone (the folder moved): the line named a path the
    # user never typed, without saying whose it was or how the run goes on
    path = run / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    gone, data = tmp_path / "moved-away", state["config"]["data"]["data"]
    state["config"]["data"]["data"] = str(gone)
    torch.save(state, path)
    argv = ["train", "--resume", "--out", str(run), "--epochs", "2", "--device", "cpu", "--workers", "0"]
    assert main(argv) == 2
    said = (
        f"moco-fast train: error: data folder not found: {gone} (the --data the run was trained with, which "
        "--resume reads where no --data is given; if its images moved, "
        f"`moco-fast train --resume --out {run} --device cpu --workers 0 --epochs 2 --data NEW_PATH` continues the run there)"
    )
    assert capsys.readouterr().err.strip().splitlines() == [said]
    # the line keeps the flags given: it left out --epochs 2, and run as written it resumed the run's 1
    # epoch ("nothing to do")
    named = shlex.split(said.split("`")[-2].replace("NEW_PATH", data))[1:]  # as the user runs it
    assert main([*named, "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["epochs"] == 2
    other = ["train", "--resume", str(path), "--out", str(tmp_path / "b"), "--device", "cpu", "--workers", "0"]
    assert main(other) == 2
    assert (
        f"`moco-fast train --resume {path} --out {tmp_path / 'b'} --device cpu --workers 0 --data NEW_PATH`"
        in capsys.readouterr().err
    )
    # a --data given is the user's own path: its line is the data's alone; --print-config reads no data
    assert main([*argv, "--data", str(tmp_path / "typo")]) == 2
    assert capsys.readouterr().err.strip() == f"moco-fast train: error: data folder not found: {tmp_path / 'typo'}"
    assert main([*argv, "--print-config"]) == 0


@pytest.mark.parametrize("error", ["data", "damaged", "worker"])
def test_the_saved_data_note_keeps_the_errors_class_and_fields(tmp_path, error):
    # the note was added by rebuilding the error as type(e)(text): a checkpoint.Damaged (its
    # constructor takes a path and a record) whose line named the gone --data ended as a TypeError
    from types import SimpleNamespace

    from moco_fast.checkpoint import Damaged
    from moco_fast.cli import build_parser
    from moco_fast.commands.train import _saved_data_named
    from moco_fast.data import DataError
    from moco_fast.launch import WorkerUserError

    gone, damaged = tmp_path / "imgs", tmp_path / "imgs-run" / "checkpoint.pt"
    raised = {
        "data": DataError(f"data folder not found: {gone}"),
        "damaged": Damaged(damaged, "archive/data/0"),
        "worker": WorkerUserError(f"rank 1: data folder not found: {gone}"),
    }[error]
    line = str(raised)
    args = build_parser().parse_args(["train", "--resume", "--out", str(tmp_path / "run")])  # all train's flags
    cfg = SimpleNamespace(data=SimpleNamespace(data=str(gone)), runtime=SimpleNamespace(device="cpu"))
    with pytest.raises(type(raised)) as caught:
        with _saved_data_named(args, cfg, saved_run=object()):
            raise raised
    assert type(caught.value) is type(raised)
    assert str(caught.value).startswith(f"{line} (the --data the run was trained with")
    assert f"`moco-fast train --resume --out {tmp_path / 'run'} --data NEW_PATH`" in str(caught.value)
    if error == "damaged":
        assert (caught.value.path, caught.value.record) == (damaged, "archive/data/0")


@pytest.mark.parametrize("epochs", [2, 1])
def test_a_checkpoint_config_of_a_wrong_type_is_one_line_for_a_direct_train_caller(run, epochs):
    # train --resume reads the checkpoint's config through checkpoint.saved_config (one line), but
    # resume.warn_rescheduled and warn_rescaled read it with config.from_dict: trainer.train called
    # directly with a hand-edited config ended in from_dict's TypeError (a run extended), or took the
    # config that train --resume refuses (a finished run: nothing to do)
    from moco_fast.config import from_dict
    from moco_fast.data import DataError
    from moco_fast.trainer import train

    path = run / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["config"]["optim"]["lr"] = "fast"
    torch.save(state, path)
    cfg = from_dict(json.loads((run / "config.json").read_text()))
    cfg.runtime.out, cfg.runtime.resume, cfg.optim.epochs = str(run), "auto", epochs
    with pytest.raises(DataError) as caught:
        train(cfg)
    assert str(caught.value) == f'{path}: its saved config cannot be read (optim.lr is "fast", not a number)'


@pytest.mark.parametrize("mechanism", ["end-to-end", "memory-bank", "moco"])
def test_resume_with_another_moco_k_is_refused_only_where_the_checkpoint_holds_a_k_sized_state(run, mechanism, capsys):
    # end-to-end's negatives are the other keys of the batch, and the memory bank's K is how many of its
    # rows (one a training image) each step draws: neither checkpoint holds anything sized by K, yet their
    # resume with another --moco-k was refused as another model. MoCo's K is the queue the checkpoint
    # holds (model.k_sizes_state): that stays refused
    path = run / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["config"]["moco"]["mechanism"] = mechanism
    torch.save(state, path)
    argv = ["train", "--resume", "--out", str(run), "--epochs", "2", "--moco-k", "32", "--print-config"]
    capsys.readouterr()
    if mechanism == "moco":
        assert main(argv) == 2
        said = "moco-fast train: error: --resume: the checkpoint was trained with other moco settings k=16 (now 32)"
        assert capsys.readouterr().err.strip() == said
    else:
        assert main(argv) == 0
        printed = json.loads(capsys.readouterr().out)
        assert (printed["moco"]["mechanism"], printed["moco"]["k"]) == (mechanism, 32)


@pytest.mark.parametrize(
    "loader, key, fix", [("ffcv", "batches_ahead", "batches_ahead=32"), ("dali", "prefetch", "prefetch=32")]
)
def test_a_run_saved_with_an_option_past_todays_bound_resumes_with_the_fix_it_names(
    run, loader, key, fix, capsys, monkeypatch
):
    # batches_ahead=64, saved before MAX_BATCHES_AHEAD bounded it: --resume said the bound alone, as if
    # the user had typed the value, and not how to go on
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["config"]["data"].update(loader=loader, loader_options={key: "64"})
    torch.save(state, run / "checkpoint.pt")
    argv = ["train", "--resume", "--out", str(run), "--device", "cpu", "--workers", "1", "--print-config"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "must be at most 32 (got 64)" in err
    assert err.endswith(
        f"; the run was saved with --loader-option {key}=64: continue it with "
        f"`moco-fast train --resume --out {run} --device cpu --workers 1 --loader-option {fix}`"  # the flags given too
    ), err
    assert main([*argv, "--device", "auto", "--gpus", "2"]) == 2  # and the --gpus given
    again = f"--out {run} --device auto --gpus 2 --workers 1 --loader-option {fix}`"
    assert capsys.readouterr().err.strip().endswith(again)
    # but not one that the command refuses with that --device: --gpus 1 --device cpu was repeated, and
    # the line met its own error next. --gpus 0 is no fewer than one process (left out: the line
    # resumed with the run's saved count)
    for gpus in ("1", "0"):
        assert main([*argv, "--gpus", gpus]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"--out {run} --device cpu --workers 1 --loader-option {fix}`"), err
        named = shlex.split(err.split("`")[-2])[1:]  # the line as the user runs it, less `moco-fast`
        assert main([*named, "--workers", "1", "--print-config"]) == 0  # past the checks of the flags
        capsys.readouterr()
    # --gpus 0 with device auto: one process, --gpus 1 where this machine has a GPU; where it has none,
    # no --gpus (--gpus 1 met "this machine has 0 CUDA GPUs")
    for have, gpus in ((1, " --gpus 1"), (0, "")):
        monkeypatch.setattr(torch.cuda, "device_count", lambda have=have: have)
        assert main([*argv, "--device", "auto", "--gpus", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"--out {run} --device auto{gpus} --workers 1 --loader-option {fix}`"), err
    named = shlex.split(err.split("`")[-2])[1:]
    assert main([*named, "--workers", "1", "--print-config"]) == 0  # this machine takes it
    capsys.readouterr()
    # an option refused that was given now is said alone, as in a fresh run
    assert main([*argv, "--loader-option", "nope=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown" in err and "'nope'" in err and "saved" not in err, err
    # the fix it names goes on: past the run's checks of the flags, which --print-config makes
    assert main([*argv, "--loader-option", fix]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["loader_options"] == {key: "32"}


def test_a_resume_line_under_torchrun_is_a_torchrun_command_that_rank_0_says(run, capsys, monkeypatch):
    # under torchrun the line was `moco-fast train ...`, one process, where the run had N; and every
    # rank said it. Checked for real with 2 CPU processes: the line continues the run as it ran
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["config"]["data"].update(loader="ffcv", loader_options={"batches_ahead": "64"})
    torch.save(state, run / "checkpoint.pt")
    argv = ["train", "--resume", "--out", str(run), "--device", "cpu", "--workers", "1", "--print-config"]
    said = "; the run was saved with --loader-option batches_ahead=64"
    again = f"-m moco_fast train --resume --out {run} --device cpu --workers 1 --loader-option batches_ahead=32`"
    torchrun_env(monkeypatch, RANK="0", WORLD_SIZE="2", TORCHELASTIC_RUN_ID="t")
    # 2 processes: on one machine, or one on each of two
    for nodes, where in (("1", "--standalone"), ("2", "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT")):
        per_node = str(2 // int(nodes))
        monkeypatch.setenv("GROUP_WORLD_SIZE", nodes)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", per_node)
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"{said}: continue it with `torchrun {where} --nproc_per_node {per_node} {again}"), err
    monkeypatch.setenv("RANK", "1")  # the other ranks: the refusal, the line left to rank 0
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(said) and "`" not in err, err


def test_a_moved_data_line_under_torchrun_is_a_torchrun_command_that_rank_0_says(run, tmp_path, capsys, monkeypatch):
    # the --data NEW_PATH line of a run whose folder moved, under torchrun: `moco-fast train ...` ran
    # one process where the job had N, and every rank said it. The data's error is raised where the
    # training opens it (after the job's group is joined, which this test does not start)
    import moco_fast.trainer
    from moco_fast.data import DataError

    path = run / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    gone = tmp_path / "moved-away"
    state["config"]["data"]["data"] = str(gone)
    torch.save(state, path)

    def opens_the_data(cfg, saved=None):
        raise DataError(f"data folder not found: {gone}")

    monkeypatch.setattr(moco_fast.trainer, "train", opens_the_data)
    torchrun_env(monkeypatch, RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", TORCHELASTIC_RUN_ID="t")
    argv = ["train", "--resume", "--out", str(run), "--device", "cpu", "--workers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    said = (
        f"data folder not found: {gone} (the --data the run was trained with, which --resume reads where no "
        "--data is given"
    )
    assert err.endswith(
        f"{said}; if its images moved, `torchrun --standalone --nproc_per_node 2 -m moco_fast train --resume "
        f"--out {run} --device cpu --workers 0 --data NEW_PATH` continues the run there)"
    ), err
    monkeypatch.setenv("RANK", "1")  # the other ranks: the error, the line left to rank 0
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{said})") and "`" not in err, err


def test_a_resume_line_with_gpus_this_machine_lacks_is_not_named_the_gpus_are_refused_first(run, capsys, monkeypatch):
    # `--resume --gpus 2` with --device auto on a machine without a GPU: the saved option's line repeated
    # --gpus 2, which run as printed met "this machine has 0 CUDA GPUs"; the flag's own refusal comes first
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["config"]["data"].update(loader="ffcv", loader_options={"batches_ahead": "64"})
    state["config"]["runtime"]["device"] = "auto"
    torch.save(state, run / "checkpoint.pt")
    argv = ["train", "--resume", "--out", str(run), "--workers", "1", "--gpus", "2"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moco-fast train: error: --gpus 2: this machine has 0 CUDA GPUs"), err
    # where the GPUs are, the line with them; and --print-config, whose config may be for another machine
    for have, extra in ((2, []), (0, ["--print-config"])):
        monkeypatch.setattr(torch.cuda, "device_count", lambda have=have: have)
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"--out {run} --gpus 2 --workers 1 --loader-option batches_ahead=32`"), err


@pytest.mark.parametrize("saved, given", [("cpu", ["--device", "cuda"]), ("cpu", ["--device", "cuda:1"]), ("cuda", [])])
def test_a_resume_line_with_a_cuda_device_this_machine_lacks_is_not_named_the_device_is_refused_first(
    run, capsys, monkeypatch, saved, given
):
    # --device cuda, given or saved, on a machine without a GPU: the saved option's line repeated it, which
    # run as printed met "no CUDA GPU is available"; the device's own refusal comes first
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["config"]["data"].update(loader="ffcv", loader_options={"batches_ahead": "64"})
    state["config"]["runtime"]["device"] = saved
    torch.save(state, run / "checkpoint.pt")
    argv = ["train", "--resume", "--out", str(run), "--workers", "1", *given]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    device = given[1] if given else saved
    assert err == [f"moco-fast train: error: --device {device} was asked for but no CUDA GPU is available"], err
    # --print-config, whose config may be for another machine, names the line
    assert main([*argv, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--workers 1 --loader-option batches_ahead=32`"), err


@pytest.mark.parametrize(
    "saved_data",
    [
        {"loader": "ffcv", "loader_options": {"batches_ahead": "64"}},
        {"loader": "mine", "loader_module": "users_module"},
    ],
)
def test_a_refused_flag_given_to_a_resume_is_said_before_the_line_that_would_repeat_it(run, saved_data, capsys):
    # the refusals of a saved loader option and of a user's loader name a line that repeats every flag
    # given; they came before the checks of the flags, so `--lr=-1` was repeated, and the line, run as
    # printed, met "--lr must be positive" only then
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["config"]["data"].update(saved_data)
    torch.save(state, run / "checkpoint.pt")
    argv = ["train", "--resume", "--out", str(run), "--device", "cpu", "--workers", "1", "--print-config"]
    assert main([*argv, "--lr=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moco-fast train: error: --lr must be positive and --weight-decay not negative (got -1.0, 0.0005)"]
    assert main([*argv, "--lr", "0.1"]) == 2  # a flag the checks take: the saved loader's line, which repeats it
    err = capsys.readouterr().err.strip()
    assert ("--lr 0.1" in err and "continue it with" in err) or "'--lr', '0.1']" in err, err


@pytest.mark.parametrize(
    "given, saved, where",
    [
        (["--device", "cpu", "--gpus", "1"], "cuda", ["--device", "cpu"]),  # "drop --gpus to train on the CPU"
        (["--device", "cpu", "--gpus", "2"], "cuda", ["--device", "cpu"]),  # more CPU processes: torchrun's
        (["--gpus", "0"], "cpu", []),  # the run's CPU, one process
        (["--gpus", "0"], "auto", ["--gpus", "1"]),  # one process, not the saved count
        (["--gpus", "0"], "auto, no GPU", []),  # --gpus 1: "this machine has 0 CUDA GPUs"; one process runs
        (["--gpus", "2"], "cpu", ["--device", "cuda", "--gpus", "2"]),  # the GPUs asked for, not the saved CPU
        (["--device", "cuda:1", "--gpus", "2"], "cuda", ["--device", "cuda", "--gpus", "2"]),
        (["--gpus", "2"], "torchrun", []),  # --nproc_per_node sets the count
    ],
)
def test_the_line_that_resumes_repeats_no_device_and_gpus_that_the_command_refuses(given, saved, where, monkeypatch):
    # _resume_argv repeated --device and --gpus as typed, a contradiction too (--device cpu --gpus 1):
    # the line it named met that error next
    from moco_fast.cli import build_parser
    from moco_fast.commands.train import _resume_argv
    from moco_fast.config import build_config
    from moco_fast.launch import check_local_gpus

    if saved == "torchrun":
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        saved = "cpu"
    # the GPUs this machine has: two, or none for "no GPU"
    saved, have = (saved.removesuffix(", no GPU"), 0) if saved.endswith(", no GPU") else (saved, 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: have)

    def checked(args):  # what train's run() checks of --gpus, on the run's device (given, else saved)
        if args.gpus is not None:
            # check_gpus_flag's refusals and the GPUs this machine has
            check_local_gpus(build_config("v2", {"runtime.device": args.device or saved, "runtime.gpus": args.gpus}))

    parse = build_parser().parse_args
    args = parse(["train", "--resume", "--out", "runs/a", *given])
    with pytest.raises(ConfigError):  # the command line given is refused
        checked(args)
    line = _resume_argv(args, args.device or saved)
    assert line == ["--resume", "--out", "runs/a", *where]
    checked(parse(["train", *line]))  # the line named is not


def test_a_run_saved_with_dalis_gpu_decoder_resumed_on_the_cpu_names_the_fix(run, capsys):
    # decoder=mixed, saved by a GPU run, resumed with --device cpu: --resume said "needs a CUDA device"
    # alone, as if the user had typed it, and not how to go on
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["config"]["data"].update(loader="dali", loader_options={"decoder": "mixed"})
    torch.save(state, run / "checkpoint.pt")
    argv = ["train", "--resume", "--out", str(run), "--device", "cpu", "--workers", "1", "--print-config"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "moco-fast train: error: --loader-option decoder=mixed needs a CUDA device; the run was saved with "
        f"--loader-option decoder=mixed: continue it with `moco-fast train --resume --out {run} --device cpu "
        "--workers 1 --loader-option decoder=auto`"  # the --device given: as written, it resumes on the CPU too
    )
    # given now, it is said alone, as in a fresh run
    assert main([*argv, "--loader-option", "decoder=mixed"]) == 2
    said = "moco-fast train: error: --loader-option decoder=mixed needs a CUDA device"
    assert capsys.readouterr().err.strip().splitlines()[-1] == said
    # the fix it names goes on
    assert main([*argv, "--loader-option", "decoder=auto"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["loader_options"] == {"decoder": "auto"}


def test_a_run_saved_with_dalis_gpu_decoder_resumed_where_auto_finds_no_gpu_names_the_fix(run, capsys, monkeypatch):
    # --device auto (the run's own) on a machine without a GPU runs on the CPU: the run's check of the
    # loader said "needs a CUDA device" alone. --print-config checks auto as on a GPU machine (check_flags)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["config"]["data"].update(loader="dali", loader_options={"decoder": "mixed"})
    state["config"]["runtime"]["device"] = "auto"
    torch.save(state, run / "checkpoint.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["train", "--resume", "--out", str(run), "--workers", "1"]
    assert main([*argv, "--print-config"]) == 0
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "moco-fast train: error: --loader-option decoder=mixed needs a CUDA device; the run was saved with "
        f"--loader-option decoder=mixed: continue it with `moco-fast train --resume --out {run} --workers 1 "
        "--loader-option decoder=auto`"
    )


def test_a_run_resumed_with_another_loader_leaves_the_saved_loaders_options(run, capsys):
    # the saved backend's options went to the loader given now: "the torch loader takes no
    # --loader-option (got batches_ahead=8)" of an ffcv run resumed with --loader torch, and no flag
    # takes a saved option away
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["config"]["data"].update(loader="ffcv", loader_options={"batches_ahead": "8"})
    torch.save(state, run / "checkpoint.pt")
    argv = ["train", "--resume", "--out", str(run), "--device", "cpu", "--workers", "1", "--print-config"]
    for loader, options in (("torch", {}), ("ffcv", {"batches_ahead": "8"})):  # its own loader keeps them
        assert main([*argv, "--loader", loader]) == 0, capsys.readouterr().err
        printed = json.loads(capsys.readouterr().out)["data"]
        assert (printed["loader"], printed["loader_options"]) == (loader, options)


def test_every_refused_saved_option_is_named_with_its_fix_at_once(run, capsys):
    # two saved options refused: the line named the first one's fix alone (batches_ahead), and the
    # line it named met the other's refusal (decode) at the next try
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["config"]["data"].update(loader="ffcv", loader_options={"batches_ahead": "64", "decode": "thrice"})
    torch.save(state, run / "checkpoint.pt")
    argv = ["train", "--resume", "--out", str(run), "--device", "cpu", "--workers", "1", "--print-config"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    said = (
        "batches_ahead must be at most 32 (got 64): each holds a batch's decode buffers in memory (default 3); "
        "ffcv loader option decode must be once or twice, got 'thrice'; the run was saved with --loader-option "
        "batches_ahead=64, --loader-option decode=thrice: continue it with"
    )
    assert said in err[0], err
    assert err[0].endswith(
        f"`moco-fast train --resume --out {run} --device cpu --workers 1 --loader-option batches_ahead=32 "
        "--loader-option decode=once`"
    ), err
    named = shlex.split(err[0].split("`")[-2])[1:]  # the line as the user runs it, less `moco-fast`
    assert main([*named, "--workers", "1", "--print-config"]) == 0  # it goes on
    assert json.loads(capsys.readouterr().out)["data"]["loader_options"] == {"batches_ahead": "32", "decode": "once"}
    # one given now replaces its saved one: the other is named alone
    assert main([*argv, "--loader-option", "decode=twice"]) == 2
    err = capsys.readouterr().err.strip()
    assert "thrice" not in err, err  # and the line keeps it: without it, the saved one came back
    assert err.endswith("--device cpu --workers 1 --loader-option decode=twice --loader-option batches_ahead=32`"), err
    assert main([*shlex.split(err.split("`")[-2])[1:], "--workers", "1", "--print-config"]) == 0


def test_every_flag_a_resume_line_repeats_defaults_to_none_and_takes_one_value():
    # _given_flags repeats each train flag whose value is not None as `FLAG str(value)` (--x or --no-x
    # for a BooleanOptional one): a flag with another default (store_true's False, append's []), another
    # action (store_true's True) or several values (nargs's list) was repeated as "False", "True" or a
    # list's str, which the line's next run refused or took for another value
    import argparse

    from moco_fast.commands.train import _NOT_REPEATED, _flags

    assert _NOT_REPEATED <= {action.dest for action in _flags()}  # each one a flag's (no typo)
    for action in _flags():
        if action.dest in _NOT_REPEATED:
            continue
        assert action.default is None, action.dest
        assert type(action) in (argparse._StoreAction, argparse.BooleanOptionalAction), action.dest
        assert isinstance(action, argparse.BooleanOptionalAction) or action.nargs is None, action.dest
        assert action.type in (None, int, float), action.dest  # str(value) is the value as typed


def test_the_line_that_resumes_repeats_each_flag_given_as_typed():
    # the flags given as they parse again: --no-X for a BooleanOptional one, a value with a space one
    # argument (shlex.join quotes it for a shell), and --preset, which a --resume ignores but for the
    # default --out it picks (runs/moco, runs/demo): without it the line looked for the run elsewhere
    from moco_fast.cli import build_parser
    from moco_fast.commands.train import _resume_argv

    given = ["--preset", "v1", "--no-mlp", "--symmetric", "--lr", "0.5", "--data", "my data", "--save-every", "0"]
    args = build_parser().parse_args(["train", "--resume", *given, "--loader-option", "decode=once"])
    line = _resume_argv(args, "cpu")
    assert line == ["--resume", "--data", "my data", "--preset", "v1", "--no-mlp", "--symmetric", "--lr", "0.5",
                    "--save-every", "0.0", "--loader-option", "decode=once"]  # fmt: skip
    again = build_parser().parse_args(["train", *shlex.split(shlex.join(line))])
    assert vars(again) == vars(args)
    # a value that starts with "-" is one argument with its flag: as two, argparse took it for a flag
    given = ["--data=-odd data", "--lr=-1", "--out=-run"]
    args = build_parser().parse_args(["train", "--resume=-old", *given])
    line = _resume_argv(args, "cpu")
    assert line == ["--resume=-old", "--out=-run", "--data=-odd data", "--lr=-1.0"]
    assert vars(build_parser().parse_args(["train", *shlex.split(shlex.join(line))])) == vars(args)


def test_a_moved_data_line_of_a_resume_without_out_names_the_runs_folder(run, tmp_path, capsys, monkeypatch):
    # `--resume` alone finds the demo preset's runs/demo (no --data: the default preset is demo); the
    # line adds --data NEW_PATH, with which the default preset is v2 and the default --out runs/moco:
    # run as printed, it looked there and, finding no run, started a fresh one of v2's recipe
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    run.rename(tmp_path / "runs" / "demo")
    path = tmp_path / "runs" / "demo" / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    data, state["config"]["data"]["data"] = state["config"]["data"]["data"], str(tmp_path / "moved-away")
    torch.save(state, path)
    assert main(["train", "--resume", "--device", "cpu", "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "`moco-fast train --resume --out runs/demo --device cpu --workers 0 --data NEW_PATH`" in err, err
    named = shlex.split(err.split("`")[-2].replace("NEW_PATH", data))[1:]  # as the user runs it
    assert main([*named, "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["runtime"]["out"] == "runs/demo"


def test_a_flag_that_the_resume_refuses_is_said_before_a_line_that_would_repeat_it(run, capsys):
    # a refused saved option's line repeats every flag given, a refused one too (another --arch, fewer
    # --epochs than the run finished): it was checked first, and the line as printed met that flag's error
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["config"]["data"].update(loader="dali", loader_options={"decoder": "mixed"})
    torch.save(state, run / "checkpoint.pt")
    argv = ["train", "--resume", "--out", str(run), "--device", "cpu", "--workers", "1", "--print-config"]
    assert main([*argv, "--arch", "resnet50"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("moco-fast train: error: --resume: the checkpoint was trained with other model"), err
    assert main([*argv, "--epochs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("moco-fast train: error: --epochs 0: the checkpoint --resume continues has"), err


def test_a_line_that_resumes_a_checkpoint_in_another_runs_folder_keeps_its_force(run, tmp_path, capsys):
    # `--resume PATH --out B --force`: PATH's run continued in B, which holds another run. The line of
    # a moved --data left --force out, and run as printed it was refused: "B holds another run"
    path = run / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    data, state["config"]["data"]["data"] = state["config"]["data"]["data"], str(tmp_path / "moved-away")
    torch.save(state, path)
    other = tmp_path / "other"
    shutil.copytree(run, other)  # another run: its own checkpoint
    argv = ["train", "--resume", str(path), "--out", str(other), "--force", "--device", "cpu", "--workers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"`moco-fast train --resume {path} --out {other} --device cpu --force --workers 0 --data NEW_PATH`" in err
    named = shlex.split(err.split("`")[-2].replace("NEW_PATH", data))[1:]  # as the user runs it
    assert main(named) == 0, capsys.readouterr().err
