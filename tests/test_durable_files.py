"""Files after a kill -9 or a power loss: atomic writes and convert's output fsync their folder after
the rename (convert's output its files before it), a killed export's temporary file goes at the next
export (one of a writer still running stays: it holds its lock, which tells where its HOST-PID
cannot), and a metrics.jsonl row cut short is ended before the
next row, its readers skipping it with a warning; --resume rewrites metrics.jsonl atomically."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_export import save_untrained_checkpoint

from moco_fast import checkpoint as ckpt
from moco_fast.cli import main
from moco_fast.convert import ConvertConfig, convert
from moco_fast.convert_dst import names_path, sidecar_path
from moco_fast.convert_files import publish
from moco_fast.folder_locks import ended_here, owner_name, owner_of
from moco_fast.metrics import METRICS_NAME, MetricsWriter, read_rows

KILLED_WRITER = """
import sys, time
from moco_fast.checkpoint import atomic_write
def write(fh):
    fh.write(b"x" * 4096)
    fh.flush()
    print("writing", flush=True)
    time.sleep(600)  # killed here
atomic_write(sys.argv[1], write)
"""


def recorded_fsyncs(monkeypatch, seen: Callable[[], Any]) -> list[tuple[tuple[int, int], Any]]:
    """os.fsync recorded: each call's file (file_id) with what `seen()` returned then."""
    synced, real = [], os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        synced.append(((st.st_dev, st.st_ino), seen()))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def file_id(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_an_atomic_write_fsyncs_its_folder_after_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "out" / "result.json"
    synced = recorded_fsyncs(monkeypatch, path.exists)
    ckpt.atomic_write_text(path, "{}\n")
    assert (file_id(path.parent), True) in synced, synced  # the folder, once renamed into
    assert path.read_text() == "{}\n"


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP], ids=["EINVAL", "ENOTSUP"])
def test_an_atomic_write_on_a_file_system_that_cannot_fsync_files_writes_the_file(tmp_path, monkeypatch, code):
    # some FUSE mounts refuse fsync(2) of a file: atomic_write's own os.fsync failed every checkpoint
    # save there, where durable's helpers (convert's, the folder's) skip the refusal
    path = tmp_path / "result.json"
    path.write_text("old")
    real, refused = os.fsync, []

    def files_refused(fd):
        if os.path.isfile(f"/proc/self/fd/{fd}"):
            refused.append(fd)
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", files_refused)
    ckpt.atomic_write_text(path, "new")
    assert refused  # the temporary file's fsync was asked, and refused
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_an_atomic_write_whose_folder_fsync_fails_after_the_rename_raises_it_with_the_new_file_in_place(
    tmp_path, monkeypatch
):
    # as its docstring says: the rename is done, but its durability is not, and the caller is told so
    path = tmp_path / "result.json"
    path.write_text("old")
    real = os.fsync

    def failing(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError) as e:
        ckpt.atomic_write_text(path, "new")
    assert (e.value.errno, e.value.filename) == (errno.EIO, str(tmp_path))
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_an_export_whose_folder_fsync_fails_says_the_folder_and_that_the_file_was_written(
    tmp_path, monkeypatch, capsys
):
    # "Input/output error: FOLDER" alone read as an export that had failed, where it is in place; the
    # error stays (an EIO is a failing disk), its line says both
    path = tmp_path / "cifar.pt"
    save_untrained_checkpoint(path)
    out = tmp_path / "out" / "r18.pth"
    out.parent.mkdir()
    real = os.fsync

    def failing(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    capsys.readouterr()
    assert main(["export", str(path), "--format", "torchvision", "--output", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "moco-fast export: error: Input/output error flushing the folder to disk after r18.pth was written in "
        f"it: {out.parent} (the disk or the network file system failed to read or write it)"
    )
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_convert_fsyncs_its_output_before_publishing_and_dsts_folder_after(tmp_path, monkeypatch):
    # publish renamed the temporary output into place with no fsync of the folder: after a power loss
    # the folder could come back with the old output, or (--force) with neither; nor of the output's
    # bytes: it could come back empty or short under its final name
    dst, tmp = tmp_path / "out.beton", tmp_path / ".out.beton.partial"
    dst.write_text("old")
    tmp.write_text("new")
    synced = recorded_fsyncs(monkeypatch, lambda: (dst.read_text(), len(list(tmp_path.glob(".out.beton.old-*")))))
    publish(tmp, dst, force=True)
    # the new output's bytes while the old output is in place still; the folder with the new output
    # in place, the old one not yet gone
    assert synced == [(file_id(dst), ("old", 0)), (file_id(tmp_path), ("new", 1))], synced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.beton"]


def test_publish_fsyncs_each_file_and_folder_of_a_temporary_folder_before_the_rename(tmp_path, monkeypatch):
    # a shard set renamed into place could come back from a power loss with its shards empty or short
    dst, tmp = tmp_path / "wds", tmp_path / ".wds.partial"
    (tmp / "sub").mkdir(parents=True)
    for name in ("shard-000000.tar", "meta.json", "sub/x"):
        (tmp / name).write_text(name)
    (tmp_path / "elsewhere").write_text("not the output's")
    (tmp / "link").symlink_to(tmp_path / "elsewhere")  # no file of the output: not followed
    synced = recorded_fsyncs(monkeypatch, dst.exists)
    publish(tmp, dst, force=False)
    inside = [dst, dst / "sub", dst / "shard-000000.tar", dst / "meta.json", dst / "sub" / "x"]
    assert sorted(synced[:-1]) == sorted((file_id(p), False) for p in inside), synced  # before the rename
    assert synced[-1] == (file_id(tmp_path), True)  # the rename made durable


def test_a_folder_of_the_output_that_cannot_be_listed_stops_the_publish(tmp_path, monkeypatch):
    # os.walk skips a folder it cannot list: its files went unsynced, and the output was put in place
    dst, tmp = tmp_path / "wds", tmp_path / ".wds.partial"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "sub" / "shard-000000.tar").write_text("x")
    real = os.scandir

    def failing(path="."):
        if os.fspath(path) == str(tmp / "sub"):
            raise OSError(errno.EIO, "Input/output error", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", failing)
    with pytest.raises(OSError) as e:
        publish(tmp, dst, force=False)
    assert (e.value.errno, e.value.filename) == (errno.EIO, str(tmp / "sub"))
    assert not dst.exists() and tmp.is_dir()


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_each_file_convert_writes_is_fsynced_before_it_is_renamed_into_place(
    fresh_root, tmp_path, monkeypatch, caplog, fmt
):
    # and a line says so before the first fsync: a 140 GB .beton's dirty pages took minutes on a slow
    # disk without a word, after the writing bar had ended (said once: not for the small sidecars)
    dst = tmp_path / ("out.beton" if fmt == "ffcv" else "wds")
    outputs = [dst, sidecar_path(dst), names_path(dst)] if fmt == "ffcv" else [dst]
    flushing = f"flushing {dst} to disk (fsync) before moving it into place"

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "INFO" and "flushing" in r.getMessage()]

    synced = recorded_fsyncs(monkeypatch, lambda: (tuple(p.exists() for p in outputs), lines()))
    with caplog.at_level(logging.INFO, logger="moco_fast"):
        convert(ConvertConfig(str(fresh_root), str(dst), format=fmt, workers=1))
    for i, out in enumerate(outputs):  # each while it and the ones after it are not in place yet
        there = tuple(j < i for j in range(len(outputs)))
        files = [out, *out.rglob("*")] if out.is_dir() else [out]
        assert len(files) > 1 or fmt == "ffcv"
        assert all((file_id(p), (there, [flushing])) in synced for p in files), (out, synced)
    assert lines() == [flushing]


def test_a_shard_that_the_disk_refuses_at_its_fsync_is_dsts_error(fresh_root, tmp_path, monkeypatch, capsys):
    # a full disk met by the write-back of a shard (delayed allocation): DST named, as for a write
    dst = tmp_path / "out" / "wds"
    real = os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tar"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", full)
    argv = ["convert", str(fresh_root), str(dst), "--format", "wds", "--workers", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"moco-fast convert: error: No space left on device: {dst}"), err
    assert not dst.parent.exists()  # no output, no temporary, and the folder the convert made is gone


