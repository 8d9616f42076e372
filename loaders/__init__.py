"""One loader registry. Every backend takes a `LoaderArgs` and yields `Batch`es: two augmented views
on the training device, in the trainer's dtype and memory format, plus labels and sample indices.

Backends register themselves with `@register_loader(name)`; `create_loader(name, args)` imports the
backend module on first use, so a missing optional dependency (DALI, FFCV) only matters when asked for.
"""

from __future__ import annotations

import importlib

from moco_fast.config import ConfigError

from .base import Batch, LoaderArgs, TrainLoader

_LOADERS: dict = {}
# Backend name -> module that registers it (imported lazily: DALI and FFCV are optional).
_MODULES = {
    "torch": ".torch_loader",
    "synthetic": ".synthetic",
    "dali": ".dali",
    "ffcv": ".ffcv",
    "resident": ".resident",
}

# Backends that read an image folder (class subfolders, train/ and val/ or test/): the kNN monitor and
# the demo set work with them.
IMAGE_FOLDER_LOADERS = ("torch", "dali", "resident")


def register_loader(name: str):
    def deco(fn):
        _LOADERS[name] = fn
        return fn

    return deco


def available_loaders() -> list[str]:
    return sorted(_MODULES)


def create_loader(name: str, args: LoaderArgs) -> TrainLoader:
    if name not in _MODULES:
        raise ConfigError(f"unknown loader {name!r}; choose one of {available_loaders()}")
    if name not in _LOADERS:
        importlib.import_module(_MODULES[name], __name__)
    return _LOADERS[name](args)


__all__ = [
    "IMAGE_FOLDER_LOADERS",
    "Batch",
    "LoaderArgs",
    "TrainLoader",
    "available_loaders",
    "create_loader",
    "register_loader",
]
