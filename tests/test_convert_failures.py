"""`moco-fast convert` that fails: no half-written output under the final name, the temporaries and
sidecars of a killed convert removed and an output it moved aside put back, a writer worker that
dies or a SIGUSR1 ends it, and a disk's refusal or an I/O error is one line naming src or dst."""

import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from convert_helpers import no_partials

from moco_fast import convert_wds
from moco_fast.cli import main
from moco_fast.convert import ConvertConfig, convert


def test_failure_leaves_no_partial_output(bad_root, tmp_path, monkeypatch):
    dst = tmp_path / "wds"
    convert(ConvertConfig(str(bad_root), str(dst), format="wds", workers=1))
    before = (dst / "meta.json").read_text()
    calls = []

    def dying(job):
        calls.append(job)
        if len(calls) > 5:
            raise RuntimeError("disk on fire")
        return b"\xff\xd8fake"

    monkeypatch.setattr(convert_wds, "encode_task", dying)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(ConvertConfig(str(bad_root), str(dst), format="wds", workers=1, force=True))
    assert (dst / "meta.json").read_text() == before  # the old output is intact
    assert no_partials(tmp_path)


def test_temporaries_of_a_killed_convert_are_removed(bad_root, tmp_path):
    dst = tmp_path / "wds"
    dead = _dead_pid()
    host = socket.gethostname()
    stale = tmp_path / f".wds.partial-{host}-{dead}"
    stale.mkdir()
    (stale / "shard-000000.tar").write_bytes(b"half")
    live = tmp_path / f".wds.partial-{host}-{os.getppid()}"  # a convert still running: not touched
    live.write_text("busy")
    convert(ConvertConfig(str(bad_root), str(dst), format="wds", workers=1))
    assert not stale.exists() and live.exists()
    # the old output of a convert killed after it published the new one: removed
    aside = tmp_path / f".wds.old-{host}-{dead}"
    aside.mkdir()
    convert(ConvertConfig(str(bad_root), str(dst), format="wds", workers=1, force=True))
    assert not aside.exists()


def test_the_beton_sidecars_of_a_killed_convert_are_removed(tmp_path):
    from moco_fast.convert_files import tidy_after_a_stopped_convert

    owner = f"{socket.gethostname()}-{_dead_pid()}"
    left = [tmp_path / f".x.beton{side}.partial-{owner}" for side in ("", ".json", ".files.txt")]
    for p in left:
        p.write_text("half")
    tidy_after_a_stopped_convert(tmp_path / "x.beton")
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


KILLED_WORKER = """
import os, signal, sys
from moco_fast import convert_beton as conv
real = conv.BetonSource.__getitem__
def dies(self, i):
    if os.getpid() != self.parent and i == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does
    return real(self, i)
conv.BetonSource.__getitem__ = dies
sys.exit(conv.__name__ and __import__("moco_fast.cli").cli.main(sys.argv[1:]))
"""


KILLED_LATE = """
import os, signal, sys, time
import ffcv.writer as fw
real = fw.worker_job_indexed_dataset
def dies_late(input_queue, metadata_sm, metadata_type, fields, allocator, done_number, allocations_queue, *rest):
    class Late:
        def put(self, content):  # the samples are counted: the parent now waits in allocations_queue.get()
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
    args = (input_queue, metadata_sm, metadata_type, fields, allocator, done_number, Late(), *rest)
    return real(*args)
fw.worker_job_indexed_dataset = dies_late
sys.exit(__import__("moco_fast.cli").cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("script", [KILLED_WORKER, KILLED_LATE], ids=["while-writing", "after-the-last-sample"])
def test_a_writer_worker_that_dies_ends_the_convert_instead_of_hanging(script, bad_root, tmp_path):
    # FFCV's writer polls a counter of written samples until it reaches the total: a worker killed
    # mid-way left it waiting forever. The convert must end with one line naming the worker.
    dst = tmp_path / "out" / "x.beton"
    argv = ["convert", str(bad_root), str(dst), "--workers", "2"]
    p = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, p.stderr[-2000:]
    err = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and "writer worker (pid" in err[0] and "signal SIGKILL" in err[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "leaked shared_memory" not in p.stderr
    assert not dst.parent.exists()  # no output, no temporary, and the folder the convert made is gone


SIGUSR1_FROM_OUTSIDE = """
import os, signal, sys, time
from moco_fast import convert_beton as conv
real = conv.BetonSource.__getitem__
def signals(self, i):
    if os.getpid() != self.parent and i == 3:
        if sys.argv[1] == "group":
            os.killpg(0, signal.SIGUSR1)  # as SLURM's --signal: the writer workers get it too
        else:
            os.kill(self.parent, signal.SIGUSR1)
        time.sleep(5)
    return real(self, i)
