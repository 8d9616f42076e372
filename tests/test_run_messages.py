"""What a run tells its user: bad flag values, full disks, file size limits, I/O errors and an --out
that may not be written are one line (one write, on a line of its own after a progress bar) before
anything starts where possible, and the notes a run logs (no eval split, synthetic data, the final
kNN's settings)."""

import io
import logging
import os
import shutil
import sys
import tempfile

import pytest
from eval_cli_helpers import one_line_error
from run_helpers import ForkedCommands, read_only_prefix, rows, tiny_args

from moco_fast import checkpoint as ckpt
from moco_fast.cli import main


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--bn-splits", "0", "--bn-splits must be at least 1"),
        ("--log-every", "0", "--log-every must be at least 1"),
        ("--image-size", "0", "--image-size must be at least 8"),
        ("--image-size", "22400", "--image-size must be at most 4096"),  # a typo that allocated for ever
        ("--device", "gpu", "--device 'gpu'"),
        ("--workers", "-2", "--workers must be at least -1"),
        ("--lr", "-1", "--lr must be positive"),
        ("--knn-k", "0", "--knn-k must be at least 1"),
        ("--moco-k", "-5", "--moco-k must be at least 1 (got -5)"),  # not "lower --batch-size"
        ("--knn-t", "0", "--knn-t must be positive"),
        ("--lr", "nan", "--lr must be positive"),  # NaN passes every `<= 0` check
        ("--lr", "inf", "--lr must be positive"),
        ("--weight-decay", "nan", "--weight-decay not negative"),
        ("--moco-t", "nan", "--moco-t must be positive"),
        ("--knn-t", "inf", "--knn-t must be positive"),
        ("--seed", "-1", "--seed must be in 0..4294967295"),  # numpy's global seed raised at the start
        ("--seed", str(2**32), "--seed must be in 0..4294967295"),
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
    assert one_line_error(capsys) == f"moco-fast export: error: No space left on device: {target}"
    assert list(tmp_path.iterdir()) == []  # the temporary file went
    # a quota met by a plain write or fsync: named with the file too
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    monkeypatch.setattr(export, "run", lambda args: atomic_write(target, lambda fh: (_ for _ in ()).throw(quota)))
    assert main(argv) == 2
    assert one_line_error(capsys) == f"moco-fast export: error: Disk quota exceeded: {target}"

    # a folder that may not be written: the file is named, not the temporary one beside it
    def refused(prefix, suffix, dir):
        raise PermissionError(errno.EPERM, "Operation not permitted", f"{dir}/{prefix}x1y2{suffix}")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", refused)
        m.setattr(export, "run", lambda args: atomic_write(target, lambda fh: None))
        assert main(argv) == 2
    assert one_line_error(capsys) == f"moco-fast export: error: Operation not permitted: {target}"

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
    assert one_line_error(capsys) == f"moco-fast export: error: Operation not permitted: {tmp_path / 'x' / 'y'}"
    # (an EIO is the disk's: one line, see test_an_io_error_without_a_file_is_one_line_naming_...)
    monkeypatch.setattr(export, "run", lambda args: (_ for _ in ()).throw(OSError(errno.EBADF, "Bad file descriptor")))
    with pytest.raises(OSError, match="Bad file descriptor"):  # a bug's, not the user's to fix: the traceback stays
        main(argv)


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


def test_the_final_report_says_where_the_checkpoint_is(capsys):
    # It gave the loss, the speed and the kNN figures, and the weights' file only where a kNN line
    # needed it (no eval split): after `moco-fast train --data D` the user had to know runs/moco.
    from moco_fast.commands.train import _report
    from moco_fast.config import build_config

    _report({"epoch": 2, "loss": 1.0, "img_per_s": 10.0, "final_knn_top1": 50.0}, build_config("v2", {}))
    assert "finished epoch 2: loss 1.0000, 10 img/s; checkpoint runs/moco/checkpoint.pt" in capsys.readouterr().out


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
    assert "no class subfolders in" in one_line_error(capsys)


