"""`moco-fast train` under torchrun on the CPU (gloo): a run resumed with one process, with as many
ranks (shuffle BN continues exactly) or with another world size (how the lr changes, the fix it
allows), and ranks whose settings, data or run folder differ stop with one line instead of hanging.

Workers run through moco_fast.launch.run_workers or torchrun; they import this module, so the
model and trainer are imported only where needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from distributed_helpers import FEW_SPLIT_IMAGES, cli_args, synthetic_args, torchrun, torchrun_env

from moco_fast.cli import main
from moco_fast.config import ConfigError, build_config
from moco_fast.launch import run_workers


@pytest.mark.slow
def test_cli_under_torchrun_then_resume_with_one_process(tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_root, tmp_path / "data")
    tiny_root = tmp_path / "data"
    next((tiny_root / "train").iterdir()).joinpath("notes.txt").write_text("not an image")
    cmd = torchrun(tmp_path, "-m", "moco_fast")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    # the official code's exchange for shuffle BN (the default all-to-all runs in the DDP tests above)
    args = [*cli_args(tiny_root, out, 1), "--shuffle-exchange", "allgather"]
    p = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("finished epoch 1") == 1, p.stdout  # rank 0 alone reports
    assert p.stderr.count("notes.txt: not an image file") == 1, p.stderr  # said once, not once per rank
    assert sorted(f.name for f in out.iterdir() if f.suffix == ".pt" or f.name.startswith(".")) == ["checkpoint.pt"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert 0 <= json.loads((out / "summary.json").read_text())["final_knn_top1"] <= 100  # kNN on rank 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    assert json.loads((out / "config.json").read_text())["world_size"] == 2  # torchrun's count: --gpus says 1
    assert state["config"]["moco"]["shuffle_exchange"] == "allgather"
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])
    print(f"torchrun, 2 CPU processes, 1 epoch: {time.perf_counter() - t0:.1f} s")

    # Written by 2 processes (global batch 16), continued by 1: same model, queue and optimizer.
    assert main([*cli_args(tiny_root, out, 2, batch=16), "--resume", "--no-final-knn"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    state2 = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state2["world_size"] == 1 and state2["epoch"] == 2
    assert json.loads((out / "config.json").read_text())["world_size"] == 1
    assert not torch.equal(state2["model"]["encoder_q.head.weight"], state["model"]["encoder_q.head.weight"])


def _cli_worker(argv: list[str]) -> int:
    torch.set_num_threads(1)
    return main(argv)


@pytest.mark.slow
def test_a_resume_with_as_many_ranks_continues_shuffle_bn_exactly(tiny_root, tmp_path):
    # The cross-rank shuffle draws its permutations from a generator shared by the ranks: a resumed
    # run must continue it, not seed a new one, or the resumed run trains on other key batches.
    # No final kNN (rank 0's, after the checkpoint): one in each of the three runs, not compared here
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_workers(_cli_worker, ([*cli_args(tiny_root, whole, 2), "--no-final-knn"],), 2) == [0, 0]
    assert run_workers(_cli_worker, ([*cli_args(tiny_root, cut, 1), "--no-final-knn"],), 2) == [0, 0]
    saved = torch.load(cut / "checkpoint.pt", weights_only=False)["shuffle_generator"]
    assert saved["device"] == "cpu" and saved["state"].numel() > 0
    assert run_workers(_cli_worker, ([*cli_args(tiny_root, cut, 2), "--resume", "--no-final-knn"],), 2) == [0, 0]
    a = torch.load(whole / "checkpoint.pt", weights_only=False)
    b = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert a["config"]["moco"]["shuffle_bn"] and a["world_size"] == b["world_size"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_a_resume_with_another_world_size_says_how_the_lr_changes(tmp_path, caplog):
    # 2 workers resumed in 1: the linear scaling halved the lr (0.00375 -> 0.001875 there) and only
    # "new random streams" was said. The warning gives both figures and the --lr that keeps the old.
    import logging

    out = tmp_path / "run"
    assert main(synthetic_args(out, "--bn-splits", "2")) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["world_size"] = 2  # as if 2 workers had trained it (global batch 16)
    torch.save(state, out / "checkpoint.pt")
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main([*synthetic_args(out), "--resume", "--epochs", "2"]) == 0
    assert (
        "--resume: the run was trained by 2 processes, now 1: the global batch goes from 16 to 8, and the lr, "
        "which scales with it, from 0.001875 to 0.0009375 (--lr 0.06 keeps 0.001875)"
    ) in caplog.text


SHUFFLE_BN_BACK = (
    "--resume: the run's --sync-bn across 2 processes replaced shuffle BN; in one process sync BN does "
    "nothing, so shuffle BN is on again (--no-shuffle-bn keeps it off)"
)


def _trained_by_two(out, *flags: str):
    """`out` with a synthetic run's checkpoint, trained with `flags` and made as if 2 processes had
    written it (--sync-bn across processes needs GPUs)."""
    assert main(synthetic_args(out, "--bn-splits", "2", *flags)) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["world_size"] = 2
    torch.save(state, out / "checkpoint.pt")
    return out


def test_a_sync_bn_run_of_two_processes_resumed_in_one_turns_shuffle_bn_back_on(tmp_path, caplog, capsys, monkeypatch):
    # --sync-bn across 2 processes replaced shuffle BN, and config.json and the checkpoint record it off;
    # resumed in one process (sync BN a no-op) it kept that and trained with neither. Turned back on, it
    # was said three times: this line, --sync-bn's in one process and the changed settings' False -> True
    import logging

    out = _trained_by_two(tmp_path / "run", "--sync-bn", "--no-shuffle-bn")
    saved = out / "checkpoint.pt", tmp_path / "saved.pt"
    shutil.copy(*saved)

    def bn_lines(*flags: str) -> list[str]:
        shutil.copy(*reversed(saved))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moco_fast"):
            assert main([*synthetic_args(out), "--resume", "--epochs", "2", *flags]) == 0
        return [r.getMessage() for r in caplog.records if "BN" in r.getMessage() or "-bn" in r.getMessage()]

    # split BN back on too, in 2 sub-batches of 4: its own warning
    assert bn_lines() == [SHUFFLE_BN_BACK, FEW_SPLIT_IMAGES]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["config"]["moco"]["shuffle_bn"]
    assert bn_lines("--shuffle-bn") == [SHUFFLE_BN_BACK, FEW_SPLIT_IMAGES]  # what the resume does anyway: the same
    # --no-shuffle-bn given: kept off as asked, and it trains with neither, as one line says
    assert bn_lines("--no-shuffle-bn") == ["--sync-bn has no effect with one process"]
    assert not torch.load(out / "checkpoint.pt", weights_only=False)["config"]["moco"]["shuffle_bn"]
    # resumed by 2 processes, sync BN still replaces shuffle BN: nothing said, nothing changed
    shutil.copy(*reversed(saved))
    torchrun_env(monkeypatch, WORLD_SIZE="2", RANK="0")
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main([*synthetic_args(out), "--resume", "--device", "auto", "--print-config"]) == 0
    assert SHUFFLE_BN_BACK not in caplog.text
    assert json.loads(capsys.readouterr().out)["moco"]["shuffle_bn"] is False


@pytest.mark.parametrize("written_by", ["--gpus 2", "torchrun", "--gpus 2, before world_size"])
def test_a_sync_bn_run_of_two_processes_stopped_before_its_first_checkpoint_says_one_line_too(
    written_by, tmp_path, caplog
):
    # resumed from its config.json (2 processes, shuffle BN off beside --sync-bn), the run starts over in
    # one process: train --resume's line said shuffle BN on again, and trainer.validate, which looked for
    # a checkpoint's --sync-bn to leave its own line out, said "--sync-bn has no effect" too; --shuffle-bn
    # alike. Under torchrun config.json said --gpus 1 alone, and the run trained with neither, silently
    import logging

    out = tmp_path / "run"
    assert main(synthetic_args(out, "--bn-splits", "2", "--sync-bn", "--no-shuffle-bn")) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved.pop("world_size") == 1
    # as `--gpus 2 --sync-bn` or torchrun wrote it (on GPUs), stopped before its first save
    saved["runtime"]["gpus"] = 1 if written_by == "torchrun" else 2
    if written_by != "--gpus 2, before world_size":
        saved["world_size"] = 2

    def bn_lines(*flags: str) -> list[str]:
        shutil.rmtree(out)
        out.mkdir()
        (out / "config.json").write_text(json.dumps(saved))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moco_fast"):
            assert main(["train", "--resume", "--out", str(out), *flags]) == 0
        return [r.getMessage() for r in caplog.records if "BN" in r.getMessage() or "-bn" in r.getMessage()]

    assert bn_lines() == [SHUFFLE_BN_BACK, FEW_SPLIT_IMAGES]  # split BN back on too, in 2 sub-batches of 4
    assert json.loads((out / "config.json").read_text())["moco"]["shuffle_bn"]
    assert bn_lines("--shuffle-bn") == [SHUFFLE_BN_BACK, FEW_SPLIT_IMAGES]
    assert bn_lines("--no-shuffle-bn") == ["--sync-bn has no effect with one process"]


def test_the_checks_of_a_sync_bn_resume_read_what_the_saved_run_was_once(tmp_path, caplog, monkeypatch):
    # train --resume's line (shuffle BN back on) read the checkpoint's world size, trainer.validate read it
    # again and its --sync-bn a third time, each a torch.load of the file, before resume() read it in full.
    # Read now with the checkpoint's config (resume.SavedRun), where train --resume reads that config
    import logging

    from moco_fast import checkpoint as ckpt

    out = _trained_by_two(tmp_path / "run", "--sync-bn", "--no-shuffle-bn")
    loads, load = [], ckpt.load
    monkeypatch.setattr(ckpt, "load", lambda path, *a, **k: loads.append(k.get("mmap", False)) or load(path, *a, **k))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main([*synthetic_args(out), "--resume", "--epochs", "2"]) == 0
    # mapped: the command's (the config and SavedRun) and run_folder.check_output's (the epochs it holds)
    assert loads == [True, True, False]
    assert [r.getMessage() for r in caplog.records if "BN" in r.getMessage()] == [SHUFFLE_BN_BACK, FEW_SPLIT_IMAGES]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["config"]["moco"]["shuffle_bn"]


def test_sync_bn_added_to_a_resume_in_one_process_of_a_run_without_it_says_it_does_nothing(tmp_path, caplog):
    # A run of 2 processes without --sync-bn (shuffle BN on, as it ran) resumed in one with --sync-bn:
    # train --resume has no line (shuffle BN was on), and trainer.validate's "no effect" line, left out
    # for any resumed run of several processes with shuffle BN on, was not said either
    import logging

    out = _trained_by_two(tmp_path / "run")
    caplog.clear()  # the lines of that run (in one process: split BN's warning)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main([*synthetic_args(out), "--resume", "--epochs", "2", "--sync-bn"]) == 0
    assert [r.getMessage() for r in caplog.records if "BN" in r.getMessage() or "-bn" in r.getMessage()] == [
        "--sync-bn has no effect with one process",
        FEW_SPLIT_IMAGES,  # shuffle BN on, in one process: split BN, in 2 sub-batches of 4
    ]


def test_a_resume_that_turns_shuffle_bn_back_on_leaves_other_changes_to_the_changed_settings(caplog):
    # resume.sync_bn_stops: shuffle BN back on is train's line; a change of --moco-t is still named, and
    # an old checkpoint (shuffle BN recorded on beside --sync-bn) compares as it ran
    import logging

    from moco_fast.config import build_config, to_dict
    from moco_fast.resume import saved_as_run, sync_bn_stops, warn_changed

    saved = to_dict(build_config("cifar", {"runtime.sync_bn": True}))
    now = build_config("cifar", {"runtime.sync_bn": True, "moco.t": 0.2})
    assert sync_bn_stops(True, 2, now, 1) and not sync_bn_stops(True, 2, now, 2)
    assert not sync_bn_stops(True, 1, now, 1) and not sync_bn_stops(False, 2, now, 1)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        warn_changed(saved_as_run(saved, 2), now, ("shuffle_bn",))
    assert [r.getMessage() for r in caplog.records] == ["--resume with changed settings: moco.t 0.1 -> 0.2"]


def test_a_resume_with_another_world_size_names_a_fix_that_it_allows(tmp_path, capsys):
    # 2 workers (plain BN) resumed in one process, whose split BN needs --bn-splits 8 to divide a
    # batch of 8 in pieces of 2 or more: the fresh-run message did not say why, nor which value works.
    out = tmp_path / "run"
    assert main(synthetic_args(out, "--bn-splits", "2")) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["world_size"], state["config"]["moco"]["bn_splits"] = 2, 8  # as `--gpus 2 --batch-size 8` had it
    torch.save(state, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "moco-fast train: error: --batch-size 8 must be a multiple of --bn-splits 8 with at least 2 images per BN "
        "sub-batch: the run was trained by 2 processes, which do not split BN; in one process split BN cuts each "
        "batch of 8 into --bn-splits 8 sub-batches: give --bn-splits 4 (it may change on --resume), or resume "
        "with 2 processes"
    )
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2", "--bn-splits", "4"]) == 0  # it works

    # 1 process resumed by 2: --moco-k cannot change on --resume, so "raise --moco-k" did not help.
    from moco_fast.resume import SavedRun
    from moco_fast.trainer import validate

    cfg = build_config("v2", {"moco.k": 256, "optim.batch_size": 256})
    with pytest.raises(ConfigError) as e:
        validate(cfg, 2, SavedRun(world=1, sync_bn=False))
    assert str(e.value) == (
        "--moco-k 256 is smaller than the keys one step enqueues (512): the queue of the checkpoint (trained by 1 "
        "process, now 2) holds 256 keys, and --resume keeps it: lower --batch-size to 128 or less or resume in one "
        "process"
    )
    with pytest.raises(ConfigError, match=r"raise --moco-k or lower --batch-size$"):
        validate(cfg, 2)  # a fresh run may raise --moco-k
    with pytest.raises(ConfigError, match=r"raise --moco-k or lower --batch-size$"):
        validate(cfg, 2, SavedRun(world=1, sync_bn=False, checkpoint=False))  # config.json's: it starts over
    # the checkpoint is read for a fix only where an error needs one (train and --gpus pass a function)
    with pytest.raises(ConfigError) as asked:
        validate(cfg, 2, lambda: SavedRun(world=1, sync_bn=False))
    assert str(asked.value) == str(e.value)
    import moco_fast.trainer

    with pytest.MonkeyPatch.context() as m:
        m.setattr(moco_fast.trainer, "saved_run", lambda cfg: pytest.fail("read for a run that validates"))
        argv = ["train", "--loader", "synthetic", "--synthetic-steps", "1", "--arch", "resnet18", "--image-size", "16"]
        argv += ["--batch-size", "8", "--bn-splits", "2", "--moco-k", "16", "--epochs", "1", "--device", "cpu"]
        assert main([*argv, "--out", str(tmp_path / "fresh"), "--no-final-knn"]) == 0


# -- ranks that disagree --------------------------------------------------------------------------
def _per_rank_cli_worker(argvs: list[list[str]]) -> tuple[int, str]:
    """main() with this rank's own command line: its exit status and what it wrote on stderr."""
    import contextlib
    import io

    torch.set_num_threads(1)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argvs[int(os.environ["RANK"])])
    return rc, err.getvalue()


