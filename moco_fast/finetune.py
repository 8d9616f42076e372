"""End-to-end fine-tuning (the paper's comparison of MoCo initialisation with random init).

Every layer trains, BatchNorm included (train mode, plain per-batch statistics). The same schedule
runs from the MoCo backbone or, with `from_scratch`, from a random initialisation of the same
architecture: the baseline the paper compares against.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moco_fast.augment import AUG_PRESETS
from moco_fast.backbone import build_backbone, plain_bn_state, resolve_stem
from moco_fast.classifier_epochs import EpochLoop, LoadedState, clear_state
from moco_fast.config import SCRATCH_ARCH, ConfigError
from moco_fast.data import DataError
from moco_fast.data_listing import listing_fingerprint
from moco_fast.lincls import (
    Normalizer,
    autocast_for,
    evaluate,
    feature_width,
    image_batches,
    load_splits_with_eval,
    lr_at,
    new_classifier,
    result_record,
    sgd_epoch,
    start_run,
    write_json,
)
from moco_fast.run_folder import FINETUNE_RESULTS, result_beside
from moco_fast.step import fast_sgd

log = logging.getLogger("moco_fast")

PROTOCOL = "end-to-end fine-tuning"  # a finetune result's "protocol"


@dataclass
class FinetuneConfig:
    # a training checkpoint, an official MoCo checkpoint or a torchvision state dict (foreign.py); optional
    # with from_scratch
    checkpoint: str | None = None
    data: str | None = None
    from_scratch: bool = False  # random init of the same architecture: the baseline
    # with from_scratch and no checkpoint (None: SCRATCH_ARCH); with one, None or the checkpoint's (a
    # torchvision state dict's, where its shapes do not tell it)
    arch: str | None = None
    stem: str = "auto"
    epochs: int = 90
    lr: float = 0.1  # for a batch of 256, scaled linearly with --batch-size
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cos"  # "cos", or epochs where the lr drops x0.1 (e.g. 30,60,80)
    batch_size: int = 256
    workers: int = 4
    image_size: int | None = None  # None: the checkpoint's training size (224 without one)
    device: str = "auto"
    amp: str = "auto"
    seed: int = 0
    eval_every: int = 0  # evaluate every N epochs too (0: after the last only); adds the best epoch
    resume: bool = False  # continue the interrupted run whose state lies beside `out`
    out: str | None = None  # JSON result; None: finetune.json (finetune_scratch.json) beside the checkpoint


def check_args(cfg: FinetuneConfig) -> None:
    """ConfigError, before the data is listed, for a batch that BatchNorm cannot train on and, without
    a checkpoint, for an --arch or --stem that `build_network` would refuse after listing it."""
    if cfg.batch_size < 2:
        raise ConfigError(
            f"--batch-size must be at least 2 for fine-tuning (got {cfg.batch_size}): BatchNorm trains on "
            "the statistics of each batch, which one image does not give"
        )
    if cfg.checkpoint is None:
        with torch.device("meta"):  # the network's checks, without its memory or its initialisation
            build_backbone(cfg.arch or SCRATCH_ARCH, resolve_stem(cfg.stem, cfg.image_size or 224))


def build_network(cfg: FinetuneConfig, num_classes: int):
    """(backbone + linear classifier as one nn.Sequential, AugSpec, image size, what it started from
    ("moco", "scratch", or "torchvision": a plain state dict, which may hold anything's weights),
    the `cfg` that ran: with a checkpoint, its architecture and stem, whatever --arch/--stem said)."""
    if cfg.checkpoint is None:
        if not cfg.from_scratch:
            raise ConfigError("--checkpoint is required (or --from-scratch for the random-init baseline)")
        size = cfg.image_size or 224
        spec = AUG_PRESETS["cifar" if size <= 64 else "v2"]
        stem = resolve_stem(cfg.stem, size)
        backbone, width = build_backbone(cfg.arch or SCRATCH_ARCH, stem)
        ran = replace(cfg, arch=cfg.arch or SCRATCH_ARCH, stem=stem)
        return nn.Sequential(backbone, new_classifier(width, num_classes)), spec, size, "scratch", ran

    from moco_fast.checkpoint import load, load_model
    from moco_fast.foreign import INIT, as_training_state

    state = as_training_state(load(cfg.checkpoint), cfg.checkpoint, cfg.arch)  # what it is, for the result's "init"
    model, train_cfg = load_model(cfg.checkpoint, "cpu", state=state, arch=cfg.arch)
    spec = train_cfg.data.aug
    size = cfg.image_size or spec.image_size
    width = feature_width(model)
    m = train_cfg.model
    ran = replace(cfg, arch=m.arch, stem=resolve_stem(m.stem, spec.image_size))
    if cfg.from_scratch:
        backbone, _ = build_backbone(ran.arch, ran.stem)
        start = "scratch"
    else:
        backbone = model.encoder_q.backbone
        plain_bn_state(backbone)  # fine-tuning uses ordinary per-batch BN statistics
        start = state.get(INIT, "moco")
    return nn.Sequential(backbone, new_classifier(width, num_classes)), spec, size, start, ran


def fine_tune(cfg: FinetuneConfig, loaded: LoadedState | None = None) -> tuple[dict[str, Any], nn.Module]:
    """(result, the fine-tuned backbone + classifier in eval mode). Its state between epochs stays
    beside the result until the caller has written what it keeps (run_finetune does). `loaded`: the
    state that --resume continues as the command's check read it, else read here."""
    steps, device, amp_dtype, t0 = start_run(cfg)
    check_args(cfg)

    splits = load_splits_with_eval(cfg.data)
    classes = len(splits.train.classes)
    net, spec, size, start, ran = build_network(cfg, classes)
    net = net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    norm = Normalizer(spec, device)
    base_lr = cfg.lr * cfg.batch_size / 256
    opt = fast_sgd(net.parameters(), device, lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # drop_last: a last batch of one image would break BatchNorm in train mode.
    loader = image_batches(
        splits.train, size, True, cfg.batch_size, cfg.workers, cfg.seed, drop_last=True, device=device
    )
    if len(loader) < 1:
        raise DataError(
            f"{len(splits.train)} training images give no full batch of {cfg.batch_size}: lower --batch-size"
        )

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast_for(device, amp_dtype):
            return F.cross_entropy(net(norm(x)).float(), y)

    def one_epoch(epoch: int) -> dict[str, Any]:
        net.train()
        lr = lr_at(base_lr, epoch, cfg.epochs, steps)
        desc = f"finetune epoch {epoch + 1}/{cfg.epochs}"
        loader.sampler.set_epoch(epoch)
        return {"epoch": epoch + 1, "lr": lr, "loss": sgd_epoch(loader, loss_of, opt, lr, device, desc, scaler)}

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast_for(device, amp_dtype):
            return net(norm(x))

    eval_batches = image_batches(splits.eval, size, False, cfg.batch_size, cfg.workers, cfg.seed, device=device)

    def evaluate_now() -> tuple[float, float, int]:
        net.eval()
        return evaluate(forward, eval_batches, device, classes)

    parts = {"network": net, "optimizer": opt, "scaler": scaler}
    out, listing = result_path(cfg), listing_fingerprint(splits)
    generator = loader.sampler.generator
    loop = EpochLoop("finetune", cfg, out, parts, generator, t0, data_listing=listing, classes=classes, loaded=loaded)
    history = loop.run(one_epoch, evaluate_now)
    net.eval()
    top1, top5 = history[-1]["top1"], history[-1]["top5"]
    result = result_record(PROTOCOL, top1, top5, classes, splits, size, history, loop.wall_s(), device, ran, init=start)
    return result, net


def run_finetune(
    cfg: FinetuneConfig, model_path: Path | None, loaded: LoadedState | None = None
) -> tuple[dict[str, Any], nn.Module]:
    """fine_tune (`loaded`: its), then its outputs: the network as a torchvision state dict at
    `model_path` (when given) and the result JSON; the state kept between epochs goes only once both
    are written."""
    from moco_fast.checkpoint import save_atomic
    from moco_fast.export import backbone_state

    res, net = fine_tune(cfg, loaded)
    if model_path is not None:
        save_atomic(backbone_state(net[0], net[1]), model_path)
        res["model"] = os.path.abspath(model_path)  # what a rerun may replace (commands.network_of)
    out = result_path(cfg)
    write_json(res, out)
    clear_state(out)
    return res, net


def result_path(cfg: FinetuneConfig) -> Path:
    """--out, else the name of a run from MoCo (a torchvision state dict's too) or from scratch."""
    name = FINETUNE_RESULTS["scratch" if cfg.from_scratch else "moco"]
    if cfg.out:
        return Path(cfg.out)
    if cfg.checkpoint:
        return result_beside(cfg.checkpoint, name)
    return Path(name)