def test_synthetic_says_that_it_reads_no_data_and_counts_no_images(tmp_path, caplog):
    # `--loader synthetic --data /nonexistent` trained without a word and kept the path in config.json
    argv = [
        "train", "--loader", "synthetic", "--synthetic-steps", "1", "--data", str(tmp_path / "gone"),
        "--arch", "resnet18", "--image-size", "16", "--batch-size", "8", "--bn-splits", "2", "--moco-k", "16",
        "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run"), "--no-final-knn",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="moco_fast"):
        assert main(argv) == 0
    assert f"--loader synthetic makes its own images: --data {tmp_path / 'gone'} is not read" in caplog.text
    # nor does it count images or classes: its line said "8 images in 10 classes"
    assert "data: random images (--loader synthetic), 1 step of 8 a process per epoch" in caplog.messages


@pytest.mark.parametrize("device, says", [("auto", True), ("cpu", False)])
def test_the_default_device_without_a_gpu_says_the_run_trains_on_the_cpu(tmp_path, caplog, monkeypatch, device, says):
    # the README's `moco-fast train --data ... --loader dali` on a machine without a GPU trained (DALI on
    # the CPU) without a word of it; --device cpu asked for the CPU and needs no line
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    argv = [
        "train", "--loader", "synthetic", "--synthetic-steps", "1", "--arch", "resnet18", "--image-size", "16",
        "--batch-size", "8", "--bn-splits", "2", "--moco-k", "16", "--epochs", "1", "--device", device,
        "--out", str(tmp_path / "run"), "--no-final-knn",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="moco_fast"):
        assert main(argv) == 0
    assert ("no CUDA GPU here: training on the CPU (--device auto)" in caplog.messages) == says, caplog.messages


def test_a_refusal_without_a_gpu_is_one_line_at_the_default_device(tiny_root, tmp_path):
    # --device auto (the default) said "no CUDA GPU here: training on the CPU" before train's checks,
    # so that a refusal of the flags, --out or the data read two lines, the first of a run that never
    # started. Each in a process of its own: its stderr as the user reads it
    (tmp_path / "file").write_text("")
    args = tiny_args(tiny_root, tmp_path / "run")
    del args[args.index("--device") : args.index("--device") + 2]  # the default: auto
    refusals = {
        "--moco-k": ("7", "--moco-k 7 is smaller than the keys one step enqueues"),  # a flag: train()'s checks
        "--out": (tmp_path / "file", "is a file: it must be a run folder"),  # --out: before the data
        "--data": (tmp_path / "gone", "data folder not found"),  # the data: as the loader lists it
    }
    no_gpu = "import torch; torch.cuda.is_available = lambda: False"
    with ForkedCommands(tmp_path) as train:
        for flag, (value, says) in refusals.items():
            changed = [*args]
            changed[changed.index(flag) + 1] = value
            rc, err = train(changed, setup=no_gpu)
            assert rc == 2 and len(err) == 1 and says in err[0], (flag, err)


FEW_BN = "images: their statistics are noisy and MoCo may not learn (docs/experiments.md)"


@pytest.mark.parametrize(
    "flags, says",
    [
        (
            ["--batch-size", "8", "--bn-splits", "2"],
            "--batch-size 8 split by --bn-splits 2 gives each BN sub-batch 4 " + FEW_BN + ": raise --batch-size or "
            "lower --bn-splits",
        ),
        (["--batch-size", "16", "--bn-splits", "2"], None),
        (["--batch-size", "8", "--bn-splits", "2", "--no-shuffle-bn"], None),  # BN normalises the batch of 8
        (["--batch-size", "8", "--bn-splits", "1"], None),
        (["--batch-size", "4", "--bn-splits", "1"], "--batch-size 4 gives BN 4 " + FEW_BN + ": raise --batch-size"),
    ],
)
def test_a_run_whose_bn_sees_few_images_warns_once(tmp_path, caplog, flags, says):
    # a run at --batch-size 16 with --bn-splits 8 (2 images a BN split) trained without a word while its
    # backbone's weights grew 250-fold. Said by the run that trains, once: not by the checks that a sweep
    # runs before the run runs them again, nor by a --resume with nothing left to train
    out = tmp_path / "run"
    argv = [
        "train", "--loader", "synthetic", "--synthetic-steps", "1", "--arch", "resnet18", "--image-size", "16",
        "--moco-k", "16", "--epochs", "1", "--device", "cpu", "--out", str(out), "--no-final-knn", *flags,
    ]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main(argv) == 0
        assert [m for m in caplog.messages if FEW_BN in m] == ([says] if says else [])
        caplog.clear()
        assert main(["train", "--resume", "--out", str(out), "--device", "cpu"]) == 0  # nothing to do
    assert not [m for m in caplog.messages if FEW_BN in m]