@pytest.mark.slow
def test_ranks_with_different_settings_stop_with_one_line(tmp_path):
    # Nothing compared the ranks' settings: a rank with another --moco-k trained "fine" (rank 0's
    # queue was broadcast into it, cut to size). Every rank now stops with the same line.
    out = tmp_path / "run"
    argvs = [synthetic_args(out), synthetic_args(out, "--moco-k", "64", "--moco-t", "0.5")]
    results = run_workers(_per_rank_cli_worker, (argvs,), 2)
    for rc, err in results:
        last = err.strip().splitlines()[-1]
        assert rc == 2 and "Traceback" not in err, err[-3000:]
        assert last == (
            "moco-fast train: error: the ranks were started with different settings: "
            "moco.k: 32 on rank 0, 64 on rank 1; moco.t: 0.2 on rank 0, 0.5 on rank 1: "
            "start every rank with the same flags"
        ), last
    assert not (out / "checkpoint.pt").exists()


def test_what_the_ranks_must_agree_on_is_named_with_each_ranks_value():
    from moco_fast.agreement import by_rank, check_ranks_agree
    from moco_fast.data import DataError

    def report(settings=None, start_epoch=0, num_images=96, steps=6):
        return {"settings": settings or {"moco.k": 256}, "start_epoch": start_epoch, "num_images": num_images,
                "steps": steps}  # fmt: skip

    check_ranks_agree([report()] * 3)  # the same: nothing to say
    check_ranks_agree([report(num_images=5)])  # one rank: nothing to compare
    with pytest.raises(DataError, match=r"^the ranks see different data: 96 images \(6 steps an epoch\) on rank 0, "
                       r"48 images \(3 steps an epoch\) on rank 1: every rank must read the same images"):  # fmt: skip
        check_ranks_agree([report(), report(num_images=48, steps=3)])
    with pytest.raises(ConfigError, match=r"different checkpoints \(epochs \[3, 0\]\)"):
        check_ranks_agree([report(start_epoch=3), report(num_images=48, steps=3)])  # the checkpoint first
    many = {f"f{i}": i for i in range(5)}
    with pytest.raises(ConfigError, match=r"f0: 0 on ranks 0, 1, 1 on rank 2; .*\(and 2 more\)") as e:
        check_ranks_agree([report(many), report(many), report({k: v + 1 for k, v in many.items()})])
    assert "; f3" not in str(e.value)
    assert by_rank([1, 1, 1, 2, 1]) == "1 on ranks 0-2, 4, 2 on rank 3"


