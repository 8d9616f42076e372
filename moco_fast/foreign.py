"""Checkpoints from elsewhere, read as a training checkpoint's "model" and "config", so that knn,
lincls, finetune and export evaluate them with the same protocol as ours:

- an official MoCo checkpoint (facebookresearch/moco's main_moco.py: {"epoch", "arch", "state_dict",
  "optimizer"}, the query encoder under `module.encoder_q.` with torchvision ResNet names, its head as
  `fc` (v1: one Linear; v2: `fc.0`, `fc.2`), the key encoder and the queue beside it; `export --format
  moco`: {"arch", "state_dict"} with the query encoder alone): the query encoder's backbone and head,
  ImageNet stem;
- a plain torchvision ResNet state dict (`export --format torchvision`, finetune's network,
  torchvision's own weights saved with torch.save; a `module.` prefix or a {"state_dict": ...} wrapper
  as DataParallel and the official main_lincls.py leave them): the backbone alone, its `fc` (a
  classifier, not a MoCo head) left out. The arch comes from --arch or from the tensor shapes.

Neither has an augmentation recipe: the evaluations use MoCo v2's (224 px, ImageNet mean and std),
or the CIFAR preset's for a CIFAR-stem backbone (a 3 x 3 conv1).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch

from moco_fast.config import ConfigError, build_config, to_dict
from moco_fast.data import DataError

log = logging.getLogger("moco_fast")

OFFICIAL_PREFIXES = ("module.encoder_q.", "encoder_q.")  # DDP's main_moco.py; a single-process save
HEADLESS = "headless"  # a converted state's flag: the network has no MoCo head (its head is Identity)
# a converted state's start, as a finetune result's "init" names it: "moco" (an official MoCo checkpoint) or
# "torchvision" (a plain state dict, which says nothing of what trained it); a training checkpoint has none: "moco"
INIT = "init"

# What shapes may name (arch inference): torchvision's ResNet family and the paper's wider ResNet-50s.
KNOWN_ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "resnet50w2",
    "resnet50w4",
)


def is_training_state(state: dict[str, Any]) -> bool:
    return "model" in state and "config" in state


def as_training_state(
    state: dict[str, Any], path: str | Path, arch: str | None = None, say: bool = True
) -> dict[str, Any]:
    """`state` itself for a moco-fast training checkpoint; for an official MoCo checkpoint or a
    torchvision ResNet state dict, {"model": MoCo state dict (encoder_q.backbone.*, encoder_q.head.*
    where there is a head), "config": a TrainConfig dict, HEADLESS: bool, "source": what was read, INIT}.
    `arch` (--arch): the architecture of a state dict that does not name one; it must match one that
    does. `say`: one log line naming what was read. A one-line DataError for anything else."""
    if is_training_state(state):
        return state
    query = official_query_encoder(state)
    if query is not None:
        named = state.get("arch") if isinstance(state.get("arch"), str) else None
        backbone = {k: v for k, v in query.items() if not k.startswith("fc.")}
        head, mlp = official_head({k[3:]: v for k, v in query.items() if k.startswith("fc.")})
        if named is not None and arch is not None and arch != named:
            raise ConfigError(f"--arch {arch} contradicts the checkpoint, a {named} (leave --arch out)")
        if named is None:  # a save that does not name its arch (not main_moco.py's): --arch is checked as below
            check_given_arch(backbone, arch, "imagenet", path)
        arch = named or arch or infer_arch(backbone, "imagenet", path)
        epoch = state.get("epoch")
        source = f"official MoCo checkpoint, {arch}" + (f", epoch {epoch}" if isinstance(epoch, int) else "")
        what = "the query encoder's backbone" + (" and head" if head else " (its head is not MoCo's: no head figures)")
        stem, init = "imagenet", "moco"
    else:
        backbone = torchvision_backbone(state)
        if backbone is None:
            raise DataError(f"{path} is not a checkpoint moco-fast can read: {found(state)}")
        stem = "cifar" if backbone["conv1.weight"].shape[-1] == 3 else "imagenet"
        check_given_arch(backbone, arch, stem, path)
        arch = arch or infer_arch(backbone, stem, path)
        head, mlp, init = {}, False, "torchvision"
        source = f"torchvision {arch} state dict" + (" (CIFAR stem)" if stem == "cifar" else "")
        what = "the backbone (it has no MoCo head)"
    if say:
        log.info("%s: %s: %s", path, source, what)
    return {**training_state(with_bn_counts(backbone), head, arch, stem, mlp, source), INIT: init}


def training_state(
    backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor], arch: str, stem: str, mlp: bool, source: str
) -> dict[str, Any]:
    """A MoCo of the end-to-end mechanism (no key encoder, an empty queue: nothing but the query
    encoder to build) holding `backbone` and `head` (HEADLESS without one)."""
    dim = head["2.weight" if mlp else "weight"].shape[0] if head else 128
    cfg = build_config("cifar" if stem == "cifar" else "v2" if mlp or not head else "v1")
    cfg.model.arch, cfg.model.stem, cfg.model.dim, cfg.model.mlp = arch, stem, dim, mlp
    cfg.moco.mechanism = "end-to-end"
    model = {f"encoder_q.backbone.{k}": v for k, v in backbone.items()}
    model.update({f"encoder_q.head.{k}": v for k, v in head.items()})
    model["queue"] = torch.zeros(0, dim)
    model["queue_ptr"] = torch.zeros((), dtype=torch.long)
    return {"model": model, "config": to_dict(cfg), HEADLESS: not head, "source": source}


def official_query_encoder(state: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The query encoder's tensors (torchvision names, fc included) of an official MoCo checkpoint,
    or None when `state` is not one."""
    sd = state.get("state_dict")
    if not isinstance(sd, dict):
        return None
    for prefix in OFFICIAL_PREFIXES:
        query = {k[len(prefix) :]: v for k, v in sd.items() if isinstance(k, str) and k.startswith(prefix)}
        if "conv1.weight" in query:
            return query
    return None


