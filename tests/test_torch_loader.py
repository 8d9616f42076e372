"""The torch backend's blur and hue step against torchvision's GaussianBlur and ColorJitter, which
they replace for speed."""

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from moco_fast.loaders.color_jitter import ColorJitter, adjust_hue, hsv_to_rgb, rgb_to_hsv
from moco_fast.loaders.torch_loader import SeparableBlur, view_transform
from PIL import Image
from torchvision import transforms as T

from moco_fast.augment import MOCO_V1, MOCO_V2


def noise(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Noise: every pixel differs from its neighbours, so any error in the taps or the border shows."""
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.mark.parametrize(
    ("kernel", "sigma"), [(3, 0.1), (3, 2.0), (7, 0.5), (23, 0.1), (23, 0.3), (23, 1.0), (23, 2.0)]
)
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_blur_is_torchvisions_to_one_grey_level(kernel, sigma, mode):
    # torchvision's kernel and mirrored border, rounded as torchvision rounds: at most one grey level
    # apart, and that on under 1% of the pixels (a sum that lands on .5 one way or the other)
    img = noise(40, 56, mode)  # not square: each pass on its own axis
    ref = TF.gaussian_blur(TF.pil_to_tensor(img), [kernel, kernel], [sigma, sigma]).int()
    out = SeparableBlur(kernel, (sigma, sigma))(img)
    assert out.mode == img.mode and out.size == img.size
    diff = (TF.pil_to_tensor(out).int() - ref).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


def test_views_draw_what_torchvisions_blur_drew_from_the_same_seed():
    # the same draws from torch's generator (whether to blur, then sigma), so a worker's seed gives the
    # views it gave before, and the same rate and sigmas the spec asks for
    spec = replace(MOCO_V2, image_size=48, blur_prob=0.5)
    ops = view_transform(spec).transforms
    i = next(
        i for i, op in enumerate(ops) if isinstance(op, T.RandomApply) and isinstance(op.transforms[0], SeparableBlur)
    )
    torchvisions = T.Compose(
        [*ops[:i], T.RandomApply([T.GaussianBlur(spec.blur_kernel_size, spec.blur_sigma)], 0.5), *ops[i + 1 :]]
    )
    img = noise(64, 80)
    for seed in range(12):
        torch.manual_seed(seed)
        ours = view_transform(spec)(img).int()
        torch.manual_seed(seed)
        theirs = torchvisions(img).int()
        assert (ours - theirs).abs().max() <= 1, seed


# The hue step of ColorJitter (loaders/color_jitter.py): PIL's bytes from tables, checked on every
# input the tables cover, in chunks of 2^20 pixels (1024 x 1024 images).
CHUNKS = range(16)


def every_colour(chunk: int) -> np.ndarray:
    """2^20 of the 2^24 byte triples (chunk 0-15), as a 1024 x 1024 x 3 uint8 array."""
    n = np.arange(chunk << 20, (chunk + 1) << 20, dtype=np.uint32)
    return np.stack([n >> 16, (n >> 8) & 255, n & 255], -1).astype(np.uint8).reshape(1024, 1024, 3)


def packed(a: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> the r | g << 8 | b << 16 words rgb_to_hsv reads."""
    a = a.reshape(-1, 3).astype(np.uint32)
    return a[:, 0] | (a[:, 1] << 8) | (a[:, 2] << 16)


def test_rgb_to_hsv_is_pils_on_every_colour():
    for chunk in CHUNKS:
        a = every_colour(chunk)
        ref = np.asarray(Image.fromarray(a, "RGB").convert("HSV")).reshape(-1, 3)
        h, s, v = rgb_to_hsv(packed(a))
        for i, ours in enumerate((h, s, v)):
            assert np.array_equal(ours, ref[:, i]), (chunk, "HSV"[i])


def test_hsv_to_rgb_is_pils_on_every_hsv_pixel():
    for chunk in CHUNKS:
        a = every_colour(chunk)  # read as (H, S, V)
        ref = np.asarray(Image.frombytes("HSV", (1024, 1024), a.tobytes()).convert("RGB")).reshape(-1, 3)
        h, s, v = (a.reshape(-1, 3)[:, i].astype(np.int64) for i in range(3))
        assert np.array_equal(hsv_to_rgb(h, s, v), ref), chunk


@pytest.mark.parametrize("factor", [-0.5, -0.37, -0.1, -0.004, 0.0, 0.003, 0.05, 0.1, 0.4, 0.5])
def test_adjust_hue_is_torchvisions_byte_for_byte(factor):
    # measured: no pixel differs, on every colour (the two tests above) and on these images
    for seed, (h, w) in enumerate([(37, 53), (224, 224), (1, 1)]):
        img = noise(h, w, seed=seed)
        ours = adjust_hue(img, factor)
        assert ours.mode == "RGB" and ours.size == img.size
        assert np.array_equal(np.asarray(ours), np.asarray(TF.adjust_hue(img, factor))), (seed, factor)
    grey = noise(20, 30, "L")
    assert np.array_equal(np.asarray(adjust_hue(grey, factor)), np.asarray(grey))


def test_adjust_hue_refuses_what_torchvision_refuses():
    for factor in (-0.51, 0.6):
        with pytest.raises(ValueError, match="hue_factor"):
            adjust_hue(noise(4, 4), factor)


@pytest.mark.parametrize(
    "factors", [(0.4, 0.4, 0.4, 0.1), (0.4, 0.4, 0.4, 0.4), (0.0, 0.8, 0.0, 0.5), (0.5, 0, 0.5, 0)]
)
def test_color_jitter_draws_and_gives_what_torchvisions_does(factors):
    # the same draws from torch's generator (order, then each factor) and the same bytes, so a seed
    # gives the views torchvision's ColorJitter gave; the generator is left where torchvision leaves it
    img = noise(48, 40)
    for seed in range(16):
        torch.manual_seed(seed)
        ours, after = np.asarray(ColorJitter(*factors)(img)), torch.rand(1)
        torch.manual_seed(seed)
        theirs, their_after = np.asarray(T.ColorJitter(*factors)(img)), torch.rand(1)
        assert np.array_equal(ours, theirs), (seed, factors)
        assert after == their_after


def torchvision_view(spec) -> T.Compose:
    """The view pipeline as torchvision alone would build it (its ColorJitter and GaussianBlur)."""
    jitter = T.RandomApply([T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], spec.jitter_prob)
    gray = T.RandomGrayscale(spec.gray_prob)
    ops = [T.RandomResizedCrop(spec.image_size, scale=spec.crop_scale, ratio=spec.crop_ratio)]
    ops += [gray, jitter] if spec.gray_before_jitter else [jitter, gray]
    if spec.blur_prob > 0:
        ops.append(T.RandomApply([T.GaussianBlur(spec.blur_kernel_size, spec.blur_sigma)], spec.blur_prob))
    return T.Compose([*ops, T.RandomHorizontalFlip(spec.flip_prob), T.PILToTensor()])


@pytest.mark.parametrize("spec", [MOCO_V1, MOCO_V2], ids=["v1", "v2"])
def test_views_are_torchvisions_from_the_same_seed(spec):
    # the whole view, seeded as a DataLoader worker is: the jitter is torchvision's to the byte, the
    # blur to one grey level on a few pixels (measured: 0.0014% of v2's pixels over these 24 views;
    # v1 has no blur and no pixel differs)
    spec = replace(spec, image_size=64)
    ours_t, theirs_t = view_transform(spec), torchvision_view(spec)
    img = noise(80, 96)
    differ = []
    for seed in range(24):
        torch.manual_seed(seed)
        ours = ours_t(img).int()
        torch.manual_seed(seed)
        theirs = theirs_t(img).int()
        diff = (ours - theirs).abs()
        assert diff.max() <= (1 if spec.blur_prob > 0 else 0), seed
        differ.append((diff > 0).float().mean())
    assert torch.stack(differ).mean() < 0.001


def test_a_process_that_exits_with_its_workers_still_running_ends(tiny_root):
    # The training workers ignore SIGTERM (leave_stops_to_the_trainer); multiprocessing's exit ends
    # the daemonic children it still has with SIGTERM and then waits for them: an iterator still
    # alive at exit (held by a traceback, a global) hung the process there for ever.
    script = f"""
import torch
from moco_fast.augment import MOCO_V2
from moco_fast.loaders import LoaderArgs, create_loader
args = LoaderArgs(data={str(tiny_root)!r}, aug=MOCO_V2, batch_size=4, device=torch.device("cpu"), workers=2,
                  seed=0, check_images=False)
loader = create_loader("torch", args)
loader.set_epoch(0)
KEPT = iter(loader)
next(KEPT)
print("one batch", flush=True)
"""
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not end: multiprocessing waits on workers that ignore its SIGTERM")
    assert out.returncode == 0, out.stderr
    assert "one batch" in out.stdout


def test_a_process_that_exits_with_its_loader_alive_ends_the_workers_as_an_epochs_end_does(tiny_root):
    # The workers persist across epochs, so a stop's or an error's traceback that holds the loader
    # keeps them to the exit, where end_daemonic_children's SIGTERM (ignored by them) cost its 2 s
    # grace and then a SIGKILL: the loader ends them first, and they exit of themselves (status 0).
    script = f"""
import atexit, multiprocessing, torch
from moco_fast.augment import MOCO_V2
from moco_fast.loaders import LoaderArgs, create_loader
WORKERS = []
atexit.register(lambda: print("exit codes", sorted(p.exitcode for p in WORKERS), flush=True))  # runs last
args = LoaderArgs(data={str(tiny_root)!r}, aug=MOCO_V2, batch_size=4, device=torch.device("cpu"), workers=2,
                  seed=0, check_images=False)
LOADER = create_loader("torch", args)
LOADER.set_epoch(0)
list(LOADER)
WORKERS += multiprocessing.active_children()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "exit codes [0, 0]" in out.stdout


def test_the_training_workers_are_gone_before_the_final_evaluation(tiny_root, tmp_path, monkeypatch):
    # the torch loader keeps its DataLoader workers across epochs: after the last epoch they sat idle,
    # holding their memory, through the final kNN and its own workers
    import multiprocessing

    from run_helpers import tiny_args

    import moco_fast.trainer as trainer
    from moco_fast.cli import main

    alive, before = [], set(multiprocessing.active_children())  # other tests' may still be ending

    def final_evaluation(row, *args):
        alive.append(len(set(multiprocessing.active_children()) - before))
        return row

    monkeypatch.setattr(trainer, "_final_evaluation", final_evaluation)
    argv = tiny_args(tiny_root, tmp_path / "run")
    argv[argv.index("--workers") + 1] = "2"
    argv.remove("--no-final-knn")
    assert main(argv) == 0 and alive == [0]


def test_the_trainer_tells_the_loader_its_epochs(tiny_root, tmp_path, monkeypatch):
    # the torch loader's workers start each next epoch's first batches as an epoch ends, up to the
    # run's last epoch (test_start_step.py), which the loader knows from the trainer alone
    from run_helpers import tiny_args

    import moco_fast.trainer as trainer
    from moco_fast.cli import main

    told, create_loader = [], trainer.create_loader
    monkeypatch.setattr(
        trainer, "create_loader", lambda name, args: told.append(args.epochs) or create_loader(name, args)
    )
    assert main(tiny_args(tiny_root, tmp_path / "run", epochs=2)) == 0 and told == [2]


def test_the_training_workers_are_the_trainers_own_children_under_any_start_method(tiny_root, monkeypatch):
    # Python 3.14's default start method on Linux is forkserver: the workers were then children of a
    # server process that a stop signal to the process group (SLURM, `docker stop`) ends, and torch's
    # watchdog ends a worker whose parent changed, so the epoch failed with "DataLoader worker exited
    # unexpectedly" instead of stopping at its next sync (moco_fast.stops)
    import multiprocessing
    import os

    from moco_fast.loaders import LoaderArgs, create_loader

    default = multiprocessing.context._default_context
    monkeypatch.setattr(default, "_actual_context", multiprocessing.get_context("forkserver"))
    args = LoaderArgs(str(tiny_root), MOCO_V2, 4, torch.device("cpu"), workers=1, check_images=False)
    loader = create_loader("torch", args)
    loader.set_epoch(0)
    try:
        next(iter(loader))
        workers = multiprocessing.active_children()
        parents = [int(open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[1]) for p in workers]
    finally:
        loader.close()
    assert workers and parents == [os.getpid()] * len(workers)


def images_made_by_each_worker(root, tmp_path, monkeypatch, batch: int, workers: int) -> list[int]:
    """How many images of an epoch of one batch (`root` has `batch` images) each process decoded,
    sorted: each image's decoder names its process."""
    import os

    from moco_fast.loaders import LoaderArgs, create_loader

    import moco_fast.image_dataset as image_dataset

    made_by = tmp_path / "pids"
    load_rgb = image_dataset.load_rgb

    def logged_load(path):
        with open(made_by, "a") as f:
            f.write(f"{os.getpid()}\n")
        return load_rgb(path)

    monkeypatch.setattr(image_dataset, "load_rgb", logged_load)  # the workers are forked: they inherit it
    args = LoaderArgs(str(root), MOCO_V2, batch, torch.device("cpu"), workers=workers, check_images=False)
    loader = create_loader("torch", args)
    try:
        loader.set_epoch(0)
        (batch_read,) = list(loader)
    finally:
        loader.close()
    assert sorted(batch_read.index.tolist()) == list(range(batch))
    pids = made_by.read_text().split()
    return sorted(pids.count(p) for p in set(pids))


def test_every_worker_makes_a_share_of_every_batch(tiny_root, tmp_path, monkeypatch):
    # A whole batch per worker made each batch at one core's speed: a data set of one batch an epoch
    # (407 images, batch 256) ran as fast with 8 workers as with one (92 img/s on a 16-core machine),
    # and every epoch's first batch waited for one worker alone.
    assert images_made_by_each_worker(tiny_root, tmp_path, monkeypatch, 32, workers=2) == [16, 16]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")  # more than this CPU's cores
def test_a_batchs_parts_are_of_16_images_or_more(tiny_root, tmp_path, monkeypatch):
    # each part costs the main process about as much whatever its size (torch_loader.MIN_PART): a
    # batch of 32 is cut in two for 4 workers, not into parts of 8
    assert images_made_by_each_worker(tiny_root, tmp_path, monkeypatch, 32, workers=4) == [16, 16]


def test_one_prefetcher_serves_every_epoch(tiny_root, monkeypatch):
    # Its mean and std reach the device by a blocking copy: made again at each epoch's start (a
    # DevicePrefetcher per __iter__), they made the host wait there for the GPU to finish the last
    # epoch's steps, at every step where an epoch is one batch. Each epoch still gives a fresh loader's batch.
    import moco_fast.loaders.base as base
    from moco_fast.loaders import LoaderArgs, create_loader

    made = []
    mean_std_255 = base.mean_std_255
    monkeypatch.setattr(base, "mean_std_255", lambda *a: made.append(a) or mean_std_255(*a))
    args = LoaderArgs(str(tiny_root), MOCO_V2.with_size(32), 32, torch.device("cpu"), workers=0, check_images=False)
    loader = create_loader("torch", args)  # 32 images: one batch an epoch
    for epoch in range(3):
        loader.set_epoch(epoch)
        (batch,) = list(loader)
        fresh = create_loader("torch", args)
        fresh.set_epoch(epoch)
        (want,) = list(fresh)
        assert all(torch.equal(a, b) for a, b in zip(batch, want))
    assert len(made) == 1 + 3  # the loader's one, and each fresh loader's


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_new_epoch_starts_without_a_host_sync(tiny_root):
    # as test_one_prefetcher_serves_every_epoch, seen by CUDA: the epochs after the first, their first
    # batches included, run under set_sync_debug_mode("error") (the blocking copy of mean and std raised)
    from moco_fast.loaders import LoaderArgs, create_loader

    args = LoaderArgs(str(tiny_root), MOCO_V2.with_size(32), 16, torch.device("cuda"), workers=0, check_images=False)
    loader = create_loader("torch", args)  # 32 images: two batches an epoch
    loader.set_epoch(0)
    list(loader)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for epoch in (1, 2):
            loader.set_epoch(epoch)
            batches = list(loader)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(batches) == 2 and batches[-1].im_q.is_cuda


def test_a_batchs_parts_are_let_go_once_joined():
    # On the CPU the parts, in /dev/shm, were held through the step of their batch (the join's group,
    # zip's last tuple, DevicePrefetcher's item): each worker's 4 parts ahead and one more. A batch
    # joined on the CPU is a copy: its parts can go before it is yielded.
    import weakref

    from moco_fast.loaders.base import DevicePrefetcher
    from moco_fast.loaders.torch_loader import JoinedParts

    alive = []

    def part(i: int) -> tuple:
        fields = (torch.full((2, 3, 4, 4), i, dtype=torch.uint8), torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
        fields += (torch.zeros(2, dtype=torch.long), torch.arange(2 * i, 2 * i + 2))
        alive.extend(weakref.ref(t) for t in fields)
        return fields

    prefetch = DevicePrefetcher(MOCO_V2, torch.device("cpu"), torch.float32, False)
    batches = prefetch(JoinedParts(map(part, range(4)), 2))
    first = next(batches)  # the trainer's step on it
    assert first.index.tolist() == [0, 1, 2, 3]
    assert [r() is None for r in alive] == [True] * 8
    assert next(batches).index.tolist() == [4, 5, 6, 7]


def test_images_too_few_for_a_batch_of_each_process_say_each_ones_share(tiny_root):
    # 32 images at --batch-size 32 train in one process; 2 processes were told "fewer than one batch
    # of 32 per process: lower --batch-size", which named neither their share nor what fits
    from moco_fast.loaders import LoaderArgs, create_loader

    from moco_fast.augment import MOCO_V2
    from moco_fast.data import DataError

    def loader(batch: int, world: int):
        args = LoaderArgs(data=str(tiny_root), aug=MOCO_V2, batch_size=batch, device=torch.device("cpu"), workers=0,
                          world_size=world, check_images=False)  # fmt: skip
        return create_loader("torch", args)

    assert loader(32, 1).num_images == 32
    with pytest.raises(DataError) as e:
        loader(32, 2)
    assert str(e.value) == (
        "32 images give fewer than one batch of 32 per process (2 processes, 16 images each): lower --batch-size "
        "(to 16 at most), or start at most 1 process"
    )
    # 32 images hold no batch of 33 in any number of processes: fewer of them is no way out
    with pytest.raises(DataError) as e:
        loader(33, 2)
    assert str(e.value) == (
        "32 images give fewer than one batch of 33 per process (2 processes, 16 images each): lower --batch-size "
        "(to 16 at most)"
    )
    with pytest.raises(DataError) as e:
        loader(33, 1)
    assert str(e.value) == "32 images give fewer than one batch of 33: lower --batch-size (to 32 at most)"


def test_one_image_too_few_for_a_batch_takes_the_singular():
    # the line said "1 images give fewer than one batch of 2", where its share took text.plural
    from moco_fast.loaders import LoaderArgs
    from moco_fast.loaders.base import check_one_batch

    from moco_fast.augment import MOCO_V2
    from moco_fast.data import DataError

    for world, line in [
        (1, "1 image gives fewer than one batch of 2: lower --batch-size (to 1 at most)"),
        (
            2,
            "1 image gives fewer than one batch of 2 per process (2 processes, 0 images each): lower --batch-size "
            "(to 1 at most) in 1 process",
        ),
    ]:
        args = LoaderArgs(data="unused", aug=MOCO_V2, batch_size=2, device=torch.device("cpu"), world_size=world)
        with pytest.raises(DataError) as e:
            check_one_batch(1, args)
        assert str(e.value) == line


def test_fewer_images_than_processes_are_not_told_to_lower_the_batch_size_alone():
    # each process's share is none, which no --batch-size mends: 1 image in 2 processes and 3 in 4 were
    # told "lower --batch-size"
    from moco_fast.loaders import LoaderArgs
    from moco_fast.loaders.base import check_one_batch

    from moco_fast.augment import MOCO_V2
    from moco_fast.data import DataError

    for images, world, fix in [
        (1, 2, "lower --batch-size (to 1 at most) in 1 process"),
        (3, 4, "start at most 1 process"),
    ]:
        args = LoaderArgs(data="unused", aug=MOCO_V2, batch_size=2, device=torch.device("cpu"), world_size=world)
        with pytest.raises(DataError) as e:
            check_one_batch(images, args)
        assert str(e.value).endswith(f"({world} processes, 0 images each): {fix}"), e.value