@pytest.mark.parametrize(
    "batch, splits, sync_bn, device, says",
    [
        (4, 2, False, "cuda", "--batch-size 4 gives each process's BN 4"),  # --bn-splits: no effect, --sync-bn helps
        (4, 2, False, "cpu", "--batch-size 4 gives each process's BN 4"),  # where --sync-bn is refused
        (8, 8, False, "cuda", None),
        (2, 8, True, "cuda", "--sync-bn over 2 processes of --batch-size 2 gives BN 4"),
        (4, 8, True, "cuda", None),
    ],
)
def test_two_processes_warn_of_the_images_their_bn_sees(caplog, batch, splits, sync_bn, device, says):
    # with several processes --bn-splits does nothing: each process's BN normalises its own batch, or
    # with --sync-bn the batches of all of them (rank 0 of the run says it). 2 CPU processes (torchrun,
    # gloo) were told to add --sync-bn, which they refuse: it needs CUDA GPUs.
    import torch

    from moco_fast.bn_batch import warn_few_bn_images
    from moco_fast.config import as_run, build_config

    cfg = build_config("v2", {"optim.batch_size": batch, "moco.bn_splits": splits, "runtime.sync_bn": sync_bn})
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        warn_few_bn_images(as_run(cfg, 2), 2, torch.device(device))  # the config the run trains with
    said = [m for m in caplog.messages if FEW_BN in m]
    fix = "raise --batch-size" + " or add --sync-bn" * (not sync_bn and device == "cuda")
    assert said == ([f"{says} {FEW_BN}: {fix}"] if says else [])


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


def test_memory_the_machine_refuses_is_one_line(monkeypatch, capsys):
    # `train --moco-k 1000000000` (a queue of 477 GiB) ended in the traceback of torch's CPU allocator,
    # a bug's exit status 1; it is what the machine refuses, as a full disk is.
    import torch

    import moco_fast.commands.export as export

    monkeypatch.setattr(export, "run", lambda args: torch.empty(2**50, dtype=torch.uint8))  # 1 PiB: refused
    assert main(["export", "ckpt", "--format", "torchvision", "--output", "x.pth"]) == 2
    assert one_line_error(capsys) == (
        "moco-fast export: error: out of memory: torch could not allocate 1048576.0 GiB of CPU memory at once: lower "
        "the setting that asks for it (train's queue is --moco-k x --dim floats, a batch --batch-size images)"
    )
    from moco_fast.cli import one_line

    # Python's own names neither the size nor what asked for it (a bug's too): its traceback says where
    assert one_line(MemoryError()) is None


def test_an_io_error_without_a_file_is_one_line_naming_what_the_command_reads_and_writes(tmp_path, monkeypatch, capsys):
    # A read or write of a file already open raises EIO without a file: that was a bug's traceback.
    import errno

    from moco_fast import trainer

    def failing(cfg, saved_run=None):
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
    # where no paths are known (run_workers without `where`): that it was a file open
    from moco_fast.cli import one_line

    assert one_line(OSError(errno.EIO, "Input/output error")).endswith("failed; a file open for reading or writing)")
    # anything else without a file is a bug's, and keeps its traceback
    monkeypatch.setattr(
        trainer, "train", lambda cfg, saved_run=None: (_ for _ in ()).throw(OSError(errno.EINVAL, "Invalid argument"))
    )
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


