"""The resident loader and its crop kernel, on the CPU: the batched crop equals torchvision's per-image
crop, boxes follow RandomResizedCrop's distribution, the loader yields what the trainer expects,
shards ranks, draws the same views for the same (seed, epoch), and refuses what does not fit."""

import json
import logging

import pytest
import torch
from moco_fast.kernels.resized_crop import fallback_box, resized_crop, resized_crop_reference, sample_boxes
from moco_fast.loaders import LoaderArgs, create_loader
from moco_fast.loaders import resident as resident_module
from moco_fast.loaders.base import pinned_copy
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from moco_fast.augment import MOCO_CIFAR, MOCO_V2
from moco_fast.cli import main
from moco_fast.config import ConfigError, build_config
from moco_fast.data import DataError, list_images
from moco_fast.trainer import train

CPU = torch.device("cpu")


# ---- the crop kernel ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "height,width,size",
    [(32, 32, 32), (64, 48, 32), (256, 256, 224), (40, 100, 24), (20, 20, 64)],
    ids=["cifar", "non-square", "imagenet", "wide-shrink", "enlarge"],
)
def test_batched_crop_equals_torchvision_per_image(height, width, size):
    g = torch.Generator().manual_seed(height + width)
    x = torch.rand(24, 3, height, width, generator=g)
    boxes = sample_boxes(24, height, width, (0.08, 1.0), (3 / 4, 4 / 3), generator=g)
    fast = resized_crop(x, boxes, size)
    ref = resized_crop_reference(x, boxes, size)
    assert fast.shape == (24, 3, size, size)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=0)


def test_boxes_lie_inside_and_follow_the_spec():
    g = torch.Generator().manual_seed(0)
    boxes = sample_boxes(4000, 48, 64, (0.2, 1.0), (3 / 4, 4 / 3), generator=g)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 48).all() and (left + w <= 64).all()
    area = (h * w).float() / (48 * 64)
    assert area.min() >= 0.19 and area.max() <= 1.0  # rounding to whole pixels moves the area a little
    aspect = w.float() / h
    assert aspect.min() > 0.7 and aspect.max() < 1.4
    # Offsets are uniform over where the box fits: the box centres cover the image symmetrically.
    cx = (left + w / 2).float().mean() / 64
    assert abs(cx - 0.5) < 0.02


def test_area_distribution_matches_torchvision():
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    tv = torch.tensor([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)])
    ours = sample_boxes(3000, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), generator=torch.Generator().manual_seed(1))
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    a_tv = (tv[:, 2] * tv[:, 3]).float().quantile(q) / 1024
    a_ours = (ours[:, 2] * ours[:, 3]).float().quantile(q) / 1024
    torch.testing.assert_close(a_ours, a_tv, atol=0.04, rtol=0)


@pytest.mark.parametrize("height,width", [(20, 200), (200, 20)])
def test_fallback_is_torchvisions_central_crop(height, width):
    ratio = (3 / 4, 4 / 3)
    # Boxes of at least 99% of a very wide or tall image never fit the ratio: the fallback is used.
    boxes = sample_boxes(8, height, width, (0.99, 1.0), ratio, generator=torch.Generator().manual_seed(0))
    tv = RandomResizedCrop.get_params(torch.zeros(3, height, width), [0.99, 1.0], list(ratio))
    assert (boxes == boxes[0]).all()
    assert tuple(boxes[0].tolist()) == fallback_box(height, width, ratio) == tuple(tv)


def test_crop_rejects_bad_input():
    with pytest.raises(ValueError, match="float"):
        resized_crop(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="boxes"):
        resized_crop(torch.zeros(2, 3, 8, 8), torch.zeros(3, 4, dtype=torch.long), 4)


# ---- the loader -----------------------------------------------------------------------------------
def resident(root, batch=8, rank=0, world=1, seed=0, spec=MOCO_CIFAR, **options):
    args = LoaderArgs(
        str(root),
        spec,
        batch_size=batch,
        device=CPU,
        workers=2,
        seed=seed,
        rank=rank,
        world_size=world,
        options={k: str(v) for k, v in options.items()},
    )
    return create_loader("resident", args)


