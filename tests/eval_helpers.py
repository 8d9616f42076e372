"""What the evaluation test files share (not a test module: pytest does not collect it): the tiny
training settings of their checkpoints, a classifier run interrupted at an epoch, the backbone
a checkpoint holds and the files torch.load reads."""

from __future__ import annotations

from pathlib import Path

import torch

from moco_fast.checkpoint import load
from moco_fast.lincls import backbone_tensors

TINY = {
    "model.arch": "resnet18",
    "model.stem": "imagenet",
    "moco.k": 16,
    "moco.bn_splits": 2,
    "optim.batch_size": 8,
    "optim.epochs": 1,
    "runtime.device": "cpu",
    "data.workers": 0,
    "runtime.final_knn": False,
}


def interrupt_at(monkeypatch, module, epoch):
    """Ctrl-C at the start of `epoch` (0-based) of lincls or finetune."""
    real = module.lr_at

    def lr_at(lr, e, *args):
        if e == epoch:
            raise KeyboardInterrupt
        return real(lr, e, *args)

    monkeypatch.setattr(module, "lr_at", lr_at)


def checkpoint_backbone_state(path):
    """The query backbone's tensors as stored in a training checkpoint (names without prefix)."""
    return backbone_tensors(load(path)["model"])


def state_reads(monkeypatch) -> list[tuple[str, bool | None]]:
    """The files torch.load reads from now on, each as (name, mmap)."""
    real_load, reads = torch.load, []

    def counted(f, *args, **kwargs):
        reads.append((Path(f).name, kwargs.get("mmap")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    return reads
