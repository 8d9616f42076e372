"""Shared fixtures: small real-image folders cut from the demo set, and the inputs that several test
files of one area read (a finished run, a checkpoint to evaluate, convert's damaged input, the FFCV
loader), each section naming its files; the plain helpers of an area live in its *_helpers.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

# Before torch's import (libgomp reads it as it loads), for this process and every process a test
# starts: an OpenMP thread that waits for its peers sleeps at once instead of spinning (libgomp's
# default spins up to 300,000 times). With more busy threads than cores (a test's DataLoader workers,
# FFCV's and DALI's threads, a subprocess, anything else on a 2-core machine) a spinning thread took
# the core its peer needed: a 4-step tiny training ran its epoch in 28 s instead of 1 s on a loaded
# 2-core machine. What the tests compute is the same; a user's OMP_WAIT_POLICY is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import eval_cli_helpers
import eval_helpers
import numpy as np
import pytest
import torch
from ffcv_helpers import loader_args
from moco_fast.loaders import create_loader
from PIL import Image
from run_helpers import tiny_args

from moco_fast import signals
from moco_fast.cli import main
from moco_fast.config import build_config, to_dict
from moco_fast.data import DEMO_ROOT
from moco_fast.model import MoCo
from moco_fast.signals import _on_stop_signal
from moco_fast.trainer import train

# The marks of a parameter that runs on a CUDA GPU only: `gpu`, so that `pytest -m gpu` (bench/gpu_check.sh)
# selects it, and skipped without one.
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def make_image_root(dst: Path, per_class: int = 8, classes: int = 2, test_per_class: int = 4) -> Path:
    """A data root with train/ and test/ holding real CIFAR JPEGs from the demo set."""
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in sorted(p.name for p in (DEMO_ROOT / split).iterdir())[:classes]:
            (dst / split / c).mkdir(parents=True, exist_ok=True)
            for f in sorted((DEMO_ROOT / split / c).iterdir())[:n]:
                shutil.copy(f, dst / split / c / f.name)
    return dst


def read_until_then_close(fd: int, marker: bytes) -> None:
    """Reads the pipe `fd` until `marker` has come, then closes it: its writer's reader goes away there
    (`| head` once it has its lines). An AssertionError with what came where the writer ended first."""
    seen = b""
    with open(fd, "rb", buffering=0) as reader:
        while marker not in seen:
            chunk = reader.read(4096)
            assert chunk, seen.decode(errors="replace")  # the writer ended before the marker
            seen += chunk


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port of 127.0.0.1 held for the test: bound, not listening, with SO_REUSEADDR. Nothing answers
    there until rank 0's store listens at it, which SO_REUSEADDR allows (torch's store sets it too);
    a bind without it fails, and binds to port 0 pick other ports. A port found free and let go (bind
    to port 0, close), as these tests did, was free only then: rank 0 binds it seconds later, in a
    new process, and another process may take it first, the likely cause of one failure of
    test_distributed_failures.py's test_a_manual_launch_whose_peer_never_comes_ends_with_one_line on a loaded machine."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """2 classes x 16 train / 4 test images: read-only, shared by the session."""
    return make_image_root(tmp_path_factory.mktemp("tiny"), per_class=16, classes=2, test_per_class=4)


@pytest.fixture(scope="session")
def tiny_beton(tiny_root, tmp_path_factory) -> Path:
    """tiny_root's train/ (2 classes x 16 CIFAR images) as a .beton (test_ffcv_*.py, test_stops.py)."""
    from moco_fast.convert import ConvertConfig, convert

    dst = tmp_path_factory.mktemp("beton") / "tiny.beton"
    convert(ConvertConfig(str(tiny_root), str(dst), format="ffcv", workers=2))
    return dst


@pytest.fixture
def fresh_root(tmp_path) -> Path:
    """A writable copy that a test may damage."""
    return make_image_root(tmp_path / "data", per_class=8, classes=2, test_per_class=4)


@pytest.fixture
def listed(monkeypatch) -> list[str]:
    """The name of each folder listed (data.list_images) from here on, in order, by load_splits and
    by convert (which holds a name of its own for list_images): how often a command lists its data
    (test_bench.py, test_sweep.py)."""
    import moco_fast.convert
    import moco_fast.data

    names, list_images = [], moco_fast.data.list_images

    def counted(folder, *a, **kw):
        names.append(folder.name)
        return list_images(folder, *a, **kw)

    for module in (moco_fast.data, moco_fast.convert):
        monkeypatch.setattr(module, "list_images", counted)
    return names


# -- augmentation statistics (DALI, FFCV) ---------------------------------------------------------
def coordinate_image() -> np.ndarray:
    """64 x 64 RGB with R = 4x, G = 4y: a view's corner colours give its crop box and its flip."""
    y, x = np.mgrid[0:64, 0:64]
    return np.stack([4 * x, 4 * y, np.full_like(x, 128)], -1).astype(np.uint8)