def official_head(fc: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """(the head's tensors in build_head's names, whether it is v2's MLP) from the official `fc.*`
    tensors (their names without `fc.`); ({}, False) for a head of another shape."""
    if set(fc) == {"weight", "bias"}:
        return fc, False  # v1: one Linear, build_head's names
    if set(fc) == {"0.weight", "0.bias", "2.weight", "2.bias"}:
        return fc, True  # v2: Linear-ReLU-Linear, the same indices as build_head's Sequential
    return {}, False


def torchvision_backbone(state: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """A torchvision ResNet state dict's tensors without fc.* (a `module.` prefix and a
    {"state_dict": ...} wrapper removed), or None when `state` is not one."""
    sd = state.get("state_dict") if isinstance(state.get("state_dict"), dict) else state
    keys = [k for k in sd if isinstance(k, str)]
    if len(keys) != len(sd) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        return None
    if keys and all(k.startswith("module.") for k in keys):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if "conv1.weight" not in sd or "layer1.0.conv1.weight" not in sd:
        return None
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def with_bn_counts(backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`backbone` with a zero `num_batches_tracked` for every BatchNorm that lacks one (torchvision's
    older weight files have none), so that it holds exactly the keys of the model's state dict."""
    out = dict(backbone)
    for k in backbone:
        if k.endswith(".running_mean"):
            out.setdefault(k[: -len("running_mean")] + "num_batches_tracked", torch.tensor(0))
    return out


def check_given_arch(backbone: dict[str, torch.Tensor], arch: str | None, stem: str, path: str | Path) -> None:
    """A one-line error when --arch (`arch`, None: not given) does not fit the tensors of a file that
    does not name its arch, before its network is built of that arch and fails to load them."""
    if arch is not None and not fits(backbone, arch, stem):
        raise ConfigError(f"--arch {arch}: the tensors of {path} are not a {arch}'s; leave --arch out")


def infer_arch(backbone: dict[str, torch.Tensor], stem: str, path: str | Path) -> str:
    """The KNOWN_ARCHS name whose backbone has exactly these tensor names and shapes; a one-line
    error asking for --arch when none or several do."""
    matches = [name for name in KNOWN_ARCHS if fits(backbone, name, stem)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"{path}: its tensors fit {' and '.join(matches)}: give --arch")
    raise ConfigError(f"{path}: its tensors fit none of {', '.join(KNOWN_ARCHS)}: give --arch")


def fits(backbone: dict[str, torch.Tensor], arch: str, stem: str) -> bool:
    """Whether `arch`'s backbone (`stem`) has exactly the tensor names and shapes of `backbone`."""
    given = {k: tuple(v.shape) for k, v in backbone.items() if not k.endswith("num_batches_tracked")}
    return dict(backbone_shapes(arch, stem)) == given


@functools.cache
def backbone_shapes(arch: str, stem: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of each tensor of `arch`'s backbone but the BatchNorm counts (built on the meta
    device: no memory, no initialisation; ~0.1-0.6 s each on a CPU, so kept)."""
    from moco_fast.backbone import build_backbone

    with torch.device("meta"):
        net, _ = build_backbone(arch, stem)
    return tuple((k, tuple(v.shape)) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked"))


def found(state: dict[str, Any]) -> str:
    """What a dict that is no checkpoint moco-fast reads holds, in a few words."""
    command = state.get("command")
    if command in ("lincls", "finetune") and "history" in state:  # classifier_epochs' state between epochs
        return (
            f"it is the state of an interrupted {command} run, kept between its epochs: "
            f"`moco-fast {command} --resume` with that run's flags finishes it"
            + (" and writes the fine-tuned network" if command == "finetune" else "")
        )
    keys = [str(k) for k in state]
    shown = ", ".join(repr(k) for k in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    return (
        f"a dict with the keys {shown or '(none)'}; not a moco-fast training checkpoint (model, config), an "
        "official MoCo checkpoint (state_dict with module.encoder_q.*) or a torchvision ResNet state dict"
    )


def has_head(model: torch.nn.Module) -> bool:
    """Whether a MoCo from load_model has a MoCo head (a torchvision state dict has none: Identity)."""
    return not isinstance(model.encoder_q.head, torch.nn.Identity)