def test_a_converts_folder_fsync_that_fails_after_the_rename_says_that_dst_was_written(
    fresh_root, tmp_path, monkeypatch, capsys
):
    # publish's fsync of DST's folder, after the rename put DST in place: "Input/output error: FOLDER"
    # alone read as a convert that had failed (atomic_write's and pack_folder's say both)
    dst = tmp_path / "out" / "wds"
    real = os.fsync

    def failing(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == str(dst.parent):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    assert main(["convert", str(fresh_root), str(dst), "--format", "wds", "--workers", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"moco-fast convert: error: Input/output error flushing the folder to disk after wds was written in it: "
        f"{dst.parent} (the disk or the network file system failed to read or write it)"
    )
    assert [p.name for p in dst.parent.iterdir()] == ["wds"]  # in place, no temporary beside it


@pytest.mark.parametrize(
    "name, prefix, suffix, mktemp, owner",
    [
        ("node1.cluster.org-1234", "", "", False, ("node1.cluster.org", 1234)),  # a host name with dots
        ("gpu-node-07-99", "", "", False, ("gpu-node-07", 99)),  # and with dashes: the last one ends it
        (".x.beton.partial-my-host.lab-5", ".x.beton.partial-", "", False, ("my-host.lab", 5)),  # convert's
        (".c.pt.gpu-1.example.com-4242.ab_9xyz.tmp", ".c.pt.", ".tmp", True, ("gpu-1.example.com", 4242)),
        ("moco-fast-workers-host-1-77.k2j_3abc", "moco-fast-workers-", "", True, ("host-1", 77)),  # launch's
        ("host-12a", "", "", False, None),  # a PID that is not digits
        ("host-", "", "", False, None),
        ("host-\u00b2", "", "", False, None),  # "²".isdigit(), which int() refuses
        ("host-\u0661\u0662", "", "", False, None),  # Arabic-Indic digits, which int() reads as 12
        ("host1234", "", "", False, None),  # no separator
        ("-1234", "", "", False, None),  # no host
        ("host-12", "", "", True, None),  # no mktemp characters
        (".c.pt.host-12.abcdefgh.tmp", ".d.pt.", ".tmp", True, None),  # another file's prefix
        (".c.pt.host-12.abcdefgh.tmp", ".c.pt.", ".json", True, None),  # another suffix
        (".a.tmp", ".a.", ".tmp", False, None),  # prefix and suffix overlap: nothing between them
    ],
)
def test_owner_of_reads_the_host_pid_of_a_name_and_refuses_what_is_no_owner_name(name, prefix, suffix, mktemp, owner):
    assert owner_of(name, prefix, suffix, mktemp=mktemp) == owner


def test_owner_of_reads_the_names_owner_name_writes(tmp_path):
    me = (socket.gethostname(), os.getpid())
    assert owner_of(f".out.partial-{owner_name()}", ".out.partial-") == me
    fd, tmp = tempfile.mkstemp(prefix=f".out.json.{owner_name()}.", suffix=".tmp", dir=tmp_path)  # atomic_write's
    os.close(fd)
    assert owner_of(Path(tmp).name, ".out.json.", ".tmp", mktemp=True) == me
    folder = tempfile.mkdtemp(prefix=f"moco-fast-agent-{owner_name()}.", dir=tmp_path)  # the launcher's
    assert owner_of(Path(folder).name, "moco-fast-agent-", mktemp=True) == me
    assert not ended_here(me)  # this process
    assert not ended_here(None)  # a name that is no owner name (owner_of's None): what it names stays


def test_a_killed_exports_temporary_file_goes_at_the_next_export_a_running_writers_stays(tmp_path):
    path = tmp_path / "cifar.pt"
    save_untrained_checkpoint(path)
    out = tmp_path / "r18.pth"
    killed = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline().strip() == "writing"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    left = list(tmp_path.glob(f".{out.name}.*.tmp"))
    assert len(left) == 1 and f"{socket.gethostname()}-{killed.pid}." in left[0].name, left
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = tmp_path / f".{out.name}.{socket.gethostname()}-{running.pid}.abcdefgh.tmp"  # being written
        elsewhere = tmp_path / f".{out.name}.elsewhere-{killed.pid}.abcdefgh.tmp"  # maybe running there
        for p in (live, elsewhere):
            p.write_bytes(b"x")
        assert main(["export", str(path), "--format", "torchvision", "--output", str(out)]) == 0
        assert not left[0].exists()
        assert live.exists() and elsewhere.exists()
    finally:
        running.kill()
        running.wait()
    assert sorted(p.name for p in tmp_path.glob(f".{out.name}.*")) == sorted([live.name, elsewhere.name])


def test_a_temporary_file_whose_writer_holds_its_lock_stays_though_its_host_pid_has_ended(tmp_path):
    # containers that share the host's name but not its PIDs see each other's live writers as ended by
    # HOST-PID: an export there removed a concurrent export's temporary file, whose rename then failed
    out = tmp_path / "r18.pth"
    with written_under_an_ended_pid(out) as seen:
        ckpt.remove_ended_writers_temporaries(out)
        assert seen.exists()
    ckpt.remove_ended_writers_temporaries(out)  # its lock gone with its writer
    assert not seen.exists()


@contextlib.contextmanager
def written_under_an_ended_pid(out):
    """The temporary file of `out` of a real atomic_write, its writer alive, renamed to a HOST-PID that
    has ended (as another PID namespace sees it); the writer killed on the way out."""
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        (written,) = out.parent.glob(f".{out.name}.*.tmp")
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        seen = out.parent / f".{out.name}.{socket.gethostname()}-{gone.pid}.abcdefgh.tmp"
        written.rename(seen)  # the writer's lock goes with the file
        yield seen
    finally:
        writer.kill()
        writer.wait()


def test_a_live_writers_temporary_file_stays_where_flock_is_taken_as_fcntl_locks_nfs(tmp_path, monkeypatch):
    # the NFS client takes a flock as an fcntl lock of the whole file, whose exclusive one needs a
    # descriptor opened for writing (EBADF else): a remover that opened the file only to read it took
    # that for no flock at all and removed a live writer's file by its HOST-PID
    real = fcntl.flock

    def nfs_flock(fd, how):
        if how & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        real(fd, how)

    out = tmp_path / "r18.pth"
    with written_under_an_ended_pid(out) as seen:
        monkeypatch.setattr(fcntl, "flock", nfs_flock)
        ckpt.remove_ended_writers_temporaries(out)
        assert seen.exists()
    ckpt.remove_ended_writers_temporaries(out)
    assert not seen.exists()


def test_an_atomic_write_locks_its_temporary_file_before_the_first_byte_until_after_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    locked, replace = [], os.replace

    def lock_taken(tmp):
        fd = os.open(tmp, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def write(fh):
        (tmp,) = tmp_path.glob("*.tmp")
        locked.append(("write", tmp.stat().st_size, lock_taken(tmp)))
        fh.write(b"{}")

    def renamed(src, dst):
        locked.append(("rename", lock_taken(src)))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", renamed)
    ckpt.atomic_write(path, write)
    assert locked == [("write", 0, True), ("rename", True)]
    assert path.read_bytes() == b"{}"


def test_an_atomic_writes_temporary_file_removed_before_it_was_locked_is_made_again(tmp_path, monkeypatch):
    # a remover in another PID namespace took this writer for ended between mkstemp and the lock
    path, mkstemp, made = tmp_path / "result.json", tempfile.mkstemp, []

    def removed_at_once(**kwargs):
        fd, tmp = mkstemp(**kwargs)
        made.append(tmp)
        if len(made) == 1:
            os.unlink(tmp)
        return fd, tmp

    monkeypatch.setattr(tempfile, "mkstemp", removed_at_once)
    ckpt.atomic_write_text(path, "{}\n")
    assert path.read_text() == "{}\n" and len(made) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("no_lock", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_an_atomic_write_on_a_file_system_without_flock_writes_and_its_ended_writers_temporary_goes(
    tmp_path, monkeypatch, no_lock
):
    # every checkpoint save goes through atomic_write: where flock fails, the write goes on unguarded
    # and a remover falls back to HOST-PID alone, as before writers locked their temporary files
    def flock(fd, how):
        raise OSError(no_lock, os.strerror(no_lock))

    monkeypatch.setattr(fcntl, "flock", flock)
    path = tmp_path / "result.json"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    left = tmp_path / f".{path.name}.{socket.gethostname()}-{gone.pid}.abcdefgh.tmp"
    left.write_bytes(b"x")
    ckpt.atomic_write_text(path, "{}\n")
    ckpt.remove_ended_writers_temporaries(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert path.read_text() == "{}\n"


def test_a_stop_while_an_atomic_write_waits_for_its_lock_leaves_no_temporary_file_and_no_descriptor(
    tmp_path, monkeypatch
):
    # Ctrl-C (or a SIGTERM raised as Terminated) during the wait for a remover's look
    def flock(fd, how):
        raise KeyboardInterrupt

    monkeypatch.setattr(fcntl, "flock", flock)
    fds = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_write_text(tmp_path / "result.json", "{}\n")
    assert list(tmp_path.iterdir()) == []
    assert sorted(os.listdir("/proc/self/fd")) == fds


def test_a_long_names_atomic_write_fits_name_max_and_its_ended_writers_temporary_goes(tmp_path):
    # HOST-PID in the temporary name took a name that fitted (240 bytes) past NAME_MAX: ENAMETOOLONG
    path = tmp_path / ("x" + "\u00e9" * 117 + ".json")  # 240 bytes, the name cut within no character
    seen = []
    ckpt.atomic_write(path, lambda fh: seen.extend(p.name for p in tmp_path.glob("*.tmp")))
    assert path.read_bytes() == b"" and len(seen) == 1, seen
    ended = subprocess.Popen(["true"])
    ended.wait()
    left = tmp_path / seen[0].replace(f"-{os.getpid()}.", f"-{ended.pid}.")  # its writer killed
    left.write_bytes(b"x")
    ckpt.remove_ended_writers_temporaries(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_row_cut_short_is_ended_before_the_next_and_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / METRICS_NAME
    path.write_text(json.dumps({"epoch": 0, "loss": 9.0}) + '\n{"epoch": 1, "lo')  # a power loss in row 2
    writer = MetricsWriter(tmp_path)
    writer.write({"epoch": 1, "loss": 8.0})
    writer.write({"epoch": 2, "loss": 7.0})
    writer.close()
    assert [r["epoch"] for r in read_rows(tmp_path)] == [0, 1, 2]
    assert path.read_text().splitlines()[1] == '{"epoch": 1, "lo'  # one line, which no row joined
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f'{path}:2: not a row (cut short by a crash?), skipped: \'{{"epoch": 1, "lo\''], warned
    read_rows(tmp_path)  # read again (a process reads it more than once): the line is said once
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
    writer = MetricsWriter(tmp_path)
    writer.keep_epochs(1)  # a resume from epoch 1: the torn line goes with the later row
    writer.close()
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [0, 1]


def test_a_torn_row_is_said_by_rank_0_alone(tmp_path, monkeypatch, caplog):
    # every rank reads metrics.jsonl (the CLI's --resume, the run folder's checks), and each warned of
    # the torn line: said N times by N torchrun workers
    from moco_fast import distributed as dist_utils

    path = tmp_path / METRICS_NAME
    path.write_text(json.dumps({"epoch": 0}) + '\n{"epoch": 1, "lo')
    monkeypatch.setenv("RANK", "1")  # a torchrun worker before its process group is made
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert [r["epoch"] for r in read_rows(tmp_path)] == [0]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist_utils, "rank", lambda: 1)  # a group's rank 1, RANK aside (a library's group)
    assert [r["epoch"] for r in read_rows(tmp_path)] == [0]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    monkeypatch.setattr(dist_utils, "rank", lambda: 0)  # rank 0 says it
    read_rows(tmp_path)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f'{path}:2: not a row (cut short by a crash?), skipped: \'{{"epoch": 1, "lo\''
    ]


def test_a_torn_row_is_said_by_one_process_whose_rank_starts_no_group(tmp_path, monkeypatch, caplog):
    # a stray RANK=1 without WORLD_SIZE (a shell's, a scheduler's) joins no group (join.describes_group):
    # the run is one process, which said nothing of the torn line
    path = tmp_path / METRICS_NAME
    path.write_text(json.dumps({"epoch": 0}) + '\n{"epoch": 1, "lo')
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert [r["epoch"] for r in read_rows(tmp_path)] == [0]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f'{path}:2: not a row (cut short by a crash?), skipped: \'{{"epoch": 1, "lo\''
    ]


def test_a_resumes_dropped_rows_count_rows_alone(tmp_path, caplog):
    # the count took the torn and empty lines for rows: "dropped 4 rows after epoch 1" of 2 rows
    path = tmp_path / METRICS_NAME
    rows = [json.dumps({"epoch": e}) for e in (0, 1, 2, 3)]
    path.write_text("\n".join([*rows[:2], "", *rows[2:], '{"epoch": 4, "lo']))
    writer = MetricsWriter(tmp_path)
    with caplog.at_level("INFO", logger="moco_fast"):
        writer.keep_epochs(1)
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("metrics.jsonl: dropped")]
        assert said == ["metrics.jsonl: dropped 2 rows after epoch 1 (the checkpoint resumed)"], said
        assert path.read_text() == "".join(row + "\n" for row in rows[:2])
        path.write_text(rows[0] + "\n\n" + rows[1] + "\n" + '{"epoch": 2, "lo')
        caplog.clear()
        writer.keep_epochs(1)  # no row dropped: not "dropped 2 rows"
    writer.close()
    assert not [r for r in caplog.records if r.getMessage().startswith("metrics.jsonl: dropped")]
    assert path.read_text() == "".join(row + "\n" for row in rows[:2])


def test_a_resume_that_cannot_rewrite_metrics_jsonl_leaves_its_rows(tmp_path, monkeypatch):
    path = tmp_path / METRICS_NAME
    text = "".join(json.dumps({"epoch": e, "loss": 9.0 - e}) + "\n" for e in (1, 2, 3))
    path.write_text(text)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the disk refuses the rewrite's data
    writer = MetricsWriter(tmp_path)
    with pytest.raises(OSError, match="No space left"):
        writer.keep_epochs(1)  # a resume from epoch 1 drops rows 2 and 3
    writer.close()
    assert path.read_text() == text  # not half rewritten


def test_an_ended_writers_temporary_file_that_may_not_be_removed_leaves_the_export_to_go_on(
    tmp_path, monkeypatch, caplog
):
    # another user's, in a sticky folder (/tmp): its unlink's PermissionError stopped the export
    path = tmp_path / "cifar.pt"
    save_untrained_checkpoint(path)
    out = tmp_path / "r18.pth"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    left = tmp_path / f".{out.name}.{socket.gethostname()}-{gone.pid}.abcdefgh.tmp"
    left.write_bytes(b"x")
    unlink = Path.unlink

    def refused(self, missing_ok=False):
        if self == left:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    assert main(["export", str(path), "--format", "torchvision", "--output", str(out)]) == 0
    assert out.is_file() and left.exists()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [
        f"could not remove {left}, left by a write that was stopped: [Errno 1] Operation not permitted: '{left}'"
    ]


def test_a_killed_classifier_saves_temporary_goes_though_its_long_name_was_cut(tmp_path):
    # atomic_write cuts a long NAME in its temporary's name (temp_prefix): lincls's and finetune's removal
    # of a killed save's temporary (hundreds of MB) globbed the whole name and missed it
    from moco_fast.classifier_epochs import remove_partial_saves, state_path

    out = tmp_path / ("lincls-" + "x" * 200 + ".json")
    left = tmp_path / f"{ckpt.temp_prefix(state_path(out))}host-4242.abcdefgh.tmp"
    left.write_bytes(b"half")
    assert len(left.name.encode()) <= ckpt.NAME_MAX and state_path(out).name not in left.name  # cut
    remove_partial_saves(out)
    assert not left.exists()


def test_the_rows_a_checkpoint_covers_are_on_disk_before_it(tmp_path, monkeypatch):
    # metrics.jsonl's rows were appended without an fsync and the checkpoint after them fsynced: a power
    # loss then kept the checkpoint and lost the rows, which a resume from it never writes again
    out = tmp_path / "run"
    metrics = out / METRICS_NAME

    def rows_on_disk() -> int:  # at an fsync of metrics.jsonl: the rows it makes durable
        return len(read_rows(out)) if metrics.is_file() else 0

    synced = recorded_fsyncs(monkeypatch, rows_on_disk)
    saves, save_atomic = [], ckpt.save_atomic

    def save(state, path):  # each save: the rows written before it, and how many fsyncs came before
        saves.append((len(read_rows(out)), len(synced)))
        save_atomic(state, path)

    monkeypatch.setattr(ckpt, "save_atomic", save)
    argv = ["train", "--loader", "synthetic", "--synthetic-steps", "1", "--image-size", "16", "--preset", "cifar"]
    argv += ["--arch", "resnet18", "--stem", "imagenet", "--moco-k", "16", "--bn-splits", "2", "--device", "cpu"]
    argv += ["--batch-size", "8", "--workers", "0", "--no-final-knn", "--epochs", "3", "--out", str(out)]
    assert main(argv) == 0
    assert [rows for rows, _ in saves] == [0, 1, 2], saves  # a save at each epoch's end
    for rows, before in saves[1:]:
        durable = [n for fid, n in synced[:before] if metrics.is_file() and fid == file_id(metrics)]
        assert durable and durable[-1] == rows, (rows, synced[:before])