conv.BetonSource.__getitem__ = signals
sys.exit(__import__("moco_fast.cli").cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("to", ["parent", "group"])
def test_a_sigusr1_from_outside_ends_an_ffcv_convert_as_sigterm_does(to, bad_root, tmp_path):
    # The writer's watch wakes the main thread with SIGUSR1 when a worker dies (see the test above); a
    # SIGUSR1 from outside (SLURM's warning before a time limit) is not a worker's death: it ends the
    # convert as SIGTERM does, not as an error ("moco-fast convert: error: stopped by SIGUSR1", exit 2)
    import signal

    dst = tmp_path / "out" / "x.beton"
    argv = [to, "convert", str(bad_root), str(dst), "--workers", "2"]
    p = subprocess.run(
        [sys.executable, "-c", SIGUSR1_FROM_OUTSIDE, *argv],
        capture_output=True,
        text=True,
        timeout=180,
        start_new_session=True,  # its own process group
    )
    assert p.returncode == 128 + signal.SIGUSR1, p.stderr[-2000:]
    said = [line for line in p.stderr.splitlines() if "SIGUSR1" in line]
    assert len(said) == 1 and said[0].endswith("stopped by SIGUSR1"), p.stderr[-2000:]  # after FFCV's bar
    assert "Traceback" not in p.stderr and "leaked shared_memory" not in p.stderr
    assert not dst.parent.exists()  # no output, no temporary, and the folder the convert made is gone


ACTED_ON_LATE = """
import os, signal, sys, time
from pathlib import Path
import ffcv.writer as fw
from moco_fast import convert_beton as conv
SENT, USR1 = Path(sys.argv[1]), {signal.SIGUSR1}
real_get, real_sleep = conv.BetonSource.__getitem__, fw.sleep
def signals(self, i):
    if os.getpid() != self.parent and i == 3 and not SENT.exists():
        SENT.touch()
        os.killpg(0, signal.SIGUSR1)  # as SLURM's --signal: every process of the job
        signal.pthread_sigmask(signal.SIG_UNBLOCK, USR1)  # this worker gets its copy now, and ends
    return real_get(self, i)
def late(seconds):  # FFCV's wait for its workers: the main thread gets its copy after the watch's ticks
    if SENT.exists() and signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, ()):
        time.sleep(1.5)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, USR1)
    real_sleep(seconds)
conv.BetonSource.__getitem__, fw.sleep = signals, late
signal.pthread_sigmask(signal.SIG_BLOCK, USR1)  # as are the threads and workers started from here
sys.exit(__import__("moco_fast.cli").cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_sigusr1_to_the_group_is_a_stop_also_where_the_main_thread_acts_on_it_late(bad_root, tmp_path):
    # The group's SIGUSR1 ends a writer worker too (the CLI's handler, in a forked child: the default
    # action). On a loaded machine the watch's tick could see that worker's end before the main
    # thread ran its own handler, which then found the watch's error: "writer worker ended with
    # signal SIGUSR1 (out of memory? ...)", exit 2, for a stop. Here the main thread acts 1.5 s late.
    import signal

    dst = tmp_path / "out" / "x.beton"
    argv = [str(tmp_path / "sent"), "convert", str(bad_root), str(dst), "--workers", "2"]
    p = subprocess.run([sys.executable, "-c", ACTED_ON_LATE, *argv], capture_output=True, text=True, timeout=180,
                       start_new_session=True)  # fmt: skip
    assert p.returncode == 128 + signal.SIGUSR1, p.stderr[-2000:]
    assert p.stderr.rstrip().endswith("stopped by SIGUSR1") and "error:" not in p.stderr, p.stderr[-2000:]
    assert not dst.parent.exists()  # no output, no temporary, and the folder the convert made is gone


def test_an_output_moved_aside_by_a_killed_convert_is_put_back(bad_root, tmp_path):
    # killed between moving the old output aside and publishing the new one: the old one is the only
    # copy there is, and the next convert puts it back rather than deleting it
    dst = tmp_path / "out" / "wds"
    convert(ConvertConfig(str(bad_root), str(dst), format="wds", workers=1))
    before = (dst / "meta.json").read_text()
    aside = dst.with_name(f".wds.old-{socket.gethostname()}-{_dead_pid()}")
    dst.rename(aside)
    other_host = dst.with_name(f".wds.partial-elsewhere-{_dead_pid()}")  # maybe running there: kept
    other_host.mkdir()
    with pytest.raises(FileExistsError):  # put back: an existing DST again
        convert(ConvertConfig(str(bad_root), str(dst), format="wds", workers=1))
    assert (dst / "meta.json").read_text() == before and not aside.exists() and other_host.exists()


FILE_SIZE_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # `ulimit -f 4`: writes past it fail with EFBIG
sys.exit(__import__("moco_fast.cli").cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_a_write_the_disk_refuses_is_one_line_naming_the_output(fmt, bad_root, tmp_path):
    # A full disk or a file-size limit met while the output was written: wds said only "No space left
    # on device" (no path) and warned of an unclosed shard; FFCV's writer worker printed its traceback
    # and the convert blamed memory ("out of memory? try fewer --workers").
    dst = tmp_path / "out" / f"x.{fmt}"
    argv = ["convert", str(bad_root), str(dst), "--format", fmt, "--workers", "2", "--shard-size", "4"]
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    p = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, *argv], capture_output=True, text=True, timeout=180, env=env
    )
    assert p.returncode == 2, p.stderr[-2000:]
    err = [line for line in p.stderr.splitlines() if "error:" in line]
    # (FFCV's progress bar may end without a newline before the error)
    assert len(err) == 1 and err[0].endswith(f"moco-fast convert: error: File too large: {dst}"), p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "ResourceWarning" not in p.stderr, p.stderr[-2000:]
    assert not dst.parent.exists()  # no output, no temporary, and the folder the convert made is gone


def test_an_error_without_a_path_is_not_blamed_on_dst(bad_root, tmp_path, monkeypatch, capsys):
    # An OSError without a path was reported as DST's whatever raised it. A container whose /dev/shm
    # may not be written refuses the semaphores of the worker pool (sem_open: EACCES, no path) before
    # any output is written: that was "Permission denied: DST", for a DST that can be written.
    import multiprocessing.synchronize

    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(multiprocessing.synchronize.SemLock, "__init__", refused)
    dst = tmp_path / "out"
    assert main(["convert", str(bad_root), str(dst), "--format", "wds", "--workers", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and err[0].endswith("moco-fast convert: error: Permission denied"), err
    assert not dst.exists() and no_partials(tmp_path)


def test_an_io_error_without_a_path_is_one_line_naming_src_and_dst(bad_root, tmp_path, monkeypatch, capsys):
    # EIO (a failing disk, a network file system gone) without a path was a bug's traceback. A write of
    # the output's names DST; elsewhere the line names what convert reads and writes.
    from moco_fast import convert as convert_module

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    dst = tmp_path / "out"
    monkeypatch.setattr(convert_wds.ShardWriter, "add", failing)  # a write to an open shard
    assert main(["convert", str(bad_root), str(dst), "--format", "wds", "--workers", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert err == [
        f"moco-fast convert: error: Input/output error: {dst} (the disk or the network file system failed to read or write it)"
    ]
    monkeypatch.setattr(convert_module, "source_images", failing)  # a read of SRC's
    assert main(["convert", str(bad_root), str(dst), "--format", "wds", "--workers", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert err == [
        "moco-fast convert: error: Input/output error (the disk or the network file system failed; "
        f"the command reads and writes SRC {bad_root} and DST {dst})"
    ]
    assert not dst.exists() and no_partials(tmp_path)


FAULTY_WORKER = """
import errno, os, sys
from ffcv.memory_allocator import MemoryAllocator
from moco_fast import convert_beton as conv
CODE = getattr(errno, sys.argv.pop(1))
WHERE = sys.argv.pop(1)

class Refusing:  # the .beton as a writer worker holds it open: each page write fails
    def __init__(self, fp):
        self.fp = fp
    def seek(self, *args):
        return self.fp.seek(*args)
    def write(self, data):
        raise OSError(CODE, os.strerror(CODE))
    def close(self):
        self.fp.close()

if WHERE == "page":
    enter = MemoryAllocator.__enter__
    def refusing(self):
        enter(self)
        self.fp = Refusing(self.fp)
    MemoryAllocator.__enter__ = refusing
else:  # another call of the worker fails without a path (a warning printed to a stderr on a full disk)
    get = conv.BetonSource.__getitem__
    def failing(self, i):
        if os.getpid() != self.parent:
            raise OSError(CODE, os.strerror(CODE))
        return get(self, i)
    conv.BetonSource.__getitem__ = failing
sys.exit(__import__("moco_fast.cli").cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("code, where", [("ENOSPC", "page"), ("EIO", "page"), ("ENOSPC", "sample")])
def test_a_writer_workers_error_is_dsts_only_when_the_disk_refused_its_page(code, where, bad_root, tmp_path):
    # The workers' wrapper recorded every errno as a write of the output's: an EIO came back as an
    # OSError naming the temporary .beton (removed by then), and a full disk met by anything else in
    # a worker as "No space left on device: DST". Only what the disk refused a page is DST's now.
    dst = tmp_path / "out" / "x.beton"
    argv = [code, where, "convert", str(bad_root), str(dst), "--workers", "2"]
    p = subprocess.run([sys.executable, "-c", FAULTY_WORKER, *argv], capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, p.stderr[-2000:]
    err = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and ".partial-" not in err[0], p.stderr[-2000:]
    if (code, where) == ("ENOSPC", "page"):
        assert err[0].endswith(f"moco-fast convert: error: No space left on device: {dst}"), err
        assert "Traceback" not in p.stderr
    else:  # the worker printed its own error, and the convert names the worker
        assert "writer worker (pid" in err[0] and "exit status 1 (its error is printed above)" in err[0], err
        assert f"OSError: [Errno {getattr(errno, code)}]" in p.stderr and str(dst) not in err[0]
    assert not dst.parent.exists()  # no output, no temporary, and the folder the convert made is gone


# Run by a convert in a child process: each worker writes its pid, then waits as if at work; the
# parent, once both have, kills itself as the OOM killer or a preemption does (no chance to clean up).
KILLED_PARENT = """
import os, signal, sys, time
from pathlib import Path
from moco_fast import convert_beton, convert_wds
pids, parent = Path(sys.argv[1]), os.getpid()
def waits(job):
    if os.getpid() != parent:
        (pids / str(os.getpid())).touch()
        time.sleep(60)
    return job
def patched(real, job):
    return real(waits(job))
def task(real):
    import functools
    return functools.partial(patched, real)
real_map = convert_wds.parallel_map
def killed_map(fn, jobs, workers, desc):
    it = real_map(task(fn), jobs, workers, desc)
    def dies():
        while len(list(pids.iterdir())) < workers:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    import threading
    threading.Thread(target=dies, daemon=True).start()
    yield from it
convert_wds.parallel_map = killed_map
sys.exit(__import__("moco_fast.cli").cli.main(sys.argv[2:]))
"""


def test_the_workers_of_a_sigkilled_convert_end_with_it(bad_root, tmp_path):
    # A convert killed without warning closes none of its pool's queues: its workers, each waiting on
    # one whose other end a sibling holds, were left running forever (ppid 1). They end within ~1 s.
    pids = tmp_path / "pids"
    pids.mkdir()
    argv = ["convert", "--format", "wds", str(bad_root), str(tmp_path / "out"), "--workers", "2"]
    with open(tmp_path / "stderr", "wb") as err:  # not a pipe: the workers would hold it open
        p = subprocess.run([sys.executable, "-c", KILLED_PARENT, str(pids), *argv], stderr=err, timeout=180)
    assert p.returncode == -9, (tmp_path / "stderr").read_text()[-2000:]
    workers = [int(f.name) for f in pids.iterdir()]
    assert len(workers) == 2
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:
        os.kill(pid, 9)
    assert not left, "a worker outlived its SIGKILLed convert"


def _alive(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return False
