"""What a run folder holds across commands: `--resume` continues a run as it was configured,
a finished run is not redone, another run's folder is not overwritten without --force, and bad
flag values are one-line errors before anything starts."""

import io
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
from functools import partial

import pytest
import torch

from moco_fast import checkpoint as ckpt
from moco_fast.cli import main
from moco_fast.config import ConfigError
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
        warn_rescheduled(saved, now, 2, 1, 2)
    assert "epoch 3 trains at lr 0.0002344 where epoch 2 had 0.0009375" in caplog.text, caplog.text
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
    # --bn-splits may change on resume (a run from N processes, plain BN, resumes in one with split BN)
    assert main([*tiny_args(tiny_root, out, epochs=2), "--resume", "--bn-splits", "4"]) == 0
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
        ("--lr", "nan", "--lr must be positive"),  # NaN passes every `<= 0` check
        ("--lr", "inf", "--lr must be positive"),
        ("--weight-decay", "nan", "--weight-decay not negative"),
        ("--moco-t", "nan", "--moco-t must be positive"),
        ("--knn-t", "inf", "--knn-t must be positive"),
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
    (tmp_path / "lincls.json").write_text('{"top1": 1.0}')  # e.g. `train --resume RUN/lincls.json`
    with pytest.raises(DataError, match="is not a moco-fast checkpoint: it holds JSON text"):
        ckpt.load(tmp_path / "lincls.json")
    torch.save({"config": {}, "model": {}}, tmp_path / "d.pt")
    with pytest.raises(DataError):
        ckpt.load_model(tmp_path / "d.pt")


