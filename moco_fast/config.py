"""Nested dataclass configs. Each default lives here once; presets only override fields.

The resolved config is written to `<out>/config.json` by the trainer and stored in checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from moco_fast.augment import AUG_PRESETS, AugSpec


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    # "imagenet": the torchvision stem (7x7 conv, stride 2, max-pool); "cifar": 3x3 conv, no pool.
    # "auto" picks "cifar" for images of 64 px or less.
    stem: str = "auto"
    dim: int = 128
    mlp: bool = True


# `finetune --from-scratch`'s network without a checkpoint or --arch: here, where the command's --help
# reads it without importing torch, and where moco_fast.finetune falls back on it.
SCRATCH_ARCH = "resnet50"


@dataclass
class MoCoConfig:
    # "moco": momentum encoder + queue; "memory-bank": one momentum-updated feature per image;
    # "end-to-end": keys from the query encoder, the current batch is the only set of negatives.
    mechanism: str = "moco"
    k: int = 65536
    m: float = 0.999
    t: float = 0.2
    symmetric: bool = False
    shuffle_bn: bool = True
    # Sub-batches with their own BN statistics that emulate the paper's 8 GPUs on one device.
    bn_splits: int = 8
    # Memory-bank momentum (Wu et al. 2018).
    bank_m: float = 0.5
    # Shuffle BN across processes: "alltoall" sends each rank only the images it needs, "allgather"
    # gathers every image everywhere (the official code's exchange). Both use the same balanced
    # permutation (each key batch holds N/W images of every rank; the official one is uniform over
    # the global batch), so the keys are the same either way: a speed choice.
    shuffle_exchange: str = "alltoall"


@dataclass
class OptimConfig:
    epochs: int = 200
    batch_size: int = 256  # per process; the learning rate scales with the global batch
    lr: float = 0.03  # for a global batch of 256; scaled by global_batch / 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # "cosine" or "step"
    lr_steps: tuple[float, ...] = (0.6, 0.8)  # fractions of the run, for "step"


@dataclass
class DataConfig:
    data: str | None = None  # None: the demo set shipped in the package
    loader: str = "torch"
    workers: int = -1  # data loading processes per training process; -1: auto (see resolve_workers)
    aug: AugSpec = field(default_factory=AugSpec)
    synthetic_steps: int = 100  # steps per epoch of the synthetic loader
    loader_options: dict[str, str] = field(default_factory=dict)  # backend-specific, see each loader
    # the module whose register_loader made `loader` (a library user's, not a built-in one): trainer.train
    # records it, and `train --resume` of such a run, which cannot import it, names it (commands.train)
    loader_module: str | None = None


# --seed's range: numpy's global generator takes no seed outside 0..2**32-1, and torch's none above
# 2**64-1 (a traceback at the run's start, not a one-line error); checkpoint.seed_everything gives
# numpy what the rank and epoch add to it modulo 2**32
MAX_SEED = 2**32 - 1

# --image-size's largest: fine-tuning at high resolution goes to 1024 px or so, and a 4096 px crop is
# already 200 MiB an image in fp32; past it a size is a typo (22400 for 224: 6 GiB an image), which
# ran until the batches' allocation failed or swapped the machine, not a one-line error
MAX_IMAGE_SIZE = 4096


@dataclass
class RuntimeConfig:
    device: str = "auto"  # "cpu", "cuda", "cuda:N" or "auto"
    amp: str = "auto"  # "bf16", "fp16", "off"; "auto": bf16 on CUDA, off on the CPU
    channels_last: bool = True
    compile: bool = False
    cuda_graph: bool = False  # capture the whole step as a CUDA graph (step.GraphedStep)
    seed: int = 0
    out: str = "runs/moco"
    resume: str | None = None  # "auto" (last checkpoint in out) or a path
    force: bool = False  # start over in an --out that holds another run
    knn_every: int = 0
    final_knn: bool = True  # kNN after the last epoch when the data has an eval split
    knn_baseline: bool = False  # also the kNN of a randomly initialised backbone, for comparison
    knn_k: int = 200
    knn_t: float = 0.1
    log_every: int = 10  # steps between host syncs for the progress bar (and where a stop is acted on)
    # minutes between checkpoints within an epoch (rank 0's clock, read at the host syncs); 0: at
    # epoch ends and stops only
    save_every: float = 30.0
    gpus: int = 1
    sync_bn: bool = False


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    preset: str = "v2"


def as_run(cfg: TrainConfig, world: int) -> TrainConfig:
    """The config as `world` processes run it, what config.json and --print-config record: --sync-bn
    across several processes replaces shuffle BN (SyncBatchNorm's statistics span the global batch
    wherever each image sits, so shuffling the keys would change nothing and cost traffic)."""
    if not sync_bn_replaces_shuffle_bn(cfg.runtime.sync_bn, world, cfg.moco.shuffle_bn):
        return cfg
    return dataclasses.replace(cfg, moco=dataclasses.replace(cfg.moco, shuffle_bn=False))


def sync_bn_replaces_shuffle_bn(sync_bn: bool, world: int, shuffle_bn: bool) -> bool:
    """as_run's rule, also read on a saved config's dict (resume.saved_as_run)."""
    return bool(sync_bn and world > 1 and shuffle_bn)


class ConfigError(ValueError):
    """Settings that contradict each other or the machine: the CLI prints it as one line."""


def check_at_least(flag: str, value: float, least: float, note: str = "") -> None:
    """A ConfigError "FLAG must be at least LEAST (got VALUE)" (and `note`) where `value` is below
    `least`: the one wording of every command's lower bounds, which were written out (and worded)
    apart in each."""
    if value < least:
        raise ConfigError(f"{flag} must be at least {least} (got {value}){note}")


def check_image_size(size: int) -> None:
    """--image-size in 8..MAX_IMAGE_SIZE, else a ConfigError: the one check of train, sweep and the
    bench (trainer.validate) and of lincls and finetune (commands.check_classifier_args)."""
    check_at_least("--image-size", size, 8)
    if size > MAX_IMAGE_SIZE:
        raise ConfigError(f"--image-size must be at most {MAX_IMAGE_SIZE} (got {size})")


# Presets: overrides on top of the dataclass defaults, as dotted names.
PRESETS: dict[str, dict[str, Any]] = {
    # MoCo v1: linear head, T=0.07, step schedule at 120/160 of 200 epochs, v1 augmentations.
    "v1": {"model.mlp": False, "moco.t": 0.07, "optim.schedule": "step"},
    # MoCo v2: MLP head, T=0.2, cosine schedule, blur.
    "v2": {},
    # The official MoCo CIFAR-10 demo (ResNet-18, CIFAR stem, 128-d linear head, split BN with 8
    # splits, K 4096, m 0.99, T 0.1, batch 512, lr 0.06 cosine, wd 5e-4).
    "cifar": {
        "model.arch": "resnet18",
        "model.stem": "cifar",
        "model.mlp": False,
        "moco.k": 4096,
        "moco.m": 0.99,
        "moco.t": 0.1,
        "optim.batch_size": 512,
        "optim.lr": 0.06 * 256 / 512,
        "optim.weight_decay": 5e-4,
    },
    # `moco-fast train` with no --data: the CIFAR-10 demo set on a laptop-class CPU in minutes. The
    # ImageNet stem (stride 4 before layer1) makes a ResNet-18 step ~10x cheaper at 32 px than the
    # CIFAR stem, which buys many more epochs in the same time.
    "demo": {
        "model.arch": "resnet18",
        "model.stem": "imagenet",
        "model.mlp": False,
        "moco.k": 1024,
        "moco.m": 0.99,
        "moco.t": 0.1,
        "optim.epochs": 8,
        "optim.batch_size": 128,  # 8 BN splits of 16: with 4 images per split MoCo does not learn here
        "optim.lr": 0.03,  # 0.015 at this batch of 128 (0.06 did not learn in 8 CPU epochs here)
        "optim.weight_decay": 5e-4,
        "runtime.channels_last": False,  # measured faster than channels-last on the CPU
        # The whole demo set (15 MB decoded) in memory, augmented in batches: 324 img/s on 2 cores
        # against 180-208 for the torch loader, whose workers compete with the step for the CPU.
        "data.loader": "resident",
        "runtime.knn_baseline": True,
        "runtime.out": "runs/demo",
    },
}


def set_dotted(cfg: Any, name: str, value: Any) -> None:
    *path, last = name.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    if not any(f.name == last for f in fields(obj)):
        raise KeyError(f"unknown config field {name!r}")
    if path and obj.__dataclass_params__.frozen:
        # data.aug (an AugSpec, shared by the presets): a new one in its place, as `--image-size` does
        # (setattr raised FrozenInstanceError for a Python caller's "data.aug.image_size")
        set_dotted(cfg, ".".join(path), dataclasses.replace(obj, **{last: value}))
    else:
        setattr(obj, last, value)


def build_config(preset: str = "v2", overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the preset, then explicit overrides (None values are ignored)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = TrainConfig(preset=preset)
    cfg.data.aug = AUG_PRESETS[preset]
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for name, value in {**PRESETS[preset], **given}.items():
        set_dotted(cfg, name, value)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)


def plain(v: Any) -> Any:
    """JSON's form of a config value (tuples as lists, string keys), so that a saved config (a
    checkpoint's, config.json) and a live one compare equal when they hold the same values."""
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    return v


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of a saved dict (a checkpoint's, a config.json); a TypeError naming the field
    whose value is not of its type (a config.json edited by hand: "epochs": "two" or "lr": null went
    on to a TypeError's traceback in the checks of the flags, "mlp": "yes" trained as true)."""

    def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
        if not isinstance(values, dict):
            raise TypeError(
                f"{prefix.rstrip('.') or 'the config'} is {json.dumps(values, default=str)}, not an object of settings"
            )
        kwargs = {}
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                kwargs[f.name] = build(f.default_factory, v, f"{prefix}{f.name}.")  # type: ignore[arg-type]
                continue
            if not _is_of(v, hints[f.name]):
                raise TypeError(f"{prefix}{f.name} is {json.dumps(v, default=str)}, not {_type_name(hints[f.name])}")
            if isinstance(v, list):
                kwargs[f.name] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
            else:
                kwargs[f.name] = v
        return cls(**kwargs)

    return build(TrainConfig, d)


def _is_of(v: Any, hint: Any) -> bool:
    """Whether a JSON value `v` fits a config field's type: an int is a float too, a bool no number,
    a list a tuple of its elements' type (as many as a fixed one has)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_is_of(v, a) for a in args)
    if origin is tuple:
        fixed = args[-1] is not Ellipsis
        return (
            isinstance(v, (list, tuple))
            and (not fixed or len(v) == len(args))
            and all(_is_of(x, args[i] if fixed else args[0]) for i, x in enumerate(v))
        )
    if origin is dict:
        return isinstance(v, dict) and all(_is_of(k, args[0]) and _is_of(x, args[1]) for k, x in v.items())
    if hint is type(None):
        return v is None
    if hint is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, hint)


# The JSON names of the config's value types, as a config.json's editor knows them
JSON_NAMES = {str: ("a string", "strings"), int: ("an integer", "integers"), float: ("a number", "numbers")}
JSON_NAMES[bool] = ("true or false", "true or false")


def _type_name(hint: Any) -> str:
    """`hint` as from_dict's TypeError names it, in JSON's words: "a number", "a string or null",
    "a list of 2 numbers", "an object of strings"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        count = "" if args[-1] is Ellipsis else f"{len(args)} "
        return f"a list of {count}{JSON_NAMES[args[0]][1]}"
    if origin is dict:
        return f"an object of {JSON_NAMES[args[1]][1]}"
    return JSON_NAMES[hint][0]


def read_json_object(path: Path, max_bytes: int = 16 << 20) -> dict[str, Any] | None:
    """The JSON object in a small file the project writes (a result, a run's config.json), or None:
    missing, not JSON, not an object, or larger than any such file (not read to find out)."""
    try:
        obj = json.loads(path.read_text()) if path.stat().st_size <= max_bytes else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def save_json(cfg: TrainConfig, path: str, world: int) -> None:
    """A run's config.json: the resolved config, and the processes that run it (`world_size`, as a
    checkpoint records it): --gpus says 1 under torchrun, and a run of several stopped before its first
    checkpoint is resumed from this file (resume.SavedRun.of_config)."""
    from moco_fast.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps({**to_dict(cfg), "world_size": world}, indent=2, sort_keys=True) + "\n")
