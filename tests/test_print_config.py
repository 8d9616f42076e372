"""`train --print-config` refuses what the run would refuse before it starts, as far as the flags
alone decide it, and prints configs for machines other than this one (their GPUs, their data)."""

import json

import pytest
from distributed_helpers import torchrun_env

from moco_fast.cli import main

# flags the run refuses up front, whatever machine it runs on, and a part of its one line
REFUSED = [
    (["--arch", "resnet_nosuch"], "unknown arch 'resnet_nosuch'"),
    (["--moco-k", "16", "--batch-size", "32"], "--moco-k 16 is smaller than the keys one step enqueues (32)"),
    (["--epochs", "0"], "--epochs must be at least 1 (got 0)"),
    (["--batch-size", "12", "--bn-splits", "8"], "must be a multiple of --bn-splits 8"),
    # split BN off: the line asked to lower a --bn-splits of 1 (or one not in use) below 1
    (["--batch-size", "1", "--no-shuffle-bn"], "--batch-size 1 gives BN 1 image a batch: raise it to 2 or more"),
    (["--batch-size", "1", "--bn-splits", "1"], "--batch-size 1 gives BN 1 image a batch: raise it to 2 or more"),
    (["--moco-t", "0"], "--moco-t must be positive"),
    (["--knn-k", "0"], "--knn-k must be at least 1"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--device", "cpu", "--amp", "fp16"], "--amp fp16 needs a GPU"),
    # it said "for 1 CPU processes use torchrun ... --nproc_per_node 1", where one CPU process is train alone
    (["--device", "cpu", "--gpus", "1"], "--gpus 1 asks for a GPU and --device cpu for none: drop --gpus"),
    (["--device", "cpu", "--gpus", "2"], "for 2 CPU processes use torchrun (gloo)"),
    (["--device", "cpu", "--cuda-graph"], "--cuda-graph captures the step on a CUDA GPU"),
    (["--loader", "resident", "--loader-option", "memory_fraction=2"], "memory_fraction must be within (0, 1]"),
    (["--device", "cpu", "--loader", "dali", "--loader-option", "decoder=mixed"], "decoder=mixed needs a CUDA"),
]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(("flags", "said"), REFUSED)
def test_print_config_refuses_what_the_run_refuses(tmp_path, capsys, flags, said):
    assert main(["train", *flags, "--print-config"]) == 2
    printed = one_line(capsys)
    assert said in printed
    # the run: the same line and exit status, before it reads data or writes --out
    assert main(["train", *flags, "--out", str(tmp_path / "run")]) == 2
    assert one_line(capsys) == printed
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--gpus", "0"], "--gpus must be at least 1"),
        (["--gpus", "2", "--device", "cpu"], "for 2 CPU processes use torchrun"),
        (["--gpus", "2", "--cuda-graph"], "--cuda-graph runs with one process only"),
        (["--gpus", "2", "--batch-size", "64", "--moco-k", "64"], "the keys one step enqueues (128)"),
    ],
)
def test_print_config_checks_gpus_as_the_run_would_with_those_gpus(capsys, flags, said):
    assert main(["train", *flags, "--print-config"]) == 2
    assert said in one_line(capsys)