def test_a_damaged_checkpoint_is_named_before_its_weights_are_used(tmp_path):
    # A block of 0xff in the weights' bytes (a disk or copy fault): torch.load reads it as NaN
    # weights without a word, and a resumed run then "diverged"; the records' checksums tell.
    path = tmp_path / "checkpoint.pt"
    torch.save({"config": {}, "model": {"w": torch.zeros(100_000)}}, path)
    assert ckpt.load(path)["model"]["w"].sum() == 0
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)  # inside the 400 KB of w
        fh.write(b"\xff" * 64)
    with pytest.raises(DataError, match=r"checkpoint.pt is damaged: its record .*/data/0 fails its checksum"):
        ckpt.load(path)
    # damage where torch.load itself fails: the zip directory at the end, the pickle at the start
    for where, says in ((-1000, "cut short or damaged"), (200, "is damaged: its record .*data.pkl fails its checksum")):
        torch.save({"config": {}, "model": {"w": torch.zeros(100_000)}}, path)
        with open(path, "r+b") as fh:
            fh.seek(where if where > 0 else path.stat().st_size + where)
            fh.write(b"\xff" * 1000)
        with pytest.raises(DataError, match=says):
            ckpt.load(path)
    # a file saved without checksums (torch can: compute_crc32 off) is read as it is
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"config": {}, "model": {"w": torch.ones(1000)}}, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert ckpt.load(tmp_path / "nocrc.pt")["model"]["w"].sum() == 1000


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


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(tiny_root, run, capsys):
    (run / ".checkpoint.pt.4242.tmp").write_bytes(b"half")  # left by a run killed while saving
    before = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main([*tiny_args(tiny_root, run, epochs=2), "--resume", "--lr", "1e30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "diverged in epoch 2" in err[-1] and "NaN or inf" in err[-1], err
    assert "the last checkpoint is kept" in err[-1]
    assert (run / "checkpoint.pt").read_bytes() == before  # not overwritten with NaN weights
    assert [r["epoch"] for r in rows(run)] == [1]
    assert not list(run.glob(".*.tmp"))


def test_a_run_that_fails_in_its_first_epoch_leaves_the_folder_as_it_was(tiny_root, tmp_path, capsys, monkeypatch):
    # It diverges in epoch 1, after it wrote config.json and opened tb/: what it made goes, and the
    # folder it created goes with them; a folder that was there keeps what it held, tb/ included.
    new, kept = tmp_path / "new", tmp_path / "kept"
    (kept / "tb").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    (kept / "tb" / "events.old").write_text("an earlier run's")
    for out in (new, kept):
        assert main([*tiny_args(tiny_root, out), "--lr", "1e30"]) == 2
        err = capsys.readouterr().err
        assert "diverged in epoch 1" in err and "nothing was saved: lower --lr" in err, err
    assert not new.exists()
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*")) == ["notes.txt", "tb", "tb/events.old"]
    # stopped in epoch 1 (Ctrl-C, SIGTERM, a preemption): config.json stays, and --resume alone
    # starts the run over with it
    import moco_fast.trainer

    stopped = tmp_path / "stopped"
    monkeypatch.setattr(moco_fast.trainer, "_run_epoch", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(tiny_args(tiny_root, stopped)) == 130
    monkeypatch.undo()
    assert (stopped / "config.json").is_file()
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(stopped), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["moco"]["k"] == 16  # tiny_args', not the default 1024
    # that restart fails in its epoch 1 in turn: the folder keeps a config.json to --resume from
    assert main(["train", "--resume", "--out", str(stopped), "--lr", "1e30"]) == 2
    assert (stopped / "config.json").is_file()


def test_a_folder_whose_config_json_is_not_a_runs_is_left_alone(tiny_root, tmp_path, capsys):
    # another tool's folder (a model folder with its own config.json), or a partial file: a run there
    # would overwrite it, and --resume would start the default recipe from it
    for text in ('{"foo": 1}', '{"model": {"arch": "resnet18"}, "optim": {"epochs": 1}}'):
        out = tmp_path / "other"
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text(text)
        for argv in (
            tiny_args(tiny_root, out),
            ["train", "--resume", "--out", str(out)],
            [*tiny_args(tiny_root, out), "--force"],
        ):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1].endswith(
                f"{out / 'config.json'} is not the config.json of a moco-fast run (another tool's?): a run there would overwrite it; choose another --out, or move it away"
            ), err
        assert (out / "config.json").read_text() == text and [p.name for p in out.iterdir()] == ["config.json"]


def test_check_finite_warns_on_a_loss_that_the_fp16_scaler_skipped(caplog):
    from moco_fast.config import build_config
    from moco_fast.divergence import Diverged, check_finite

    check = partial(check_finite, cfg=build_config("v2"))  # T 0.2, lr 0.03: nothing stands out
    net = torch.nn.Linear(2, 2)
    with caplog.at_level("WARNING", logger="moco_fast"):
        check(net, torch.tensor(float("inf")), 3, torch.float16)
    assert "epoch 3: the mean loss is inf" in caplog.text and "skipped" in caplog.text
    with torch.no_grad():
        net.bias[1] = float("nan")
    with pytest.raises(Diverged, match="1 tensors of the model hold NaN or inf \\(first: bias\\)") as e:
        check(net, torch.tensor(1.0), 3, None)
    assert str(e.value).endswith("lower --lr")  # fp32: no --amp to change
    # the advice names another --amp than the run's
    for dtype, says in (
        (torch.float16, "lower --lr, or use --amp bf16 or off"),
        (torch.bfloat16, "lower --lr, or use --amp off"),
    ):
        with pytest.raises(Diverged) as e:
            check(net, torch.tensor(1.0), 3, dtype)
        assert str(e.value).endswith(says)
    # BN statistics too: an fp16 forward that overflows poisons them although the scaler skips its step
    bn = torch.nn.BatchNorm1d(2)
    bn.running_var[0] = float("inf")
    with pytest.raises(Diverged, match="first: running_var"):
        check(bn, torch.tensor(1.0), 3, torch.float16)


def test_a_second_train_into_a_busy_folder_fails_at_once(tiny_root, tmp_path, capsys):
    from moco_fast.run_folder import hold_run_folder

    out = tmp_path / "busy"
    with hold_run_folder(out):  # as another process training there
        assert main(tiny_args(tiny_root, out)) == 2
    assert "another moco-fast train is writing there" in capsys.readouterr().err
    assert not out.exists()  # the holder created it and left it empty: removed
    # a run that fails before writing anything leaves no folder behind either
    assert main(tiny_args(tmp_path / "missing-data", tmp_path / "never")) == 2
    assert not (tmp_path / "never").exists()


def test_data_is_saved_as_an_absolute_path(tiny_root, monkeypatch, capsys):
    monkeypatch.chdir(tiny_root.parent)
    assert main(["train", "--data", tiny_root.name, "--print-config"]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert saved["data"]["data"] == str(tiny_root)  # a --resume from another folder finds the same data


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


def test_ctrl_c_and_sigterm_end_with_their_exit_status(monkeypatch, capsys, tmp_path, request):
    import signal

    import moco_fast.commands.export as export

    def zip_writer_error(args):  # torch.save's writer raises this when Ctrl-C strikes inside it
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from None

    def sigterm(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    argv = ["export", "ckpt", "--format", "torchvision", "--output", "x.pth"]
    from moco_fast.cli import STOP_SIGNALS

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    # Python's own Ctrl-C handler, as in a terminal: a job started in the background by a shell
    # without job control (`make test &`) inherits SIGINT ignored, and the command rightly keeps it so
    request.addfinalizer(partial(signal.signal, signal.SIGINT, signal.getsignal(signal.SIGINT)))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr(export, "run", zip_writer_error)
    assert main(argv) == 130 and "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(export, "run", sigterm)
    assert main(argv) == 143 and "terminated" in capsys.readouterr().err
    # Ctrl-C while torch was being imported: the modules that name the user errors import torch,
    # which is half-imported now; the command still ends as interrupted, without a traceback.
    import moco_fast.cli

    def torch_cut_short(args):
        try:
            raise KeyboardInterrupt  # in torch's import
        except KeyboardInterrupt:
            raise AttributeError("partially initialized module 'torch' has no attribute 'cuda'") from None

    def user_errors():
        raise AttributeError("partially initialized module 'torch' has no attribute 'cuda'")

    # Ctrl-C while torch is imported is held until the import is done (in torch's C++ side it aborted
    # the process), then ends the command as interrupted before it runs
    ran = []
    (tmp_path / "held_import_probe.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nDONE = True\n"
    )
    with monkeypatch.context() as m:
        m.syspath_prepend(str(tmp_path))
        m.setattr(moco_fast.cli, "HELD_IMPORTS", ("held_import_probe",))
        m.setattr(export, "run", lambda args: ran.append(1))
        assert main(argv) == 130 and capsys.readouterr().err.strip() == "interrupted"
        assert sys.modules.pop("held_import_probe").DONE and not ran  # the import ran to its end
    with monkeypatch.context() as m:
        m.setattr(moco_fast.cli, "user_errors", user_errors)
        for run in (lambda args: (_ for _ in ()).throw(KeyboardInterrupt), torch_cut_short):
            m.setattr(export, "run", run)
            assert main(argv) == 130 and capsys.readouterr().err.strip() == "interrupted"
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before  # main put the process's handlers back
    # a torchrun worker keeps the default action: a Python handler would wait for a blocked collective
    # (train: the one command that runs under torchrun)
    import moco_fast.commands.train as train

    seen = []
    monkeypatch.setattr(train, "run", lambda args: seen.append({s: signal.getsignal(s) for s in STOP_SIGNALS}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train"]) == 0 and seen == [before]


STOPPED_IN_A_SAVE = """
import json, os, pathlib, signal, sys, torch
from moco_fast import trainer
from moco_fast.cli import main

argv, out = json.loads(sys.argv[1]), pathlib.Path(sys.argv[2])
real_save, sig, before = torch.save, None, (out / "checkpoint.pt").read_bytes()

def save_then_signal(obj, fh, *a, **k):  # the signal lands inside a checkpoint's write
    fh.write(b"half a checkpoint")
    os.kill(os.getpid(), sig)
    fh.seek(0)  # ignored: the save goes on
    fh.truncate()
    real_save(obj, fh, *a, **k)

torch.save = save_then_signal
# the epoch's steps are not what is tested (and take seconds each on a loaded machine)
trainer._run_epoch = lambda step, loader, cfg, epoch, lr, *rest: ({"epoch": epoch + 1, "loss": 1.0, "lr": lr, "img_per_s": 1.0}, torch.ones(()))
done = {}
for name in sys.argv[3:]:
    sig = getattr(signal, name)
    done[name] = main([*argv, "--resume", "--epochs", "2"])
    done[name + " handler put back"] = signal.getsignal(sig) == signal.SIG_DFL
done["checkpoint kept"] = (out / "checkpoint.pt").read_bytes() == before
done["temporaries"] = [p.name for p in out.glob(".*.tmp")]
signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup` starts it: the run goes on
sig = signal.SIGHUP
done["nohup"] = main([*argv, "--resume", "--epochs", "2"])
print(json.dumps(done))
"""


def test_hup_usr1_and_usr2_end_a_run_as_sigterm_does(run, tiny_root):
    # SIGHUP (the terminal or ssh session closed), SIGUSR1/SIGUSR2 (SLURM's --signal warning before a
    # time limit) ended the run at once: the checkpoint's temporary stayed, and nothing was said. Each
    # lands inside the save of epoch 2: one line, 128 + the signal, no temporary, epoch 1's checkpoint.
    import signal
    import subprocess

    names = ["SIGHUP", "SIGUSR1", "SIGUSR2"]
    argv = [json.dumps(tiny_args(tiny_root, run)), str(run), *names]
    done = subprocess.run([sys.executable, "-c", STOPPED_IN_A_SAVE, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got == {
        **{n: 128 + getattr(signal, n) for n in names},
        **{f"{n} handler put back": True for n in names},
        "checkpoint kept": True,
        "temporaries": [],
        "nohup": 0,  # a SIGHUP that was ignored stays ignored
    }
    lines = [line for line in done.stderr.splitlines() if line.startswith(("stopped", "Traceback"))]
    assert lines == [f"stopped by {n}" for n in names], done.stderr[-2000:]
    assert ckpt.load(run / "checkpoint.pt")["epoch"] == 2


def test_each_command_holds_ctrl_c_over_the_imports_it_makes(tmp_path):
    # Every command but convert imports torchvision, whose C++ ops load like torch's: a Ctrl-C held
    # over torch's import alone could still land in there. convert never imports it (holding it would
    # cost 1.5 s at its start), which a process of its own shows.
    import subprocess

    from moco_fast.cli import HELD_IMPORTS, build_parser

    argv = {
        "train": [],
        "knn": ["--checkpoint", "c"],
        "lincls": ["--checkpoint", "c"],
        "finetune": ["--checkpoint", "c"],
        "export": ["c", "--format", "torchvision", "--output", "x"],
        "sweep": ["--out", "o"],
        "convert": ["a", "b", "--format", "wds"],
    }
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == set(argv)  # a new command is added here too
    for command, rest in argv.items():
        held = getattr(build_parser().parse_args([command, *rest]), "held_imports", HELD_IMPORTS)
        assert held[0] == "torch" and ("torchvision" in held) == (command != "convert"), command
    (tmp_path / "src" / "a").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (24, 16), (200, 10, 10)).save(tmp_path / "src" / "a" / "0.jpg")
    code = (
        "import sys; from moco_fast.cli import main; "
        f"rc = main(['convert', {str(tmp_path / 'src')!r}, {str(tmp_path / 'out')!r}, '--format', 'wds']); "
        "print(rc, 'torchvision' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[-2:] == ["0", "False"], done.stderr


def test_a_full_disk_or_a_folder_that_may_not_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    import moco_fast.commands.export as export
    from moco_fast.checkpoint import atomic_write

    def zip_writer(fh):  # torch.save on a full disk: its writer raises while handling the OSError
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    target = tmp_path / "checkpoint.pt"
    monkeypatch.setattr(export, "run", lambda args: atomic_write(target, zip_writer))
    argv = ["export", "ckpt", "--format", "torchvision", "--output", "x.pth"]
    assert main(argv) == 2
    assert one_line(capsys) == f"moco-fast export: error: No space left on device: {target}"
    assert list(tmp_path.iterdir()) == []  # the temporary file went
    # a quota met by a plain write or fsync: named with the file too
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    monkeypatch.setattr(export, "run", lambda args: atomic_write(target, lambda fh: (_ for _ in ()).throw(quota)))
    assert main(argv) == 2
    assert one_line(capsys) == f"moco-fast export: error: Disk quota exceeded: {target}"

    # a folder that may not be written: the file is named, not the temporary one beside it
    def refused(prefix, suffix, dir):
        raise PermissionError(errno.EPERM, "Operation not permitted", f"{dir}/{prefix}x1y2{suffix}")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", refused)
        m.setattr(export, "run", lambda args: atomic_write(target, lambda fh: None))
        assert main(argv) == 2
    assert one_line(capsys) == f"moco-fast export: error: Operation not permitted: {target}"

    def bug_in_a_handler(args):  # another error raised while handling one: its traceback stays
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise ValueError("a bug") from None

    monkeypatch.setattr(export, "run", bug_in_a_handler)
    with pytest.raises(ValueError, match="a bug"):
        main(argv)
    monkeypatch.setattr(export, "run", lambda args: os.mkdir(tmp_path / "x" / "y"))  # as the OS refuses
    monkeypatch.setattr(
        os, "mkdir", lambda p: (_ for _ in ()).throw(PermissionError(errno.EPERM, "Operation not permitted", str(p)))
    )
    assert main(argv) == 2
    assert one_line(capsys) == f"moco-fast export: error: Operation not permitted: {tmp_path / 'x' / 'y'}"
    # (an EIO is the disk's: one line, see test_an_io_error_without_a_file_is_one_line_naming_...)
    monkeypatch.setattr(export, "run", lambda args: (_ for _ in ()).throw(OSError(errno.EBADF, "Bad file descriptor")))
    with pytest.raises(OSError, match="Bad file descriptor"):  # a bug's, not the user's to fix: the traceback stays
        main(argv)


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_resume_never_starts_over_a_run_that_checkpointed(tiny_root, run, capsys):
    # Its checkpoint moved away: rows past epoch 1 or an evaluation beside it show that the run got
    # further than its first checkpoint, so --resume is refused rather than wiping the folder.
    (run / "checkpoint.pt").rename(run.parent / "elsewhere.pt")
    (run / "lincls.json").write_text("{}")
    capsys.readouterr()
    assert main([*tiny_args(tiny_root, run, epochs=2), "--resume"]) == 2
    assert "holds a run already" in capsys.readouterr().err and (run / "lincls.json").is_file()
    (run / "lincls.json").unlink()
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 2, "loss": 1.0}) + "\n")
    assert main([*tiny_args(tiny_root, run, epochs=3), "--resume"]) == 2
    assert [r["epoch"] for r in rows(run)] == [1, 2]


def test_sigterm_stops_the_watch_on_dataloader_workers():
    # SIGTERM to the process group ends the DataLoader workers with the main process, so SIGTERM and
    # SIGCHLD arrive together. torch's SIGCHLD handler, left in place, raised "DataLoader worker ...
    # killed by signal: Terminated" with a traceback after "terminated" (seen with `lincls --workers
    # 2` and `kill -TERM -PGID`); SIG_DFL in its place printed "Signal 17 ignored due to race
    # condition". Both signals pending at once, in a process of its own:
    import subprocess
    import sys

    code = """
import os, signal
from moco_fast import cli

def torch_like(signum, frame):
    raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

signal.signal(signal.SIGCHLD, torch_like)
signal.signal(signal.SIGTERM, cli._on_stop_signal)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGCHLD})
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # the child has ended: SIGCHLD is pending
os.kill(os.getpid(), signal.SIGTERM)
try:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGCHLD})
    for _ in range(100000):
        pass
except cli.Terminated:
    print("terminated")
for _ in range(100000):
    pass
os.waitpid(pid, 0)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "terminated" and run.stderr == "", run.stderr


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


def test_the_final_report_names_the_knn_settings_the_run_used(capsys):
    from moco_fast.commands.train import _report
    from moco_fast.config import build_config

    cfg = build_config("cifar", {"runtime.knn_k": 5, "runtime.knn_t": 0.07})
    _report({"epoch": 1, "loss": 1.0, "img_per_s": 10.0, "final_knn_top1": 43.75, "final_knn_head_top1": 6.25}, cfg)
    out = capsys.readouterr().out
    assert "kNN top-1 (k=5, t=0.07, trained backbone): 43.75%" in out
    assert "kNN top-1 (k=5, t=0.07, trained head output): 6.25%" in out
    # A train split smaller than --knn-k: the summary's knn_k, the k really used, is the one named.
    _report({"epoch": 1, "loss": 1.0, "img_per_s": 10.0, "final_knn_top1": 50.0, "knn_k": 3}, cfg)
    assert "kNN top-1 (k=3, t=0.07, trained backbone): 50.00%" in capsys.readouterr().out


def test_a_memory_bank_run_resumed_on_other_data_says_why_it_cannot(tiny_root, fresh_root, tmp_path, capsys):
    out = tmp_path / "mb"
    assert main([*tiny_args(tiny_root, out), "--mechanism", "memory-bank"]) == 0
    capsys.readouterr()
    argv = ["train", "--resume", "--out", str(out), "--data", str(fresh_root), "--epochs", "2"]
    assert main([*argv, "--device", "cpu", "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bank holds a feature for each of its 32 training images" in err[0], err
    assert "the data now has 16" in err[0]


def test_a_flat_eval_split_leaves_out_the_final_knn_and_stops_only_knn_every(tiny_root, tmp_path, capsys, caplog):
    # ImageNet's val/ comes flat. It stopped every folder loader before training, even with no kNN.
    data = tmp_path / "data"
    shutil.copytree(tiny_root / "train", data / "train")
    (data / "val").mkdir()
    for f in (tiny_root / "test").rglob("*.jpg"):
        shutil.copy(f, data / "val" / f"{f.parent.name}_{f.name}")
    argv = [a for a in tiny_args(data, tmp_path / "run") if a != "--no-final-knn"]
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main(argv) == 0
    assert f"the eval split {data / 'val'} cannot be used (no class subfolders" in caplog.text
    assert [r["epoch"] for r in rows(tmp_path / "run")] == [1]  # trained; no final kNN, so no summary.json
    assert not (tmp_path / "run" / "summary.json").exists()
    capsys.readouterr()
    assert main([*argv, "--force", "--knn-every", "1"]) == 2
    assert "no class subfolders in" in one_line(capsys)


def test_synthetic_says_that_it_reads_no_data(tmp_path, caplog):
    # `--loader synthetic --data /nonexistent` trained without a word and kept the path in config.json
    argv = [
        "train", "--loader", "synthetic", "--synthetic-steps", "1", "--data", str(tmp_path / "gone"),
        "--arch", "resnet18", "--image-size", "16", "--batch-size", "8", "--bn-splits", "2", "--moco-k", "16",
        "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run"), "--no-final-knn",
    ]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main(argv) == 0
    assert f"--loader synthetic makes its own images: --data {tmp_path / 'gone'} is not read" in caplog.text


def test_a_file_size_limit_is_one_line_naming_the_file(tmp_path):
    # `ulimit -f` (a cluster's job limit) or a file system's largest file: writes fail with EFBIG,
    # which ended train at its checkpoint save with a traceback ("OSError: [Errno 27] File too large").
    import subprocess

    target = tmp_path / "checkpoint.pt"
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
        "import moco_fast.commands.export as export; from moco_fast.checkpoint import atomic_write; "
        f"export.run = lambda args: atomic_write({str(target)!r}, lambda fh: fh.write(bytes(8192))); "
        "from moco_fast.cli import main; "
        "sys.exit(main(['export', 'c', '--format', 'torchvision', '--output', 'x.pth']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"moco-fast export: error: File too large: {target}"]
    assert list(tmp_path.iterdir()) == []  # the temporary file went


def test_an_io_error_naming_its_file_is_one_line():
    # EIO (a failing disk, a network file system gone) was a bug's traceback; with its file it is what
    # the user must look at. Without a file the traceback still says where it came from.
    import errno

    from moco_fast.cli import one_line

    line = one_line(OSError(errno.EIO, "Input/output error", "/nfs/runs/moco/checkpoint.pt"))
    assert line.startswith("Input/output error: /nfs/runs/moco/checkpoint.pt (the disk or the network")
    assert one_line(OSError(errno.EINVAL, "Invalid argument", "/x")) is None  # a bug's: traceback


def test_an_io_error_without_a_file_is_one_line_naming_what_the_command_reads_and_writes(tmp_path, monkeypatch, capsys):
    # A read or write of a file already open raises EIO without a file: that was a bug's traceback.
    import errno

    from moco_fast import trainer

    def failing(cfg):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(trainer, "train", failing)
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    assert main(["train", "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "moco-fast train: error: Input/output error (the disk or the network file system failed; "
        f"the command reads and writes --data {data} and --out {out})"
    ]
    # where a command names no paths (a --gpus worker's report): that it was a file open
    from moco_fast.cli import one_line

    assert one_line(OSError(errno.EIO, "Input/output error")).endswith("failed; a file open for reading or writing)")
    # anything else without a file is a bug's, and keeps its traceback
    monkeypatch.setattr(trainer, "train", lambda cfg: (_ for _ in ()).throw(OSError(errno.EINVAL, "Invalid argument")))
    with pytest.raises(OSError, match="Invalid argument"):
        main(["train", "--data", str(data), "--out", str(out)])


def test_the_error_line_is_one_write(tmp_path, monkeypatch):
    # The ranks of a torchrun job share stderr: print() wrote the line and its newline apart, and two
    # ranks' error lines came out run together on one line.
    class Writes(io.StringIO):
        def __init__(self):
            super().__init__()
            self.calls = []

        def write(self, text):
            self.calls.append(text)
            return super().write(text)

    err = Writes()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["export", str(tmp_path / "missing.pt"), "--format", "torchvision", "--output", "x.pth"]) == 2
    assert len(err.calls) == 1 and err.calls[0].startswith("moco-fast export: error: ")
    assert err.calls[0].endswith("\n") and err.calls[0].count("\n") == 1


def test_the_error_line_starts_a_line_of_its_own_after_a_progress_bar(tmp_path, monkeypatch):
    # A stop or an error in an epoch wrote its line on the line of the progress bar it cut short
    # ("epoch 1/2:  30%|███ | 3/10 interrupted"): the bar is cleared first.
    from moco_fast.metrics import progress

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bar = progress(total=10, desc="epoch 1/2")
    bar.update(3)
    bar.refresh()
    assert main(["export", str(tmp_path / "missing.pt"), "--format", "torchvision", "--output", "x.pth"]) == 2
    shown = err.getvalue().split("\n")[-2].split("\r")[-1]  # the last line as a terminal shows it
    assert shown.startswith("moco-fast export: error: "), repr(err.getvalue())


def test_a_bar_that_a_thread_was_redrawing_draws_nothing_after_the_error_line(tmp_path, monkeypatch):
    # A thread (FFCV's writer's bar, tqdm's monitor) that had seen the bar open and waited for tqdm's
    # lock while say() closed it drew the bar once more, after the line: the line was no longer last.
    import threading

    from tqdm import tqdm

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bar = tqdm(total=10, desc="writing", mininterval=0, miniters=1, file=sys.stderr)
    bar.update(3)
    waiting, go = threading.Event(), threading.Event()

    class Gate:  # tqdm's lock, where the thread is held: past the check that the bar is open
        def __init__(self, lock):
            self.lock = lock

        def acquire(self, *args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                waiting.set()
                go.wait(10)
            return self.lock.acquire(*args, **kwargs)

        def release(self):
            self.lock.release()

        __enter__ = acquire

        def __exit__(self, *exc):
            self.release()

    bar._lock = Gate(bar._lock)
    drawing = threading.Thread(target=bar.update, args=(2,))
    drawing.start()
    assert waiting.wait(10)
    assert main(["export", str(tmp_path / "missing.pt"), "--format", "torchvision", "--output", "x.pth"]) == 2
    go.set()
    drawing.join(10)
    assert err.getvalue().endswith("\n") and "\r" not in err.getvalue().rpartition("error: ")[2], repr(err.getvalue())
    assert err.getvalue().split("\n")[-2].split("\r")[-1].startswith("moco-fast export: error: ")


def test_an_out_that_is_or_lies_under_a_file_is_one_line(tiny_root, tmp_path, capsys):
    # under a file, mkdir said "[Errno 20] Not a directory: 'notes.txt/run'"
    (tmp_path / "notes.txt").write_text("a file")
    for out, why in (
        ("notes.txt", "is a file"),
        ("notes.txt/run", f"lies under {tmp_path / 'notes.txt'}, which is a file"),
    ):
        assert main(tiny_args(tiny_root, tmp_path / out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"moco-fast train: error: --out {tmp_path / out} {why}: it must be a run folder"]
    assert (tmp_path / "notes.txt").read_text() == "a file"


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's own traceback
def test_tensorboard_logs_on_a_full_disk_are_named(tiny_root, tmp_path, monkeypatch, capsys):
    # TensorBoard writes its event file in a thread; a full disk there came back from add_scalar or
    # close() as "No space left on device" without a path, and in the clean-up after another error
    # its close() raised over the first error.
    import errno

    from tensorboard.summary.writer import record_writer

    real = record_writer.RecordWriter.write
    calls = []

    def full(self, data):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    out = tmp_path / "run"
    assert main(tiny_args(tiny_root, out, epochs=2)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert err == [f"moco-fast train: error: No space left on device: {out / 'tb'}"]
    assert ckpt.load(out / "checkpoint.pt")["epoch"] >= 1  # the last good checkpoint stays

    # another error (here a bug at the checkpoint save) while the event file's thread has failed too:
    # the first error stands, not close()'s
    import time

    class Boom(Exception):
        pass

    def save_fails(obj, path):
        time.sleep(1)  # the event file's thread meets the full disk meanwhile
        raise Boom("the first error")

    calls.clear()
    monkeypatch.setattr(ckpt, "save_atomic", save_fails)
    with pytest.raises(Boom, match="the first error"):
        main(tiny_args(tiny_root, tmp_path / "second"))


def read_only_prefix(folders: list) -> list[str]:
    """A command prefix under which `folders` (and what they hold) may not be written: mode 555 where
    that binds (not for root, who writes anyway), else read-only bind mounts in a mount namespace of
    the command's own. Skips where neither is possible."""
    import subprocess

    for f in folders:
        f.chmod(0o555)
    if not any(os.access(f, os.W_OK) for f in folders):
        return []
    for f in folders:
        f.chmod(0o755)
    mounts = " && ".join(f"mount --bind -o ro '{f}' '{f}'" for f in folders)
    prefix = ["unshare", "-m", "sh", "-c", f'{mounts} && exec "$@"', "sh"]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("root here, and no read-only mount can be made (unshare -m, mount --bind -o ro)")
    return prefix


@pytest.mark.slow
def test_an_out_that_may_not_be_written_is_one_line_before_the_data_is_read(tiny_root, trained, tmp_path):
    # A read-only folder (mode 555, a read-only mount) failed only at the TensorBoard log, after the
    # data scan and the model build, and a --resume there with a traceback from the event-file thread
    import subprocess

    ro, fin, empty = tmp_path / "ro", tmp_path / "ro" / "fin", tmp_path / "ro" / "empty"
    shutil.copytree(trained, fin)
    empty.mkdir()
    before = (fin / "checkpoint.pt").read_bytes()
    prefix = read_only_prefix([ro, fin, empty])
    resume = ["train", "--resume", "--out", str(fin), "--device", "cpu", "--workers", "0"]

    def train(argv):
        done = subprocess.run(
            [*prefix, sys.executable, "-m", "moco_fast", *argv], capture_output=True, text=True, timeout=300
        )
        return done.returncode, done.stderr.strip().splitlines()

    try:
        for argv, out in ((tiny_args(tiny_root, empty), empty), ([*resume, "--epochs", "2"], fin)):
            rc, err = train(argv)
            assert rc == 2 and len(err) == 1, err  # no "data: ..." line: nothing was read
            assert err[0] in (
                f"moco-fast train: error: --out {out}: cannot write in {out} ({why})"
                for why in ("Permission denied", "Read-only file system")
            ), err
        # a folder to be made in one that may not be written: mkdir's error, as early
        rc, err = train(tiny_args(tiny_root, ro / "new"))
        assert rc == 2 and len(err) == 1 and err[0].endswith(f": {ro / 'new'}"), err
        # a finished run writes nothing: --resume there still says so
        rc, err = train(resume)
        assert rc == 0, err
    finally:
        for f in (ro, fin, empty):
            f.chmod(0o755)
    assert (fin / "checkpoint.pt").read_bytes() == before and sorted(p.name for p in empty.iterdir()) == []


def resume_read_only(fin, ro):
    """`train --resume --final-knn` on the finished run `fin` in a subprocess, with `fin` and `ro`
    (the folder above it) not writable."""
    import subprocess

    prefix = read_only_prefix([ro, fin])
    argv = ["train", "--resume", "--out", str(fin), "--device", "cpu", "--workers", "0", "--final-knn"]
    try:
        return subprocess.run(
            [*prefix, sys.executable, "-m", "moco_fast", *argv], capture_output=True, text=True, timeout=300
        )
    finally:
        for f in (ro, fin):
            f.chmod(0o755)


@pytest.mark.slow
def test_a_finished_run_that_owes_its_summary_says_its_out_may_not_be_written(tiny_root, trained, tmp_path):
    # check_writable lets a finished run by (it "writes nothing"), but one whose final kNN was cut
    # short still writes summary.json: on a read-only --out that was a traceback from TensorBoard's
    # event-file thread after the data scan, not the one line
    ro = tmp_path / "ro"
    fin = ro / "fin"
    shutil.copytree(trained, fin)  # trained with --no-final-knn: no summary.json
    done = resume_read_only(fin, ro)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(err) == 1, err  # before the data scan: no "data: ..." line
    assert err[0] in (
        f"moco-fast train: error: --out {fin}: cannot write in {fin} ({why}): the finished run's final kNN "
        "writes summary.json there (--no-final-knn skips it)"
        for why in ("Permission denied", "Read-only file system")
    ), err
    assert sorted(p.name for p in fin.iterdir()) == sorted(p.name for p in trained.iterdir())


@pytest.mark.slow
def test_a_finished_run_on_data_without_an_eval_split_owes_nothing_in_a_read_only_out(tiny_root, tmp_path):
    # its final kNN has no eval split to run on: a folder that may not be written is no obstacle
    flat, ro = tmp_path / "flat", tmp_path / "ro"
    shutil.copytree(tiny_root / "train", flat)  # class folders only: no train/ and val/ or test/
    fin = ro / "fin"
    assert main(tiny_args(flat, fin)) == 0
    files = sorted(p.name for p in fin.iterdir())
    done = resume_read_only(fin, ro)
    assert done.returncode == 0 and "nothing to do" in done.stdout, done.stderr[-2000:]
    assert sorted(p.name for p in fin.iterdir()) == files


def synthetic_args(out, *flags):
    return [
        "train", "--loader", "synthetic", "--synthetic-steps", "1", "--arch", "resnet18", "--image-size", "16",
        "--batch-size", "8", "--bn-splits", "2", "--moco-k", "16", "--epochs", "1", "--device", "cpu",
        "--out", str(out), "--no-final-knn", *flags,
    ]  # fmt: skip


def test_the_divergence_advice_names_the_flag_that_stands_out(tmp_path, capsys):
    # --moco-t 1e-40 overflows the logits (l / T): the run diverged, and the message said "lower --lr"
    from moco_fast.config import build_config
    from moco_fast.divergence import Diverged, check_finite

    assert main(synthetic_args(tmp_path / "run", "--moco-t", "1e-40")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "diverged in epoch 1" in err[-1] and err[-1].endswith(
        "nothing was saved: raise --moco-t 1e-40 (usually 0.05-0.2)"
    ), err
    # each flag that stands far out is named with its value, before the --amp advice; "lower --lr" else
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.bias[1] = float("nan")
    for overrides, says in (
        ({"optim.lr": 0.2, "moco.t": 0.05}, "lower --lr, or use --amp off"),  # high and low, not far out
        ({"optim.lr": 1.0}, "lower --lr 1 (the cifar preset's is 0.03), or use --amp off"),
        ({"optim.lr": 1.0, "moco.t": 1e-3}, "raise --moco-t 0.001 (usually 0.05-0.2) and lower --lr 1 (the cifar preset's is 0.03), or use --amp off"),
    ):  # fmt: skip
        with pytest.raises(Diverged) as e:
            check_finite(net, torch.tensor(1.0), 3, torch.bfloat16, build_config("cifar", overrides))
        assert str(e.value).endswith(says), overrides


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


def killed_train(argv: list[str], kill: str) -> None:
    import subprocess

    code = f"import os, signal, sys\n{kill}\nfrom moco_fast.cli import main\nsys.exit(main({argv!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr


@pytest.mark.slow
def test_a_kill_while_a_restart_clears_the_old_run_leaves_a_folder_that_resumes(tiny_root, run, capsys):
    # clear_run took config.json with the rest, and the new one came later: a kill in between (seen
    # once in 8 SIGKILLs of a --resume restart) left an empty folder, and --resume needed the flags
    resume = ["train", "--resume", "--out", str(run)]  # device and workers too come from the run's config
    (run / "checkpoint.pt").unlink()  # stopped in its first epoch: --resume starts it over
    killed_train(resume, KILL_AFTER_THE_CLEAR)
    assert main(resume) == 0
    assert [r["epoch"] for r in rows(run)] == [1] and json.loads((run / "config.json").read_text())["moco"]["k"] == 16
    # --force with other settings: the old run's config.json stays until the new one replaces it
    killed_train([*tiny_args(tiny_root, run), "--force", "--moco-k", "32"], KILL_AFTER_THE_CLEAR)
    assert main(resume) == 0 and json.loads((run / "config.json").read_text())["moco"]["k"] == 16
    # a kill in the clear itself: the checkpoint goes last, so no rows past epoch 1 outlive it (a
    # folder that --resume refuses to start over)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 2, "loss": 1.0}) + "\n")
    killed_train([*tiny_args(tiny_root, run), "--force"], KILL_AT_THE_ROWS)
    capsys.readouterr()
    assert main([*resume, "--epochs", "2"]) == 0, capsys.readouterr().err
    assert [r["epoch"] for r in rows(run)] == [1, 2]