def test_batches_are_what_the_trainer_expects(tiny_root):
    loader = resident(tiny_root)
    assert loader.num_images == 32 and len(loader) == 4 and loader.classes == ["airplane", "automobile"]
    batches = list(loader)
    assert len(batches) == 4
    b = batches[0]
    for v in (b.im_q, b.im_k):
        assert v.shape == (8, 3, 32, 32) and v.dtype == torch.float32
        assert v.is_contiguous(memory_format=torch.channels_last)
    assert not torch.allclose(b.im_q, b.im_k)  # two independent views
    files = list_images(tiny_root / "train", check=False)
    assert b.label.tolist() == [files.labels[i] for i in b.index.tolist()]
    seen = torch.cat([x.index for x in batches])
    assert sorted(seen.tolist()) == list(range(32))  # one epoch visits every image once
    # Normalised with the spec's statistics: a view's pixels are (x/255 - mean) / std for x in 0..255.
    lo = (0 - torch.tensor(MOCO_CIFAR.mean)) / torch.tensor(MOCO_CIFAR.std)
    hi = (1 - torch.tensor(MOCO_CIFAR.mean)) / torch.tensor(MOCO_CIFAR.std)
    per_channel = b.im_q.transpose(0, 1).reshape(3, -1)
    assert (per_channel.min(1).values >= lo - 1e-4).all() and (per_channel.max(1).values <= hi + 1e-4).all()


def test_same_seed_and_epoch_same_views_and_ranks_split_the_order(tiny_root):
    a, b = resident(tiny_root, seed=3), resident(tiny_root, seed=3)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.index, y.index) and torch.equal(x.im_q, y.im_q) and torch.equal(x.im_k, y.im_k)
    a.set_epoch(1)
    assert not torch.equal(next(iter(a)).index, next(iter(b)).index)  # a new epoch, a new order
    r0, r1 = resident(tiny_root, rank=0, world=2), resident(tiny_root, rank=1, world=2)
    assert len(r0) == len(r1) == 2  # every rank runs the same number of steps
    i0 = torch.cat([x.index for x in r0]).tolist()
    i1 = torch.cat([x.index for x in r1]).tolist()
    assert not set(i0) & set(i1) and len(set(i0) | set(i1)) == 32


def test_the_epoch_order_reaches_a_gpu_from_pinned_memory(tiny_root, monkeypatch):
    # A copy from pageable memory to a GPU may wait for the steps queued before it (a host sync at
    # every epoch's start, non_blocking or not). The order goes through pinned_copy, once an epoch,
    # whole (a resumed epoch slices it on the device), and pinned_copy pins before a CUDA copy.
    copies = []

    def recorded(x, device):
        copies.append((x.clone(), device))
        return pinned_copy(x, device)

    monkeypatch.setattr(resident_module, "pinned_copy", recorded)
    loader = resident(tiny_root)
    loader.set_epoch(2, start_step=1)
    indices = torch.cat([b.index for b in loader])
    ((order, device),) = copies
    assert device == CPU and torch.equal(order, loader.sampler.indices()) and torch.equal(indices, order[8:])

    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append(("pin", self)) or self.clone())
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(("to", self, a, k)) or self)
    pinned_copy(order, torch.device("cuda"))
    (pin, x), (to, src, args, kwargs) = calls
    assert (pin, to) == ("pin", "to") and x is order and src is not order
    assert args == (torch.device("cuda"),) and kwargs == {"non_blocking": True}


def test_grayscale_rate_follows_the_spec(tiny_root):
    # 32 images x 2 views x 12 epochs = 768 views; a grey view has three equal channels.
    loader = resident(tiny_root, batch=16)
    grey = total = 0
    for epoch in range(12):
        loader.set_epoch(epoch)
        for b in loader:
            for v in (b.im_q, b.im_k):
                raw = v * torch.tensor(MOCO_CIFAR.std).view(1, 3, 1, 1) + torch.tensor(MOCO_CIFAR.mean).view(1, 3, 1, 1)
                spread = (raw.amax(1) - raw.amin(1)).flatten(1).amax(1)
                grey += int((spread < 1e-4).sum())
                total += v.shape[0]
    assert abs(grey / total - MOCO_CIFAR.gray_prob) < 0.05, grey / total


def test_flip_rate_follows_the_spec(tiny_root):
    # Whole-image crops and no colour: every view is its stored image, flipped or not, and about
    # flip_prob of them are flipped. 32 images x 2 views x 8 epochs = 512 views.
    from dataclasses import replace

    spec = replace(MOCO_CIFAR, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_prob=0.0, gray_prob=0.0)
    loader = resident(tiny_root, batch=16, spec=spec)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    flipped = total = 0
    for epoch in range(8):
        loader.set_epoch(epoch)
        for b in loader:
            stored = loader.data[b.index].float() / 255
            for v in (b.im_q, b.im_k):
                raw = v * std + mean
                as_is, mirrored = ((raw - x).abs().flatten(1).amax(1) < 1e-4 for x in (stored, stored.flip(-1)))
                assert (as_is | mirrored).all()  # nothing else was done to the views
                flipped += int((mirrored & ~as_is).sum())  # a symmetric image counts as not flipped
                total += v.shape[0]
    sd = (spec.flip_prob * (1 - spec.flip_prob) / total) ** 0.5
    assert abs(flipped / total - spec.flip_prob) < 4 * sd + 0.02, flipped / total