@pytest.mark.parametrize(
    "flags",
    [
        ["--device", "cuda", "--amp", "fp16"],  # no GPU here: the config is for a machine that has one
        ["--gpus", "8"],
        ["--data", "/no/such/folder"],  # the data is not read: it may be on the other machine
        ["--device", "cuda:1", "--cuda-graph"],
        ["--image-size", "4096"],  # the largest (config.MAX_IMAGE_SIZE): high-resolution runs stay possible
        ["--loader", "dali", "--loader-option", "decoder=mixed"],  # --device auto: mixed on a GPU machine
    ],
)
def test_print_config_leaves_this_machine_and_the_data_to_the_run(capsys, flags):
    assert main(["train", *flags, "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["epochs"] > 0


def test_print_config_counts_the_processes_of_the_group_the_environment_describes(monkeypatch, capsys):
    flags = ["train", "--batch-size", "32", "--moco-k", "64", "--print-config"]
    torchrun_env(monkeypatch)
    # a WORLD_SIZE alone starts no group (join.init_from_env): the run is one process and accepts these
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("RANK", raising=False)
    assert main(flags) == 0
    capsys.readouterr()
    # with RANK too it is one process of 4: 128 keys a step for a queue of 64
    monkeypatch.setenv("RANK", "0")
    assert main(flags) == 2
    assert "the keys one step enqueues (128)" in one_line(capsys)


def test_print_config_under_torchrun_prints_one_config(monkeypatch, capsys):
    # every torchrun rank runs the command: 2 ranks printed 2 configs, one after the other, which no
    # JSON reader takes (`torchrun ... --print-config > config.json`). Every rank checks the flags.
    flags = ["train", "--batch-size", "32", "--moco-k", "64", "--print-config"]
    torchrun_env(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    printed = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert main(flags) == 0
        printed.append(capsys.readouterr().out)
    assert json.loads("".join(printed))["optim"]["batch_size"] == 32
    # a RANK alone (a scheduler's, say) starts no group: the one process prints, as a WORLD_SIZE alone's does
    monkeypatch.delenv("WORLD_SIZE")
    assert main(flags) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["batch_size"] == 32
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main([*flags, "--moco-k", "32"]) == 2  # 64 keys a step
    assert "the keys one step enqueues (64)" in one_line(capsys)


def test_a_world_size_that_is_not_a_number_is_no_traceback(monkeypatch, capsys):
    # every command read WORLD_SIZE as a number to decide whether it runs in a worker: `WORLD_SIZE=x`
    # (a scheduler's template left unfilled) was a ValueError traceback before any check
    from moco_fast.cli import main

    monkeypatch.setenv("WORLD_SIZE", "x")
    monkeypatch.delenv("RANK", raising=False)
    assert main(["train", "--print-config"]) == 0  # no group described: one process
    capsys.readouterr()
    torchrun_env(monkeypatch, RANK="0")
    assert main(["train", "--device", "cpu", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "moco-fast train: error: RANK, WORLD_SIZE and MASTER_PORT must be numbers (RANK=0, WORLD_SIZE=x, MASTER_PORT=29500)"
    ]


@pytest.mark.parametrize(("world", "shuffle_bn"), [("2", False), ("1", True)])
def test_print_config_records_shuffle_bn_as_sync_bn_runs_it(monkeypatch, capsys, world, shuffle_bn):
    # --sync-bn across processes turns shuffle BN off (SyncBatchNorm spans the global batch); the
    # config printed, and config.json, said shuffle_bn true for a run that trained without it
    torchrun_env(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--sync-bn", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["moco"]["shuffle_bn"] is shuffle_bn


@pytest.mark.parametrize(
    ("env", "said"),
    [
        (
            {"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
            "RANK=2 with WORLD_SIZE=2",
        ),
        ({"RANK": "0", "WORLD_SIZE": "x", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}, "must be numbers"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT are not"),
    ],
)
def test_print_config_refuses_an_environment_the_run_refuses(monkeypatch, capsys, env, said):
    # it printed a config (of one process, for WORLD_SIZE=x) and exit 0; the run stops at its first line
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "--print-config"]) == 2
    printed = one_line(capsys)
    assert said in printed and capsys.readouterr().out == ""
    assert main(["train", "--device", "cpu", "--epochs", "1", "--out", "/nonexistent/run"]) == 2
    assert one_line(capsys) == printed


def test_print_config_for_gpus_this_machine_lacks_says_the_run_here_would_stop(monkeypatch, capsys, caplog):
    # the config is printed (it may be for another machine), and one line says that this one would refuse
    # the run: it said nothing, and `train --gpus 4` then stopped at once
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    assert main(["train", "--gpus", "4", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["runtime"]["gpus"] == 4
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [
        "a run on this machine would stop here: --gpus 4: this machine has 0 CUDA GPUs; for 4 CPU processes use "
        "torchrun (gloo): torchrun --standalone --nproc_per_node 4 -m moco_fast train --device cpu ..."
    ]


def test_print_config_says_the_line_the_run_says_first(monkeypatch, capsys):
    # --gpus in an environment that describes a group without MASTER_ADDR/MASTER_PORT: the run stops at
    # --gpus (it starts its own workers) before any join, where --print-config named the missing variables
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--gpus", "2", "--print-config"]) == 2
    printed = one_line(capsys)
    assert printed.endswith(
        "--gpus starts its own workers: under torchrun leave it out (--nproc_per_node sets the count)"
    )
    assert main(["train", "--gpus", "2", "--epochs", "1", "--out", "/nonexistent/run"]) == 2
    assert one_line(capsys) == printed


def test_print_config_for_more_workers_than_this_machine_s_cores_take_says_the_run_here_would_stop(
    monkeypatch, capsys, caplog
):
    # it printed the config and said nothing: the run then stopped at its --workers (trainer.check_workers)
    monkeypatch.setattr("moco_fast.trainer.available_cores", lambda: 2)
    monkeypatch.setattr("moco_fast.cores.available_cores", lambda: 2)  # the --workers cap's count
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    assert main(["train", "--workers", "100", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["workers"] == 100
    # --gpus 4's workers share the cores (LOCAL_WORLD_SIZE is theirs, not this process's)
    assert main(["train", "--gpus", "4", "--workers", "5", "--print-config"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w.split(": ")[1] for w in warned] == ["--workers 100", "--workers 5 in each of its 4 processes"]
    assert warned[0].startswith("a run on this machine would stop here: --workers 100: this machine has 2 CPU cores")
    assert warned[0].endswith("use at most 16 (-1: auto)") and warned[1].endswith("use at most 4 (-1: auto)")
