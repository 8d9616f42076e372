"""The linear classification protocol (MoCo §4.1; the official `main_lincls.py`).

A frozen backbone in eval mode (its BatchNorm statistics never move), one linear layer on its
pooled features, SGD with lr 30, momentum 0.9, weight decay 0, 100 epochs with x0.1 steps at 60
and 80. Training images: random resized crop + flip; evaluation: center crop. Top-1 and top-5.
At the end the backbone is compared with the checkpoint file, tensor by tensor: a classifier that
silently trained (or mis-loaded) its backbone would report a number that is not linear evaluation.

`--cached-features` is a faster, non-standard variant for small experiments: features of the
center crops are extracted once and the linear layer trains on them (no augmentation).

Also the pieces that fine-tuning shares (data, schedule, evaluation).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T

from moco_fast.augment import AugSpec
from moco_fast.backbone import plain_bn_state
from moco_fast.classifier_epochs import EpochLoop, LoadedState, best_of, check_state, clear_state, run_by
from moco_fast.config import ConfigError, check_at_least
from moco_fast.data import (
    DataError,
    DataSplits,
    ImageList,
    find_classes,
    load_splits,
    resolve_root,
    split_dirs,
)
from moco_fast.data_listing import listing_fingerprint
from moco_fast.image_dataset import ImageDataset
from moco_fast.knn import EvalBatches, collate_labeled, eval_batches, warn_if_shm_short
from moco_fast.loaders.base import mean_std_255, normalize_on_device, pinned_copy, pins
from moco_fast.metrics import progress
from moco_fast.run_folder import LINCLS_RESULT, result_beside
from moco_fast.seeded_images import EpochKeys, KeyedImages
from moco_fast.shared_memory import check_room_to_start, start_workers, worker_start
from moco_fast.step import set_lr

log = logging.getLogger("moco_fast")

BACKBONE_PREFIX = "encoder_q.backbone."
PROTOCOL = "linear classification (frozen backbone)"  # a lincls result's "protocol"


class BackboneChangedError(RuntimeError):
    """The frozen backbone differs from the checkpoint after linear classification: a bug."""


@dataclass
class LinclsConfig:
    checkpoint: str  # a training checkpoint, an official MoCo checkpoint or a torchvision state dict (foreign.py)
    data: str | None = None  # a root with train/ and val/ or test/; None: the demo set
    epochs: int = 100
    lr: float = 30.0  # not scaled with the batch (as in the official main_lincls.py)
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "60,80"  # epochs where the lr drops x0.1, or "cos"
    batch_size: int = 256
    workers: int = 4
    image_size: int | None = None  # None: the checkpoint's training size
    cached_features: bool = False
    device: str = "auto"
    amp: str = "auto"
    seed: int = 0
    eval_every: int = 0  # evaluate every N epochs too (0: after the last only); adds the best epoch
    resume: bool = False  # continue the interrupted run whose state lies beside `out`
    out: str | None = None  # JSON result; None: lincls.json beside the checkpoint (run_folder.result_beside)
    arch: str | None = None  # --arch: a torchvision state dict's, where its shapes do not tell it


# -- shared by lincls and finetune --------------------------------------------------------------
def parse_schedule(text: str) -> tuple[int, ...] | None:
    """'60,80' -> (60, 80) (x0.1 at each epoch); 'cos' -> None (half-cosine)."""
    if text.strip().lower() in ("cos", "cosine"):
        return None
    try:
        steps = tuple(int(s) for s in text.split(",") if s.strip())
        if not steps:
            raise ValueError(text)
    except ValueError:
        raise ConfigError(f"--schedule expects epochs like 60,80 or 'cos' (got {text!r})") from None
    if any(s < 1 for s in steps):
        raise ConfigError(f"--schedule epochs must be positive (got {text!r})")
    return steps


def lr_at(base_lr: float, epoch: int, epochs: int, steps: tuple[int, ...] | None) -> float:
    if steps is None:
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return base_lr * 0.1 ** sum(epoch >= s for s in steps)


def train_transform(image_size: int) -> Callable:
    """uint8 3 x S x S: random resized crop + flip (official lincls); evaluation center-crops
    (knn.eval_batches)."""
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.PILToTensor()])


def image_batches(
    images: ImageList,
    image_size: int,
    train: bool,
    batch_size: int,
    workers: int,
    seed: int,
    drop_last: bool = False,
    desc: str = "evaluation",
    device: torch.device | None = None,
) -> DataLoader | EvalBatches:
    """Host uint8 batches (x, y). Evaluation passes (train=False: the eval split, --cached-features)
    leave out images that fail to decode, so that each image counts once, as in kNN (EvalBatches;
    `desc` names the pass in its warning); training replaces them by another image, as pretraining
    does. Training batches: `loader.sampler.set_epoch(e)` before epoch e; the order comes from
    `loader.sampler.generator` (seeded with `seed`, saved by the classifier's state), each image's
    crop and flip from (seed, e, its index) alone (seeded_images), so that any --workers and a resumed
    run draw the same. The workers persist across epochs: the epoch travels with each index. The
    batches come in pinned memory where `device` asks for it (loaders.base.pins)."""
    pin = pins(device)
    if not train:
        return eval_batches(images, image_size, batch_size, workers, desc, pin=pin)
    warn_if_shm_short(workers, batch_size, image_size, "the classifier's training loader")
    loader = DataLoader(
        KeyedImages(ImageDataset(images, train_transform(image_size)), seed),
        batch_size=batch_size,
        sampler=EpochKeys(len(images), torch.Generator().manual_seed(seed)),
        num_workers=workers,
        collate_fn=collate_labeled,
        drop_last=drop_last,
        # the workers' base seed only (their draws are seeded per image): not the order's generator
        # nor the process's stream, which it would advance once per DataLoader iterator
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=workers > 0,
        multiprocessing_context=worker_start(workers),
        pin_memory=pin,
    )
    check_room_to_start(loader)  # its workers start at the first epoch, once (persistent)
    return loader


class Normalizer:
    """uint8 host batch -> normalised fp32 on the device, in the model's memory format."""

    def __init__(self, spec: AugSpec, device: torch.device):
        self.mean, self.std = mean_std_255(spec, device)
        self.fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_on_device(x, self.mean, self.std, torch.float32, self.fmt)


def load_splits_with_eval(data: str | None) -> DataSplits:
    """The train and eval splits; DataError without an eval split or (before the images are listed)
    with a single class, where top-1 would be 100% whatever the network."""
    train_dir, eval_dir = split_dirs(resolve_root(data))
    if eval_dir is None:
        raise DataError("classification needs an eval split: a data root holding train/ and val/ or test/")
    classes = find_classes(train_dir)
    if len(classes) == 1:
        raise DataError(
            f"{train_dir} holds a single class ({classes[0]}): a classifier of one class scores 100% whatever "
            "the backbone; classification needs two class folders or more"
        )
    return load_splits(data, labelled=True)  # with an eval split: split_dirs found it above


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 hits, top-k hits) as device scalars. logits: N x classes; k <= classes."""
    top = logits.topk(k, dim=1).indices  # N x k
    hits = top == labels.unsqueeze(1)
    return hits[:, 0].sum(), hits.any(dim=1).sum()


@torch.no_grad()
def evaluate(
    forward: Callable[[Any], torch.Tensor],
    batches: Iterable,
    device: torch.device,
    num_classes: int,
) -> tuple[float, float, int]:
    """(top-1 %, top-5 %, images evaluated) of `forward(x)` over (x, y) batches; top-5 is
    top-min(5, classes), 100% with 5 classes or fewer (accuracy_text leaves it out). The count
    leaves out the images an evaluation pass could not decode."""
    k = min(5, num_classes)
    c1 = torch.zeros((), dtype=torch.long, device=device)
    ck = torch.zeros((), dtype=torch.long, device=device)
    n = 0
    for x, y in progress_iter(batches, "eval"):
        y = y.to(device, non_blocking=True)
        a, b = topk_correct(forward(x).float(), y, k)
        c1 += a
        ck += b
        n += y.shape[0]
    return c1.item() * 100 / max(n, 1), ck.item() * 100 / max(n, 1), n  # host sync: once per evaluation


def sgd_epoch(
    batches: Iterable,
    loss_of: Callable[[Any, torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    lr: float,
    device: torch.device,
    desc: str,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One training pass of lincls or finetune at `lr`: a step on `loss_of(x, labels on the device)`
    per (x, y) batch, through `scaler` (fp16) when given, under a progress bar named `desc`. The mean
    loss, read once (a host sync per epoch)."""
    set_lr(opt, lr)
    loss_sum = torch.zeros((), device=device)
    n = 0
    for x, y in progress_iter(batches, desc):
        loss = loss_of(x, y.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        loss_sum += loss.detach()
        n += 1
    return loss_sum.item() / max(n, 1)


def autocast_for(device: torch.device, amp_dtype: torch.dtype | None):
    from contextlib import nullcontext

    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()


def feature_width(model: nn.Module) -> int:
    """Width of the pooled backbone features: the input width of the MoCo head's first layer, or (a
    torchvision state dict: no head) the channels of the backbone's last BatchNorm."""
    linear = next((m for m in model.encoder_q.head.modules() if isinstance(m, nn.Linear)), None)
    if linear is not None:
        return linear.in_features
    return [m for m in model.encoder_q.backbone.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


def new_classifier(width: int, num_classes: int) -> nn.Linear:
    fc = nn.Linear(width, num_classes)
    nn.init.normal_(fc.weight, 0.0, 0.01)  # as the official lincls
    nn.init.zeros_(fc.bias)
    return fc


# -- the frozen-backbone check -------------------------------------------------------------------
def backbone_tensors(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The query backbone's tensors of a checkpoint's "model" state (names without prefix)."""
    return {k[len(BACKBONE_PREFIX) :]: v for k, v in model_state.items() if k.startswith(BACKBONE_PREFIX)}


def check_unchanged(backbone: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    """Raise BackboneChangedError unless every tensor (weights and BN statistics) equals `reference`."""
    state = backbone.state_dict()
    missing = sorted(set(reference) ^ set(state))
    changed = [k for k in reference if k in state and not torch.equal(state[k].cpu(), reference[k].cpu())]
    if missing or changed:
        raise BackboneChangedError(
            "the frozen backbone changed during linear classification: "
            + ", ".join((changed + missing)[:5])
            + (f" and {len(changed) + len(missing) - 5} more" if len(changed) + len(missing) > 5 else "")
        )


# -- the protocol --------------------------------------------------------------------------------
@torch.no_grad()
def extract(
    backbone: nn.Module, batches: Iterable, norm: Normalizer, device: torch.device, amp_dtype, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N x D fp32 pooled features, N labels) on the device, for --cached-features."""
    feats, labels = [], []
    for x, y in progress_iter(batches, desc):
        with autocast_for(device, amp_dtype):
            feats.append(backbone(norm(x)).float())
        labels.append(y.to(device, non_blocking=True))  # a blocking copy waited for the batch's forward
    return torch.cat(feats), torch.cat(labels)


def progress_iter(batches: Iterable, desc: str):
    bar = progress(total=len(batches) if hasattr(batches, "__len__") else 0, desc=desc)
    # image_batches' training DataLoader starts its workers here, at the first epoch: checked when it
    # was built; an evaluation pass (EvalBatches) checks and starts its own
    for item in start_workers(batches, check=False):
        yield item
        bar.update(1)
    bar.close()


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, g: torch.Generator | None):
    """--cached-features' epoch: batches of the device-resident features, in a new order each epoch
    where `shuffle`. The order is drawn on the host (`g`, seeded) and copied without the host waiting
    for the GPU (pinned_copy), where a plain copy waited for the last epoch's steps."""
    order = (
        pinned_copy(torch.randperm(x.shape[0], generator=g), x.device)
        if shuffle
        else torch.arange(x.shape[0], device=x.device)
    )
    return TensorBatches(x, y, order.split(batch_size))


@dataclass
class TensorBatches:
    """Batches of `x` and `y` gathered as they are iterated: all of an epoch's at once would be a
    second copy of the cached features on the device (~10 GB of fp32 for ImageNet's 1.28 M x 2048).
    Iterable again (the evaluation's, every epoch) and sized, for the progress bar."""

    x: torch.Tensor
    y: torch.Tensor
    index: tuple[torch.Tensor, ...]

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ((self.x[i], self.y[i]) for i in self.index)


def start_run(cfg: Any) -> tuple[tuple[int, ...] | None, torch.device, torch.dtype | None, float]:
    """What lincls and finetune check and set up first: (lr steps, device, autocast dtype, start time)."""
    from moco_fast.trainer import resolve_amp, resolve_device

    check_at_least("--epochs", cfg.epochs, 1)
    check_at_least("--batch-size", cfg.batch_size, 1)
    steps = parse_schedule(cfg.schedule)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, device)
    torch.manual_seed(cfg.seed)
    return steps, device, amp_dtype, time.perf_counter()


def run_lincls(
    cfg: LinclsConfig, splits: DataSplits | None = None, loaded: LoadedState | None = None
) -> dict[str, Any]:
    """Train and evaluate a linear classifier on the frozen backbone; writes and returns the result.
    `splits`: `cfg.data` as its caller listed it (as load_splits_with_eval does: the sweep, once for
    all its settings), else listed here (wall_s then counts the listing); `loaded`: the state that
    --resume continues as the caller read it (the command's check, the sweep's), else read here."""
    from moco_fast import checkpoint as ckpt
    from moco_fast.checkpoint import load_model
    from moco_fast.foreign import as_training_state

    steps, device, amp_dtype, t0 = start_run(cfg)

    # One read of the checkpoint gives the model, what its backbone must still be at the end, and the
    # stamp that the state between epochs names: a run training on in the checkpoint's folder may
    # rewrite the file meanwhile. (load_state_dict copies: the read tensors stay as read.)
    st = Path(cfg.checkpoint).stat()
    raw = ckpt.load(cfg.checkpoint)
    stamp = ckpt.stamp_of(raw, st)  # a file from elsewhere has no save_id: its mtime and size
    state = as_training_state(raw, cfg.checkpoint, cfg.arch)  # an official MoCo or torchvision file too
    del raw
    model, train_cfg = load_model(cfg.checkpoint, "cpu", state=state, arch=cfg.arch)
    reference = backbone_tensors(state["model"])
    del state
    spec = train_cfg.data.aug
    size = cfg.image_size or spec.image_size
    backbone = model.encoder_q.backbone
    width = feature_width(model)
    del model  # the key encoder, head and queue are not needed
    plain_bn_state(backbone)
    backbone = backbone.to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    if splits is None:
        splits = load_splits_with_eval(cfg.data)
    out = Path(cfg.out) if cfg.out else result_beside(cfg.checkpoint, LINCLS_RESULT)
    listing = listing_fingerprint(splits)
    loaded = check_state(out, cfg, "lincls", listing, loaded)  # other images: refused before the features are extracted
    classes = len(splits.train.classes)
    norm = Normalizer(spec, device)
    fc = new_classifier(width, classes).to(device)
    opt = torch.optim.SGD(fc.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def batches(images: ImageList, train: bool, desc: str = "evaluation") -> DataLoader | EvalBatches:
        return image_batches(images, size, train, cfg.batch_size, cfg.workers, cfg.seed, desc=desc, device=device)

    eval_images = batches(splits.eval, train=False)
    if cfg.cached_features:
        train_feats = batches(splits.train, False, "features (train)")
        train_x, train_y = extract(backbone, train_feats, norm, device, amp_dtype, "features (train)")
        eval_x, eval_y = extract(backbone, eval_images, norm, device, amp_dtype, "features (eval)")
        order = torch.Generator().manual_seed(cfg.seed)
        train_epoch = lambda epoch: tensor_batches(train_x, train_y, cfg.batch_size, True, order)  # noqa: E731
        features = lambda x: x  # noqa: E731
        eval_batches = tensor_batches(eval_x, eval_y, cfg.batch_size, False, None)
    else:
        loader = batches(splits.train, train=True)
        order = loader.sampler.generator

        def train_epoch(epoch: int) -> DataLoader:
            loader.sampler.set_epoch(epoch)
            return loader

        def features(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast_for(device, amp_dtype):
                return backbone(norm(x)).float()  # N x D

        eval_batches = eval_images

    def one_epoch(epoch: int) -> dict[str, Any]:
        lr = lr_at(cfg.lr, epoch, cfg.epochs, steps)
        desc = f"lincls epoch {epoch + 1}/{cfg.epochs}"
        loss = sgd_epoch(train_epoch(epoch), lambda x, y: F.cross_entropy(fc(features(x)), y), opt, lr, device, desc)
        return {"epoch": epoch + 1, "lr": lr, "loss": loss}

    parts = {"classifier": fc, "optimizer": opt}
    loop = EpochLoop("lincls", cfg, out, parts, order, t0, stamp, listing, classes, loaded)
    history = loop.run(one_epoch, lambda: evaluate(lambda x: fc(features(x)), eval_batches, device, classes))
    top1, top5 = history[-1]["top1"], history[-1]["top5"]
    if ckpt.file_stamp(cfg.checkpoint) != stamp:
        log.warning(
            "%s was rewritten during linear classification (trained further?): the result is that of the "
            "checkpoint as it was when lincls read it",
            cfg.checkpoint,
        )
    try:
        check_unchanged(backbone, reference)
    except BackboneChangedError:
        clear_state(out)  # epochs on a backbone that moved are nothing to resume
        raise
    result = result_record(
        PROTOCOL,
        top1,
        top5,
        classes,
        splits,
        size,
        history,
        loop.wall_s(),
        device,
        cfg,
        train_images=len(train_y) if cfg.cached_features else None,
        backbone_unchanged=True,
    )
    write_json(result, out)
    clear_state(out)
    return result


def result_record(
    protocol: str,
    top1: float,
    top5: float,
    classes: int,
    splits,
    size: int,
    history: list[dict[str, Any]],
    wall_s: float,  # the run's seconds, its interrupted parts included
    device: torch.device,
    cfg: Any,
    train_images: int | None = None,  # the decodable ones, where known (cached features)
    **extra: Any,
) -> dict[str, Any]:
    """The JSON record that lincls and finetune write: accuracy, data sizes, history, timing, config."""
    return {
        "protocol": protocol,
        **extra,
        "top1": top1,
        "top5": top5,
        "topk": min(5, classes),
        "num_classes": classes,
        "train_images": len(splits.train) if train_images is None else train_images,
        "eval_images": history[-1].get("eval_images", len(splits.eval)),  # those the last evaluation read
        "eval_split": str(splits.eval.root),  # val/ where the root holds test/ too
        "image_size": size,
        "final_train_loss": history[-1]["loss"],
        **(best_of(history) if cfg.eval_every else {}),
        "history": history,
        "wall_s": wall_s,
        "device": str(device),
        "config": asdict(cfg),
        "continued_by": run_by(),  # the sweep's classifier: its line (sweep_eval.refuse_others_files)
    }


def write_json(obj: dict[str, Any], path: Path) -> None:
    from moco_fast.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2))
