"""Export the query backbone (`--format moco`: the query encoder, its head too) for downstream use.

- torchvision: a plain ResNet state dict (`conv1.weight`, `layer1.0.bn1.running_mean`, ...), which
  `torchvision.models.<arch>()` loads with `strict=False`, only `fc.weight`/`fc.bias` missing.
  SplitBatchNorm2d holds ordinary BN state, so nothing is renamed. A CIFAR-stem backbone exports
  too, but its `conv1` is 3x3 and it has no max-pool: rebuild that stem before loading. The paper's
  wider ResNet-50s (resnet50w2/w4) are not in torchvision: `moco_fast.backbone.resnet(arch)` builds
  them, with torchvision's class and names.
- detectron2: the official MoCo `detection/convert-pretrain-to-detectron2.py` naming: the stem under
  `stem.`, `layerN` -> `res{N+1}`, `bnK` -> `convK.norm`, `downsample.0/1` -> `shortcut` /
  `shortcut.norm`; numpy arrays in a pickled dict with `__author__: "MOCO"` and
  `matching_heuristics: True`, pickled so that any numpy reads them (PortablePickler). detectron2
  has no CIFAR stem, so that export is refused. A wider ResNet-50 keeps the names; detectron2's
  config gives it its widths, as it gives any ResNet but R-50 its depth or widths
  (commands/export.loading_notes).
- moco: the official MoCo checkpoint's layout (main_moco.py's save), which the official
  main_lincls.py `--pretrained` and detection/convert-pretrain-to-detectron2.py read (moco_checkpoint).
  Their networks are torchvision's, ImageNet stem: a CIFAR stem is refused.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moco_fast.backbone import plain_bn_state, resolve_stem
from moco_fast.config import ConfigError

FORMATS = ("torchvision", "detectron2", "moco")

# The formats whose readers build torchvision's ImageNet stem only, and why a CIFAR stem is refused there
IMAGENET_STEM_ONLY = {
    "detectron2": "detectron2 has no CIFAR stem (3x3 conv, no max-pool)",
    "moco": "the official MoCo scripts build torchvision's ResNets, whose stem is not a CIFAR one (3x3 conv, "
    "no max-pool)",
}


def backbone_state(backbone: nn.Module, fc: nn.Linear | None = None) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state dict (CPU tensors, plain BN names) of one of our backbones, whose
    fc is an Identity: without `fc` no fc keys (torchvision's fc stays at its init); with a trained
    classifier (finetune) its fc.weight/fc.bias, so that torchvision.models.<arch>(num_classes=...)
    loads it strictly (ImageNet stem)."""
    plain = copy.deepcopy(backbone).cpu()
    plain_bn_state(plain)
    state = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    if fc is not None:
        state["fc.weight"] = fc.weight.detach().cpu().clone()
        state["fc.bias"] = fc.bias.detach().cpu().clone()
    return state


def torchvision_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return backbone_state(model.encoder_q.backbone)


def detectron2_name(key: str) -> str:
    """One torchvision ResNet key in detectron2's naming (the official MoCo conversion's rules)."""
    if "layer" not in key:
        key = "stem." + key  # conv1.weight -> stem.conv1.weight, bn1.* -> stem.conv1.norm.*
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    key = key.replace("downsample.0", "shortcut")
    return key.replace("downsample.1", "shortcut.norm")


class PortablePickler(pickle.Pickler):
    """Pickles a numpy array as numpy.ndarray(shape, dtype, bytearray): numpy 2's own pickle names
    numpy._core.multiarray._reconstruct, a module that numpy before 1.26.1 does not have, and
    detectron2's environments often pin an older numpy, which then cannot unpickle the export.
    numpy.ndarray and builtins.bytearray unpickle in any numpy, as a writable array of the same
    values (detectron2's torch.from_numpy shares its memory)."""

    # Protocol 4, the default before Python 3.14: at 5 (3.14's) the bytes go out as a bytearray
    # opcode that names no builtins.bytearray, and Pythons before 3.8 cannot read the file at all
    PROTOCOL = 4

    def __init__(self, fh) -> None:
        super().__init__(fh, protocol=self.PROTOCOL)

    def reducer_override(self, obj):
        if type(obj) is np.ndarray:
            return np.ndarray, (obj.shape, obj.dtype.str, bytearray(np.ascontiguousarray(obj).tobytes()))
        return NotImplemented