def test_an_out_that_is_a_link_to_nothing_is_one_line(tiny_root, tmp_path, capsys):
    # a loop of links or a link to a missing folder: mkdir said "[Errno 17] File exists: 'PATH'"
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "dead").symlink_to(tmp_path / "gone")
    for out, why in (
        ("a", "leads into a loop of symbolic links: remove the link or give another path"),
        ("a/run", "leads into a loop of symbolic links: remove the link or give another path"),
        (
            "dead",
            f"is a symbolic link to {tmp_path / 'gone'}, which does not exist: make its target first, or remove the link",
        ),
        (  # a folder above it: mkdir of its parents said "[Errno 17] File exists: 'PATH'" too
            "dead/run",
            f"lies in {tmp_path / 'dead'}, a symbolic link to {tmp_path / 'gone'}, which does not exist: make its "
            "target first, or remove the link",
        ),
    ):
        assert main(tiny_args(tiny_root, tmp_path / out)) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"moco-fast train: error: --out {tmp_path / out} {why}"]
    assert not (tmp_path / "gone").exists()
    (tmp_path / "gone").mkdir()  # a link to a folder is a run folder as before
    assert main(tiny_args(tiny_root, tmp_path / "dead")) == 0
    assert (tmp_path / "gone" / "checkpoint.pt").is_file()


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


@pytest.mark.slow
def test_an_out_that_may_not_be_written_is_one_line_before_the_data_is_read(tiny_root, trained, tmp_path):
    # A read-only folder (mode 555, a read-only mount) failed only at the TensorBoard log, after the
    # data scan and the model build, and a --resume there with a traceback from the event-file thread
    ro, fin, empty = tmp_path / "ro", tmp_path / "ro" / "fin", tmp_path / "ro" / "empty"
    shutil.copytree(trained, fin)
    empty.mkdir()
    before = (fin / "checkpoint.pt").read_bytes()
    prefix = read_only_prefix([ro, fin, empty])
    resume = ["train", "--resume", "--out", str(fin), "--device", "cpu", "--workers", "0"]
    commands = [tiny_args(tiny_root, empty), [*resume, "--epochs", "2"], tiny_args(tiny_root, ro / "new"), resume]
    try:  # each in a process of its own, in the order listed
        with ForkedCommands(tmp_path, prefix) as train:
            done = [train(argv) for argv in commands]
    finally:
        for f in (ro, fin, empty):
            f.chmod(0o755)
    for (rc, err), out in zip(done[:2], (empty, fin)):
        assert rc == 2 and len(err) == 1, err  # no "data: ..." line: nothing was read
        assert err[0] in (
            f"moco-fast train: error: --out {out}: cannot write in {out} ({why})"
            for why in ("Permission denied", "Read-only file system")
        ), err
    # a folder to be made in one that may not be written: as early, and it names --out and the folder
    # that refuses it (it was mkdir's bare "Permission denied: PATH")
    rc, err = done[2]
    assert rc == 2 and len(err) == 1, err
    assert err[0] in (
        f"moco-fast train: error: --out {ro / 'new'}: cannot write in {ro} ({why})"
        for why in ("Permission denied", "Read-only file system")
    ), err
    # a finished run writes nothing: --resume there still says so
    rc, err = done[3]
    assert rc == 0, err
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


@pytest.mark.slow
def test_a_finished_run_that_owes_its_last_row_says_its_out_may_not_be_written(trained, tmp_path):
    # a run killed in its last epoch's kNN monitor (after the epoch's save) lacks that row, which
    # --resume writes: on a read-only --out, one line before the data scan, not TensorBoard's traceback
    import subprocess

    ro = tmp_path / "ro"
    fin = ro / "fin"
    shutil.copytree(trained, fin)  # trained with --no-final-knn: no summary owed
    (fin / "metrics.jsonl").unlink()
    prefix = read_only_prefix([ro, fin])
    argv = ["train", "--resume", "--out", str(fin), "--device", "cpu", "--workers", "0"]
    try:
        done = subprocess.run(
            [*prefix, sys.executable, "-m", "moco_fast", *argv], capture_output=True, text=True, timeout=300
        )
    finally:
        for f in (ro, fin):
            f.chmod(0o755)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr[-2000:]
    assert err[0] in (
        f"moco-fast train: error: --out {fin}: cannot write in {fin} ({why}): the finished run's last epoch "
        "lacks its row, which --resume writes in metrics.jsonl"
        for why in ("Permission denied", "Read-only file system")
    ), err