def test_mixed_sizes_bad_files_and_the_size_option(tmp_path, caplog):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(6):
            Image.new("RGB", (40 + 10 * i, 30 + 5 * i), (40 * i, 100, 200)).save(tmp_path / c / f"{i}.jpg")
    good = (tmp_path / "a" / "0.jpg").read_bytes()
    (tmp_path / "b" / "cut.jpg").write_bytes(good[: len(good) // 2])  # truncated: passes the header check
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        loader = resident(tmp_path, batch=4, spec=MOCO_V2.with_size(24))
    assert loader.num_images == 12  # the truncated file is left out
    assert any("cut.jpg" in r.getMessage() for r in caplog.records)
    assert tuple(loader.data.shape[1:]) == (3, 27, 27)  # mixed sizes: 24 / 0.875, square
    assert next(iter(loader)).im_q.shape == (4, 3, 24, 24)
    loader = resident(tmp_path, batch=4, spec=MOCO_V2.with_size(24), size=36)
    assert tuple(loader.data.shape[1:]) == (3, 36, 36)


def test_refuses_data_that_does_not_fit_and_bad_options(tiny_root):
    with pytest.raises(DataError, match=r"32 images of 32x32 need 0\.1 MiB"):
        resident(tiny_root, memory_fraction=1e-9)
    with pytest.raises(ConfigError, match="unknown resident loader option"):
        resident(tiny_root, colour=1)
    with pytest.raises(ConfigError, match="expected an int"):
        resident(tiny_root, size="big")
    with pytest.raises(ConfigError, match="jitter_order"):
        resident(tiny_root, jitter_order="random")
    with pytest.raises(DataError, match="fewer than one batch"):
        resident(tiny_root, batch=64)


def test_training_with_it_resumes_exactly(tiny_root, tmp_path):
    def cfg(out, epochs, **extra):
        return build_config(
            "cifar",
            {
                "model.arch": "resnet18",
                "model.stem": "imagenet",
                "moco.k": 32,
                "moco.bn_splits": 2,
                "optim.batch_size": 8,
                "optim.epochs": epochs,
                "runtime.device": "cpu",
                "data.loader": "resident",
                "data.workers": 1,
                "data.data": str(tiny_root),
                "runtime.out": str(out),
                "runtime.final_knn": False,
                "runtime.knn_baseline": False,
                **extra,
            },
        )

    train(cfg(tmp_path / "full", 2))
    train(cfg(tmp_path / "part", 1))
    train(cfg(tmp_path / "part", 2, **{"runtime.resume": "auto"}))

    def losses(d):
        return [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "full") == losses(tmp_path / "part")


def test_cli_reports_knn_with_the_resident_loader(tiny_root, tmp_path, capsys):
    flags = "--preset cifar --arch resnet18 --stem imagenet --epochs 1 --batch-size 8 --moco-k 16 --bn-splits 2 --device cpu"
    rc = main(["train", "--loader", "resident", "--data", str(tiny_root), *flags.split(), "--out", str(tmp_path)])
    assert rc == 0
    assert "kNN top-1" in capsys.readouterr().out


# ---- on a GPU -------------------------------------------------------------------------------------
CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_crop_matches_reference():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand(16, 3, 64, 48, device=dev)
    boxes = sample_boxes(16, 64, 48, (0.08, 1.0), (3 / 4, 4 / 3), dev, g)
    torch.testing.assert_close(resized_crop(x, boxes, 32), resized_crop_reference(x, boxes, 32), atol=2e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("jitter_order", ["sample", "batch"])
def test_gpu_batches_come_without_a_host_sync(tiny_root, jitter_order):
    args = LoaderArgs(
        str(tiny_root),
        MOCO_V2.with_size(32),
        batch_size=4,
        device=torch.device("cuda"),
        dtype=torch.bfloat16,
        options={"jitter_order": jitter_order},
    )
    it = iter(create_loader("resident", args))
    next(it)  # the epoch's order is copied to the device here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [next(it) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert batches[-1].im_q.dtype == torch.bfloat16 and batches[-1].im_q.is_cuda