def detectron2_checkpoint(model: nn.Module) -> dict[str, Any]:
    state = torchvision_state(model)
    return {
        "model": {detectron2_name(k): v.numpy() for k, v in state.items()},
        "__author__": "MOCO",
        "matching_heuristics": True,
    }


def moco_checkpoint(model: nn.Module, arch: str) -> dict[str, Any]:
    """The query encoder as main_moco.py saves it: {"arch", "state_dict"}, its tensors named
    `module.encoder_q.<torchvision name>` (DDP's prefix), the head as `fc` (v1's Linear, v2's MLP as
    fc.0/fc.2: build_head's indices) where the model has one. What the official scripts read of it:
    main_lincls.py --pretrained loads module.encoder_q.* but fc into torchvision.models.<its --arch>()
    (strict=False, asserting that only fc.weight and fc.bias are missing; its sanity check finds each
    other tensor by this name, BN counts included); convert-pretrain-to-detectron2.py renames every
    module.encoder_q.* (the head's too, which detectron2 leaves unused). Neither reads "arch" or
    "epoch": "arch" is kept so that moco-fast reads the file back as that arch (foreign.py). No key
    encoder, queue or optimizer: nothing reads them."""
    from moco_fast.foreign import has_head

    query = torchvision_state(model)
    if has_head(model):
        query.update({f"fc.{k}": v.detach().cpu().clone() for k, v in model.encoder_q.head.state_dict().items()})
    return {"arch": arch, "state_dict": {f"module.encoder_q.{k}": v for k, v in query.items()}}


def export(
    checkpoint: str | Path, fmt: str, output: str | Path, force: bool = False, arch: str | None = None
) -> dict[str, Any]:
    """Write the export of a training checkpoint, an official MoCo checkpoint or a torchvision state
    dict (`arch`: --arch, foreign.py); returns {"format", "output", "keys", "part" (what the keys are
    of), "arch", "stem"}."""
    from moco_fast.checkpoint import atomic_write, load_model, remove_ended_writers_temporaries, save_atomic

    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    output = Path(output)
    remove_ended_writers_temporaries(output)  # a killed export's checkpoint-sized temporary file
    # a symbolic link there, to a file or to nothing, is replaced by the export (the rename of
    # atomic_write), its target left as it is, as convert's DST: only with force (a link to nothing
    # was replaced without it)
    if (output.exists() or output.is_symlink()) and not force:
        raise FileExistsError(f"{output} exists: pass --force to overwrite it")
    model, cfg = load_model(checkpoint, "cpu", arch=arch)
    stem = resolve_stem(cfg.model.stem, cfg.data.aug.image_size)
    if stem == "cifar" and fmt in IMAGENET_STEM_ONLY:
        raise ConfigError(
            f"{IMAGENET_STEM_ONLY[fmt]}: this backbone cannot be exported with --format {fmt}; use --format torchvision"
        )
    part = "query backbone"
    if fmt == "detectron2":
        obj = detectron2_checkpoint(model)
        keys = len(obj["model"])
        atomic_write(output, lambda fh: PortablePickler(fh).dump(obj))
    elif fmt == "moco":
        obj, part = moco_checkpoint(model, cfg.model.arch), "query encoder"
        keys = len(obj["state_dict"])
        save_atomic(obj, output)
    else:
        state = torchvision_state(model)
        keys = len(state)
        save_atomic(state, output)
    return {"format": fmt, "output": str(output), "keys": keys, "part": part, "arch": cfg.model.arch, "stem": stem}