@pytest.mark.slow
def test_ranks_with_different_data_stop_instead_of_hanging(tmp_path):
    # Rank 1 with half the images ran half the steps, then waited in the epoch's all-reduce while
    # rank 0 waited in its next step's all-to-all: silent until the one-hour collective timeout.
    # Under torchrun, with a deadline: the processes of a hung job are killed by the pids they wrote.
    from conftest import make_image_root

    big = make_image_root(tmp_path / "big", per_class=16)
    small = make_image_root(tmp_path / "small", per_class=8)
    pids = tmp_path / "pids"
    script = tmp_path / "perrank.sh"
    script.write_text(
        f'#!/bin/sh\necho $$ >> {pids}\nif [ "$RANK" = 1 ]; then data={small}; else data={big}; fi\n'
        f'exec {sys.executable} -m moco_fast "$@" --data "$data"\n'
    )
    script.chmod(0o755)
    out = tmp_path / "run"
    cmd = torchrun(tmp_path, "--no-python")
    args = [str(script), "train", *cli_args(big, out, 1)[3:], "--no-final-knn"]  # the script adds --data
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        p = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=180)
    except subprocess.TimeoutExpired:
        for pid in pids.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        pytest.fail("the ranks with different data hung")
    lines = [line for line in p.stderr.splitlines() if "moco-fast train: error:" in line]
    assert p.returncode != 0 and len(lines) == 2, p.stderr[-3000:]
    assert lines[0].endswith(
        "the ranks see different data: 32 images (2 steps an epoch) on rank 0, 16 images (1 step an epoch) on "
        "rank 1: every rank must read the same images (--data on each machine holding the same set)"
    ), lines
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.slow
def test_every_torchrun_rank_stops_at_a_run_folder_in_use(tiny_root, tmp_path):
    # Rank 0 alone takes the folder's lock; the other ranks learn its result (all-gathered) and
    # stop too, instead of waiting in their first collective for a rank 0 that has gone.
    from moco_fast.folder_locks import HOLDER_NAME
    from moco_fast.run_folder import hold_run_folder

    out = tmp_path / "run"
    cmd = torchrun(tmp_path, "-m", "moco_fast")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with hold_run_folder(out):  # as another train writing there
        p = subprocess.run(cmd + cli_args(tiny_root, out, 1), capture_output=True, text=True, env=env, timeout=180)
        assert p.returncode != 0
        assert p.stderr.count("another moco-fast train is writing there") == 2, p.stderr[-3000:]  # each rank's line
        assert [p.name for p in out.iterdir()] == [HOLDER_NAME]  # nothing written: the holder's file alone
