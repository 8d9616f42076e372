"""What a run folder holds and how a run leaves it: another run's folder is not overwritten without
--force, a busy folder fails at once, a run that fails in its first epoch or diverges leaves the
folder as it was (with its last good checkpoint; the advice names the flag that stands out, and a
loss the fp16 scaler skipped warns), files that are not a run's or not a checkpoint are named,
written files follow the umask, the data's path is saved absolute."""

import json
import os
import stat
from functools import partial
from pathlib import Path

import pytest
import torch
from run_helpers import rows, tiny_args

from moco_fast import checkpoint as ckpt
from moco_fast.cli import main
from moco_fast.data import DataError


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


def test_a_tar_is_left_to_torch_load_only_when_it_holds_torch_legacy_files(tmp_path):
    import io
    import tarfile

    for first, why in (("sys_info", None), ("000000.jpg", "it is a tar archive, not torch's legacy format")):
        path = tmp_path / f"{first}.tar"
        with tarfile.open(path, "w") as tar:
            tar.addfile(tarfile.TarInfo(first), io.BytesIO())
        said = ckpt.not_a_checkpoint(path)
        assert said == why if why is None else said.startswith(why), said


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


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(tiny_root, run, capsys):
    (run / ".checkpoint.pt.4242.tmp").write_bytes(b"half")  # left by a run killed while saving
    (run / ".metrics.jsonl.host-4242.abcdefgh.tmp").write_text("{}\n")  # killed in --resume's rewrite
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
    # starts the run over with it; stopped before it wrote one (reading its data), the folder it
    # created goes, as README says
    import moco_fast.trainer

    stopped = tmp_path / "stopped"
    monkeypatch.setattr(moco_fast.trainer, "create_loader", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(tiny_args(tiny_root, stopped)) == 130
    monkeypatch.undo()
    assert not stopped.exists()
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
        check(net, float("inf"), 3, torch.float16)
    assert "epoch 3: the mean loss is inf" in caplog.text and "skipped" in caplog.text
    with torch.no_grad():
        net.bias[1] = float("nan")
    with pytest.raises(Diverged, match="1 tensors of the model hold NaN or inf \\(first: bias\\)") as e:
        check(net, 1.0, 3, None)
    assert str(e.value).endswith("lower --lr")  # fp32: no --amp to change
    # the advice names another --amp than the run's
    for dtype, says in (
        (torch.float16, "lower --lr, or use --amp bf16 or off"),
        (torch.bfloat16, "lower --lr, or use --amp off"),
    ):
        with pytest.raises(Diverged) as e:
            check(net, 1.0, 3, dtype)
        assert str(e.value).endswith(says)
    # BN statistics too: an fp16 forward that overflows poisons them although the scaler skips its step
    bn = torch.nn.BatchNorm1d(2)
    bn.running_var[0] = float("inf")
    with pytest.raises(Diverged, match="first: running_var"):
        check(bn, 1.0, 3, torch.float16)


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


def held_by_an_earlier_train(out: Path) -> tuple[Path, int]:
    """`out` made, with the holder file a killed sweep left there, and held as a moco-fast from before
    holders named themselves holds a folder (a flock on it, no holder file of its own): (`out`, the
    descriptor that holds it)."""
    import fcntl

    from moco_fast.folder_locks import HOLDER_NAME

    out.mkdir()
    (out / HOLDER_NAME).write_text("sweep")  # a killed sweep's
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return out, fd


def test_a_folder_whose_holder_names_none_is_said_to_be_a_train_or_sweeps(tmp_path, monkeypatch):
    # Where the holder of a folder names none, the line must not guess: an earlier moco-fast's train
    # holds it and writes no holder file, where a killed sweep left one ("sweep"); or another user's
    # file is there, which the holder cannot write. Either read as the holder, the line was wrong
    import errno

    import moco_fast.folder_locks as locks
    import moco_fast.run_folder as rf

    out, fd = held_by_an_earlier_train(tmp_path / "run")
    with pytest.raises(rf.RunFolderBusy, match="another moco-fast train or sweep is running there now"):
        with rf.hold_sweep_folder(out):
            pass
    os.close(fd)
    with rf.hold_run_folder(out) as held:  # this one writes its own over the killed sweep's
        assert held
        with pytest.raises(rf.RunFolderBusy, match="another moco-fast train is running there now"):
            with rf.hold_sweep_folder(out):
                pass
    (out / locks.HOLDER_NAME).write_text("sweep")  # the killed sweep was another user's
    real_open = os.open

    def others(path, flags, *args):
        if Path(path).name == locks.HOLDER_NAME and flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(locks.os, "open", others)
    with rf.hold_run_folder(out) as held:
        assert held and (out / locks.HOLDER_NAME).read_text() == "sweep"
        with pytest.raises(rf.RunFolderBusy, match="another moco-fast train or sweep is running there now"):
            with rf.hold_sweep_folder(out):
                pass
    assert os.listdir(out) == [locks.HOLDER_NAME]  # not this one's to remove


def test_two_commands_refused_at_once_never_name_a_killed_runs_holder(tmp_path, monkeypatch):
    # A refused command looked at the holder file under an exclusive lock of its own, and a second one
    # looking at that instant (torchrun's ranks, refused together) took that lock for the holder's and
    # read the file: a killed sweep's "sweep", where the holder (an earlier moco-fast's train) names none
    import moco_fast.folder_locks as locks
    import moco_fast.run_folder as rf

    out, fd = held_by_an_earlier_train(tmp_path / "run")
    real_flock, second = locks._try_flock, []

    def looked_at_once(opened, what, *args):
        got = real_flock(opened, what, *args)
        if what.name == locks.HOLDER_NAME and not second:
            second.append(None)  # once: the second look's own flock comes through here too
            second.append(str(rf.folder_busy(out, "writing")))  # while the first look holds what it took
        return got

    monkeypatch.setattr(locks, "_try_flock", looked_at_once)
    first = str(rf.folder_busy(out, "writing"))
    os.close(fd)
    line = f"{out}: another moco-fast train or sweep is writing there now; wait for it to end or choose another --out"
    assert [first, *second[1:]] == [line, line]


def test_a_command_stopped_while_it_names_the_holder_lets_go_of_the_folder(tmp_path, monkeypatch):
    # A stop (Ctrl-C, a SIGTERM's Terminated) while hold_folder named the holder came before its try:
    # the folder's descriptor stayed open, so a process that goes on (a notebook, a test) held the
    # new --out, empty, until it ended, and the next train there was told it was busy
    import moco_fast.folder_locks as locks
    import moco_fast.run_folder as rf

    def stopped(folder, command):
        raise KeyboardInterrupt

    out = tmp_path / "new" / "run"
    with monkeypatch.context() as patched:
        patched.setattr(locks, "_name_holder", stopped)
        with pytest.raises(KeyboardInterrupt), rf.hold_run_folder(out):
            pass
    assert not (tmp_path / "new").exists()  # made by the stopped command, empty: removed
    with rf.hold_run_folder(out) as held:
        assert held


def test_a_failed_command_removes_the_folders_an_out_through_dot_dot_made(ckpt, tmp_path, capsys):
    # --out a/../b made a/ on the way to b/; the removal walked b's parents (a/.., then a/: "a/.." is
    # no folder to remove) and left a/ behind. Each folder made goes, in the order opposite to its
    # making; one that was there (kept/) stays, and so does one that holds something
    (tmp_path / "kept").mkdir()
    missing = str(tmp_path / "missing-data")
    for out in ("a/../b", "kept/../c", "d/e/../../f", "kept/g/../h"):
        assert main(tiny_args(missing, tmp_path / out)) == 2  # train (folder_locks.hold_folder)
        argv = ["lincls", "--checkpoint", str(ckpt), "--data", missing, "--device", "cpu"]
        assert main([*argv, "--out", str(tmp_path / out / "r.json")]) == 2  # hold_lock_file
        assert "data folder not found" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_command_that_fails_before_writing_removes_the_out_parents_it_made(command, tmp_path, capsys):
    # --out a/b/run made a/ and b/ with run/: the failed command removed run/ alone and left them behind;
    # a folder that was there before stays
    kept = tmp_path / "kept"
    kept.mkdir()
    out, missing = kept / "a" / "b" / "run", str(tmp_path / "missing-data")
    if command == "train":
        argv = tiny_args(missing, out)
    else:
        argv = ["sweep", "--out", str(out), "--device", "cpu", "--", "--data", missing, "--epochs", "1"]
    assert main(argv) == 2
    assert "missing-data" in capsys.readouterr().err
    assert kept.is_dir() and not any(kept.iterdir())


def test_data_is_saved_as_an_absolute_path(tiny_root, monkeypatch, capsys):
    monkeypatch.chdir(tiny_root.parent)
    assert main(["train", "--data", tiny_root.name, "--print-config"]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert saved["data"]["data"] == str(tiny_root)  # a --resume from another folder finds the same data


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
            check_finite(net, 1.0, 3, torch.bfloat16, build_config("cifar", overrides))
        assert str(e.value).endswith(says), overrides


def test_a_new_folder_that_another_command_removed_before_the_open_is_made_again(tmp_path, monkeypatch):
    # Two commands whose --outs share one new folder: the other failed before writing and removed the
    # folder, empty, as its own, after this one's mkdir and before its open. The open of the lock
    # file (lincls, finetune, convert) or of the run folder itself (train, sweep) ended in a plain
    # "No such file or directory"
    import moco_fast.run_folder as rf

    new, real_open, removals = tmp_path / "new", os.open, []

    def open_after_a_removal(path, *args, **kw):
        if removals and new in (Path(path), *Path(path).parents):  # the open of the lock (not a write check's)
            removals.pop()
            for folder in [*sorted(new.rglob("*"), reverse=True), new]:  # the other's remove_empty
                folder.rmdir()
        return real_open(path, *args, **kw)

    monkeypatch.setattr(rf.os, "open", open_after_a_removal)
    for hold in (partial(rf.hold_output, new / "r.json", "lincls"), partial(rf.hold_run_folder, new / "run")):
        removals.append(1)
        with hold():
            assert not removals and new.is_dir()
        assert not new.exists()  # made by this command, left empty: removed when it ends


def test_a_lock_that_cannot_be_opened_removes_the_folders_made_for_it(tmp_path, monkeypatch):
    # The open of the lock file (lincls, finetune, convert) or of the run folder (train, sweep) failed
    # for another cause than a holder (a lock file this user may not read: EACCES), and the folders
    # made for it stayed behind. Those it made go; one that was there, and one holding a file, stay
    import errno

    import moco_fast.run_folder as rf

    kept, real_open = tmp_path / "kept", os.open
    (kept / "full").mkdir(parents=True)
    (kept / "full" / "notes.txt").write_text("a week of notes")

    def refused(path, *args, **kw):
        if Path(path).name in (".r.state.pt.lock", "run"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(rf.os, "open", refused)
    for hold in (
        partial(rf.hold_output, kept / "a" / "b" / "r.json", "lincls"),
        partial(rf.hold_run_folder, kept / "c" / "run"),
    ):
        with pytest.raises(PermissionError), hold():
            pass
    with pytest.raises(PermissionError), rf.hold_output(kept / "full" / "r.json", "lincls"):
        pass
    assert sorted(p.name for p in kept.iterdir()) == ["full"] and os.listdir(kept / "full") == ["notes.txt"]


def test_a_run_folder_that_its_holder_removed_before_the_flock_is_made_again(tmp_path, monkeypatch):
    # A second train opened the same new --out just before the first, failing, removed it (empty) and
    # let go of it: the second held a removed folder, and its config.json failed with "No such file
    # or directory". The holder removes it while still held, and the second holds the folder made again
    import moco_fast.folder_locks as locks
    import moco_fast.run_folder as rf

    new, real_flock, removals = tmp_path / "new", locks._try_flock, [1]

    def flock_after_a_removal(fd, what):
        if removals:
            removals.pop()
            for folder in (new / "run", new):  # the holder's remove_empty
                folder.rmdir()
        return real_flock(fd, what)

    monkeypatch.setattr(locks, "_try_flock", flock_after_a_removal)
    with rf.hold_run_folder(new / "run") as held:
        assert held and not removals and (new / "run").is_dir()
        (new / "run" / "config.json").write_text("{}")  # its first file


@pytest.mark.parametrize("hold", ["hold_run_folder", "hold_sweep_folder"])
def test_a_busy_folder_that_its_holder_made_after_this_look_stays(hold, tmp_path, monkeypatch):
    # Two trains (or sweeps) started at once into one new --out: the second looked for the folders to
    # make just before the first made and held it, found it busy, and removed it (empty: the first had
    # written nothing yet) as its own; the first's config.json then made a folder that no lock guarded
    import moco_fast.folder_locks as locks
    import moco_fast.run_folder as rf

    out = tmp_path / "new" / "run"
    looked = locks.missing_folders(out)  # the second's look, an instant before the first's mkdir
    with rf.hold_run_folder(out) as first:
        monkeypatch.setattr(locks, "missing_folders", lambda path: looked)
        with pytest.raises(rf.RunFolderBusy), getattr(rf, hold)(out) as second:
            rf.ensure_not_busy([second], out)
        assert first and out.is_dir()


def test_a_lock_file_that_is_a_link_leaves_the_file_it_names_as_it_was(tmp_path):
    # the holder wrote its command into the lock file through a link there (another user's, in a shared
    # folder), emptying the file it named. hold_lock_file refuses a link before it opens the file (the
    # test below); one put there after the open is not written through either
    from moco_fast.folder_locks import _write_holder

    notes = tmp_path / "notes.txt"
    notes.write_text("a week of notes")
    (tmp_path / ".r.state.pt.lock").symlink_to(notes)
    _write_holder(tmp_path / ".r.state.pt.lock", "lincls")
    assert notes.read_text() == "a week of notes"


@pytest.mark.parametrize("target", ["missing.txt", "notes.txt"])
def test_a_lock_file_that_is_a_link_is_refused_and_nothing_is_made_where_it_points(target, ckpt, tmp_path, capsys):
    # the open that takes the lock followed a link at the lock's name (another user's, in a shared
    # folder): one that pointed nowhere had lincls create an empty file at its target. Refused now, with
    # the link named, whether it points nowhere or at a file (left as it was)
    notes = tmp_path / "notes.txt"
    notes.write_text("a week of notes")
    lock = tmp_path / ".r.state.pt.lock"
    lock.symlink_to(tmp_path / target)
    argv = ["lincls", "--checkpoint", str(ckpt), "--data", str(tmp_path / "missing-data"), "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "r.json")]) == 2  # refused at the lock, before the data
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{lock} is a link" in err[0] and "remove the link" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock.name, "notes.txt"]
    assert notes.read_text() == "a week of notes" and lock.is_symlink()