def to_uint8(v: torch.Tensor, spec) -> np.ndarray:
    """Normalised N x 3 x H x W -> uint8 N x H x W x 3 on the host."""
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    x = v.float().cpu() * std + mean
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def crop_stats(views: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinate-image views -> (crop area fraction, aspect ratio w/h, flipped)."""
    v = views.astype(np.float64)
    s = v.shape[1]
    r = v[..., 0].mean(1)  # N x W: the x coordinate along the columns
    g = v[..., 1].mean(2)  # N x H: the y coordinate along the rows
    # Output pixel centres span (S-1)/S of the crop: undo that to get the crop size in source pixels.
    w = np.abs(r[:, -1] - r[:, 0]) / 4 * s / (s - 1)
    h = np.abs(g[:, -1] - g[:, 0]) / 4 * s / (s - 1)
    return w * h / 64**2, w / h, r[:, -1] < r[:, 0]


def _draws_nothing(*args, **kwargs) -> bool:
    return True


@pytest.fixture(autouse=True)
def no_bar_left_open():
    """Closes, without drawing, the progress bars a test left open (a command cut short in-process,
    a bar its test did not close): in pytest's one process they kept their places in tqdm's list, so
    a later test's bar drew nested under them and its lines carried their cursor moves ("\x1b[A")."""
    yield
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.display = _draws_nothing
        with contextlib.suppress(Exception):  # its stream closed or gone
            bar.close()


@pytest.fixture
def handlers(request):
    """The CLI's handlers, as `moco-fast train` runs with them: a stop that is not deferred raises."""
    old = {s: signal.signal(s, _on_stop_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    old[signal.SIGCHLD] = signal.getsignal(signal.SIGCHLD)  # a stop's handler replaces it (signals._on_stop_signal)
    before = signals._sigchld_before  # and keeps the one it replaced, put back by the next command
    yield
    for s, h in old.items():
        signal.signal(s, h)
    signals._sigchld_before = before


# -- a finished run (test_run_folder.py, test_resume.py, test_run_signals.py, test_run_messages.py) --
@pytest.fixture(scope="session")
def trained(tiny_root, tmp_path_factory):
    """One finished 1-epoch run, trained once for the session; tests change copies of it (`run`)."""
    out = tmp_path_factory.mktemp("runs") / "one-epoch"
    assert main(tiny_args(tiny_root, out)) == 0
    return out


@pytest.fixture
def run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# -- a checkpoint to evaluate (test_classifiers.py, test_classifier_resume.py, test_export.py, test_sweep.py) --
@pytest.fixture(scope="session")
def six_root(tmp_path_factory):
    """6 classes (so that top-5 is not trivially 100%): 6 train and 3 test images each."""
    return make_image_root(tmp_path_factory.mktemp("six"), per_class=6, classes=6, test_per_class=3)


@pytest.fixture(scope="session")
def ckpt(six_root, tmp_path_factory):
    """A one-epoch MoCo checkpoint (ResNet-18, ImageNet stem, 32 px), trained once for the session."""
    out = tmp_path_factory.mktemp("run")
    train(build_config("cifar", {**eval_helpers.TINY, "data.data": str(six_root), "runtime.out": str(out)}))
    return out / "checkpoint.pt"


# -- convert's input (test_convert_outputs.py, test_convert_force.py, test_convert_failures.py) ------
@pytest.fixture
def bad_root(fresh_root: Path) -> Path:
    """fresh_root's train/ (2 classes x 8) plus a truncated JPEG, a broken one, a text file, and a
    CMYK JPEG and a grayscale PNG of odd sizes (these two must land, as RGB)."""
    first = sorted((fresh_root / "train").iterdir())[0]
    good = sorted(first.iterdir())[0].read_bytes()
    (first / "trunc.jpg").write_bytes(good[: int(len(good) * 0.9)])  # header fine, decode fails
    (first / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (first / "notes.txt").write_text("not an image")
    yy, xx = np.mgrid[0:24, 0:40]
    smooth = np.stack([xx * 6, yy * 10, 255 - xx * 6], axis=-1).astype(np.uint8)  # 24 x 40, JPEG-friendly
    Image.fromarray(smooth).convert("CMYK").save(first / "cmyk.jpg", quality=95)
    Image.fromarray(smooth[..., 0].T.copy(), "L").save(first / "gray.png")
    return fresh_root


# -- the evaluation commands' inputs (test_eval_args.py, test_eval_outputs.py, test_foreign.py) ---
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """3 classes x 6 train / 2 test images."""
    return make_image_root(tmp_path_factory.mktemp("data"), per_class=6, classes=3, test_per_class=2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Iterator[Path]:
    """A run folder holding checkpoint.pt of an untrained ResNet-18 (ImageNet stem, 32 px), removed
    after the module: 90 MB each of the three modules that use it, else kept to the session's end."""
    out = tmp_path_factory.mktemp("run")
    cfg = build_config("cifar", eval_cli_helpers.TINY)
    model = MoCo(cfg.model, cfg.moco, cfg.data.aug.image_size)
    torch.save({"config": to_dict(cfg), "model": model.state_dict(), "epoch": 1}, out / "checkpoint.pt")
    yield out
    shutil.rmtree(out, ignore_errors=True)


# -- the FFCV loader (test_ffcv_batches.py, test_ffcv_errors.py) -----------------------------------------
@pytest.fixture(scope="session")
def loader(tiny_beton):
    """An FFCV loader on tiny_beton, shared by the session: its Numba pipeline compiles on first use
    (~20-40 s per Loader on a CPU)."""
    return create_loader("ffcv", loader_args(tiny_beton))
