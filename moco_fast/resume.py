"""`train --resume`: a checkpoint back into the model, optimizer, scaler and random streams, after
checking that it was trained with the same model (what a resumed run may change is said)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moco_fast import checkpoint as ckpt
from moco_fast import distributed as dist_utils
from moco_fast.backbone import resolve_stem
from moco_fast.config import ConfigError, TrainConfig, plain, sync_bn_replaces_shuffle_bn, to_dict
from moco_fast.data import DataError
from moco_fast.epoch import other_images
from moco_fast.loaders.options import option_values
from moco_fast.model import MoCo, k_sizes_state
from moco_fast.step import amp_as_run, load_optimizer_state
from moco_fast.text import plural

log = logging.getLogger("moco_fast")


def resume(
    resume_path: Path,
    cfg: TrainConfig,
    model: MoCo,
    optimizer,
    scaler,
    world: int,
    rank: int,
    num_images: int,
    device: torch.device,
) -> tuple[int, dict[str, Any] | None, dict[str, Any] | None]:
    """Loads a training checkpoint into the model, optimizer, scaler and random streams; returns
    the epochs it finished; for one saved within the next epoch (a stop, --save-every), the part
    of that epoch done (epoch.EpochPart's fields; None at an epoch end); and the metrics row of the
    last epoch it finished (None: saved within the first epoch, or before checkpoints held it)."""
    # on the CPU: the RNG states must stay there; model and optimizer states are copied to the device
    state = ckpt.load(resume_path, map_location="cpu")
    if not {"config", "model", "optimizer", "epoch"} <= set(state):
        raise DataError(f"--resume: {resume_path} is not a moco-fast training checkpoint")
    before = ckpt.saved_config(state, resume_path)  # one line for a config edited to a wrong type, not a TypeError
    check_same_model(state["config"], cfg)
    check_epochs(state["epoch"], cfg)
    if state["epoch"] < cfg.optim.epochs:
        saved = SavedRun.of(state)  # as train --resume read it with the checkpoint's config
        # shuffle BN back where sync BN stops replacing it: train --resume's own line says so
        said = ("shuffle_bn",) if cfg.moco.shuffle_bn and sync_bn_stops(saved.sync_bn, saved.world, cfg, world) else ()
        warn_changed(saved_as_run(state["config"], saved.world), cfg, said)
        warn_rescheduled(before, cfg, state["epoch"], world, saved.world, state.get("step") or 0)
        warn_rescaled(before, cfg, world, saved.world)
        warn_other_amp(state, cfg, device)
    else:
        warn_other_data(state["config"], cfg)
    bank = state["model"].get("bank")
    if bank is not None and hasattr(model, "bank") and bank.shape[0] != model.bank.shape[0]:
        raise DataError(
            f"--resume: {resume_path} is a memory-bank run whose bank holds a feature for each of its "
            f"{bank.shape[0]} training images, and the data now has {model.bank.shape[0]}: resume it on "
            "the data it trained on"
        )
    ckpt.load_weights(model, state["model"], resume_path)
    load_optimizer_state(optimizer, state["optimizer"])
    load_scaler(scaler, state["scaler"])
    restore_rng(state, cfg, world, rank, state["epoch"])
    part = {**state["epoch_part"], "step": state["step"]} if state.get("step") else None
    if part is not None and "num_images" in state:  # resumed_part: the same data, or the epoch restarts
        part["num_images"] = state["num_images"]
    elif state["epoch"] < cfg.optim.epochs and cfg.data.loader != "synthetic":
        # random images, steps x batch of them: another --batch-size is no data changed since (warn_changed names it)
        warn_other_images(state.get("num_images"), num_images)
    # state["epoch"]: the epochs done; "at epoch 0, step 1 of epoch 1" read as two positions
    done = state["epoch"]
    where = f"step {part['step']} of epoch {done + 1}" if part else f"epoch {done}" if done else "its start"
    log.info("resumed from %s after %s", resume_path, where)
    return state["epoch"], part, state.get("row")


def load_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any]) -> None:
    """The loss scaler's state where the run kept one: a run that did not train in fp16 saved a disabled
    scaler's empty state, which the scaler of its resume with --amp fp16 refused (a RuntimeError, "the
    source state dict is empty"); that one starts at its own scale, as a fresh fp16 run's does."""
    if saved:
        scaler.load_state_dict(saved)


def warn_other_images(saved: int | None, now: int) -> None:
    """The data's images counted anew differ from the checkpoint's (`saved`; None: not recorded): a
    folder changed in place (a class folder added) is no changed setting, and warn_changed misses it."""
    if changed := other_images(saved, now):
        log.warning("--resume: %s: it goes on with the %d", changed, now)


def saved_as_run(saved: dict[str, Any], saved_world: int) -> dict[str, Any]:
    """A saved config as its `saved_world` processes ran it (config.as_run, which cfg has been through):
    a checkpoint written before config.json recorded it says shuffle BN on beside --sync-bn, and its
    resume with the same flags warned of shuffle BN turned off."""
    moco, runtime = saved.get("moco", {}), saved.get("runtime", {})
    if sync_bn_replaces_shuffle_bn(runtime.get("sync_bn"), saved_world, moco.get("shuffle_bn")):
        return {**saved, "moco": {**moco, "shuffle_bn": False}}
    return saved


def sync_bn_stops(saved_sync_bn: bool | None, saved_world: int, cfg: TrainConfig, world: int) -> bool:
    """A run whose --sync-bn across several processes replaced shuffle BN (config.as_run: its config
    records shuffle BN off) resumed where sync BN replaces nothing: by one process, where it does
    nothing, or with --no-sync-bn. train --resume turns shuffle BN back on there, unless --no-shuffle-bn
    is given, with one line that says why (commands.train), which the changed settings and
    trainer.validate's line of --sync-bn in one process would each say again in part."""
    return sync_bn_replaces_shuffle_bn(saved_sync_bn, saved_world, True) and not sync_bn_replaces_shuffle_bn(
        cfg.runtime.sync_bn, world, True
    )


def warn_changed(saved: dict[str, Any], cfg: TrainConfig, said: tuple[str, ...] = ()) -> None:
    """A resumed run may change its data, optimisation, epochs and the MoCo settings that
    check_same_model lets change (--moco-m, --moco-t, --symmetric, shuffle BN, and --moco-k of the
    memory bank and end-to-end); say what changed.
    said: the settings that another line named already."""
    now = to_dict(cfg)
    changed = []
    for section in ("data", "optim", "moco"):
        for k, old in saved.get(section, {}).items():
            new = now[section].get(k)
            # loader_module: the module of data.loader's, which says the change (trainer.train)
            if k in ("epochs", "workers", "loader_module", *said) or plain(new) == plain(old):
                continue
            if isinstance(old, dict) and isinstance(new, dict):  # augmentation, loader options: by field
                # the same loader's options by the values it reads, not as typed (threads=02 is threads=2)
                same_loader = k == "loader_options" and saved["data"].get("loader") == cfg.data.loader
                read = [option_values(cfg.data.loader, o) for o in (old, new)] if same_loader else [old, new]
                changed += [
                    f"{section}.{k}.{f} {old.get(f)!r} -> {new.get(f)!r}"
                    for f in {**old, **new}
                    if plain(read[1].get(f)) != plain(read[0].get(f))
                ]
            else:
                changed.append(f"{section}.{k} {old!r} -> {new!r}")
    if changed:
        log.warning("--resume with changed settings: %s", "; ".join(changed))


# what each --amp (as it runs) computes in, for warn_other_amp
AMP_WORDS = {"bf16": "bf16 autocast", "fp16": "fp16 autocast", "off": "fp32"}


def warn_other_amp(state: dict[str, Any], cfg: TrainConfig, device: torch.device) -> None:
    """A run resumed in another precision than it trained in: --amp auto is bf16 on CUDA and fp32 on the
    CPU, so a run trained on the CPU and resumed on a GPU (or the other way round) changed its numerics
    without a word, as an --amp given now did. Said with the --amp that keeps them, and the run goes on,
    as with its other changed settings (lincls and finetune refuse it: classifier_settings.amp_ran).
    Nothing where the checkpoint does not tell (saved_amp)."""
    was, now = saved_amp(state), amp_as_run(cfg.runtime.amp, device.type)  # checked by the run already
    if was is None or was == now:
        return
    how = f"--amp auto on {device.type}" if cfg.runtime.amp == "auto" else f"--amp {now}"
    keep = "" if was == "fp16" and device.type != "cuda" else f" (--amp {was} keeps {AMP_WORDS[was]})"
    log.warning(
        "--resume: the run trained in %s and goes on in %s (%s): its numerics change%s",
        *(AMP_WORDS[was], AMP_WORDS[now], how, keep),
    )


def saved_amp(state: dict[str, Any]) -> str | None:
    """The --amp that a checkpoint's run trained with, as it ran (its amp_ran); in one saved before it
    recorded that, as its config tells: --amp as given, or auto on a --device named (on auto: None)."""
    if state.get("amp_ran") is not None:
        return state["amp_ran"]
    runtime = state["config"].get("runtime", {})
    amp, device = runtime.get("amp", "auto"), runtime.get("device", "auto")
    if amp == "auto" and device == "auto":  # the machine decided
        return None
    return amp_as_run(amp, device.partition(":")[0])  # cuda:1 is a cuda device


def warn_other_data(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """A finished run resumed on other --data: the final kNN it still owes reads that data, and its
    summary.json does not name it (it went into the run's figures without a word). The demo set and
    --loader synthetic's random images are data too: a synthetic run resumed with --loader torch
    measured its final kNN on the demo set, which it never trained on, without a word."""
    trained_on, reads = _images_of(saved.get("data", {})), _images_of(to_dict(cfg.data))
    if trained_on != reads:
        log.warning("--resume: the run trained on %s; its final kNN, where still owed, reads %s", trained_on, reads)


def _images_of(data: dict[str, Any]) -> str:
    """The images that a saved data config (DataConfig's dict) trains on, as warn_other_data names them."""
    if data.get("loader") == "synthetic":
        return "random images (--loader synthetic)"
    return "the demo set" if data.get("data") is None else f"--data {data['data']}"


def warn_rescheduled(
    before: TrainConfig, cfg: TrainConfig, done: int, world: int, saved_world: int, step: int = 0
) -> None:
    """A run extended (or shortened) with --epochs: the lr schedule is that of the new length, so the
    lr of its next epoch is not where the old schedule ended (a cosine run 200 -> 400 goes from about
    0 back to half the base lr). Said with the two figures. `step`: the steps of epoch done + 1 that
    a checkpoint saved within it holds, trained at the old schedule's lr for that epoch. `before`: the
    checkpoint's config, read by checkpoint.saved_config."""
    from moco_fast.trainer import base_lr, lr_at

    if before.optim.epochs == cfg.optim.epochs:
        return
    # as the processes that trained it had it: that of its last epoch, or of the one it is within
    last = lr_at(before, done if step else done - 1, base_lr(before, saved_world))
    had = f"its first {plural(step, 'step')} had" if step else f"epoch {done} had"
    nxt = lr_at(cfg, done, base_lr(cfg, world))
    log.warning(
        "--resume: --epochs %d (the run was scheduled for %d): the %s schedule now spans %s, so "
        "epoch %d trains at lr %.4g where %s %.4g",
        *(cfg.optim.epochs, before.optim.epochs, cfg.optim.schedule, plural(cfg.optim.epochs, "epoch"), done + 1),
        *(nxt, had, last),
    )


def warn_rescaled(before: TrainConfig, cfg: TrainConfig, world: int, saved_world: int) -> None:
    """A run resumed by another number of processes: --lr is for a global batch of 256 and scales
    with the global batch, so the lr changes with the world size (2 workers resumed in 1 halve it).
    Said with the two figures and the --lr that keeps the old one; nothing where the lr stays.
    `before`: the checkpoint's config, read by checkpoint.saved_config."""
    from moco_fast.trainer import base_lr

    old, new = base_lr(before, saved_world), base_lr(cfg, world)
    if world == saved_world or math.isclose(old, new):
        return
    log.warning(
        "--resume: the run was trained by %d process%s, now %d: the global batch goes from %d to %d, and the "
        "lr, which scales with it, from %.4g to %.4g (--lr %.4g keeps %.4g)",
        *(saved_world, "es" * (saved_world != 1), world, before.optim.batch_size * saved_world),
        *(cfg.optim.batch_size * world, old, new, old * 256 / (cfg.optim.batch_size * world), old),
    )


@dataclass(frozen=True)
class SavedRun:
    """What the run that --resume continues was, as its checkpoint says: the processes that wrote it and
    its --sync-bn. Read once (train --resume reads it with the checkpoint's config, else saved_run) and
    handed to the checks that need it: the fixes that trainer.validate names, shuffle BN back on where
    sync BN stops (sync_bn_stops) and the line of --sync-bn in one process that it leaves out.
    checkpoint False: as its config.json says (of_config), a run stopped before its first checkpoint,
    which starts over (train --resume); its model may change, and validate names no fix that keeps it.
    epochs: those its checkpoint finished, fewer than which --epochs may not ask (check_epochs)."""

    world: int
    sync_bn: bool | None
    checkpoint: bool = True
    epochs: int = 0  # the epochs its checkpoint finished (check_epochs)

    @classmethod
    def of(cls, state: dict[str, Any]) -> SavedRun:
        """That of a checkpoint read already (its tensors may be unread)."""
        world = _processes(state.get("world_size")) or len(state.get("rng_per_rank") or [None])
        return cls(world, state["config"].get("runtime", {}).get("sync_bn"), epochs=state.get("epoch") or 0)

    @classmethod
    def of_config(cls, saved: dict[str, Any]) -> SavedRun:
        """That of a run's config.json (run_folder.read_run_config): the processes that ran it, or its
        --gpus N where it was written before it recorded them (a torchrun run's says 1 there)."""
        runtime = saved["runtime"]
        world = _processes(saved.get("world_size")) or _processes(runtime.get("gpus")) or 1
        return cls(world, runtime.get("sync_bn"), checkpoint=False)


def _processes(saved: Any) -> int | None:
    """A saved number of processes, None where there is none or it cannot be one (not a number, infinite or
    below 1: a config.json or checkpoint edited by hand or damaged): the caller's fallback then, as for
    one never recorded."""
    try:
        n = int(saved or 0)
    except (TypeError, ValueError, OverflowError):  # "two", [2], 1e999 (JSON reads it as inf)
        return None
    return n if n >= 1 else None


def saved_run(cfg: TrainConfig) -> SavedRun | None:
    """The checkpoint --resume continues, its tensors unread (mmap), as a SavedRun; None where there is
    none (a fresh run, a run that starts over, or a checkpoint that cannot be read: the run says so later)."""
    try:
        path = ckpt.find_resume(cfg.runtime.resume, cfg.runtime.out)
        state = None if path is None else ckpt.load(path, map_location="cpu", mmap=True)
    except (FileNotFoundError, DataError):
        return None
    return SavedRun.of(state) if isinstance(state, dict) and isinstance(state.get("config"), dict) else None


def queue_fix(cfg: TrainConfig, world: int, saved_world: int, per_image: int) -> str:
    """What to do where the resumed run's global batch enqueues more keys (per_image each) than its
    queue holds. Not --moco-k: the checkpoint holds a queue of that size (check_same_model)."""
    k, b = cfg.moco.k, cfg.optim.batch_size
    ways = []
    if k // (world * per_image) >= 1:
        ways.append(f"lower --batch-size to {k // (world * per_image)} or less")
    most = k // (b * per_image)
    if most >= 1:
        ways.append("resume in one process" if most == 1 else f"resume with at most {most} processes")
    trained = f"trained by {saved_world} process{'es' * (saved_world != 1)}, now {world}"
    return f"the queue of the checkpoint ({trained}) holds {k} keys, and --resume keeps it: " + " or ".join(ways)


def bn_splits_fix(cfg: TrainConfig, saved_world: int) -> str:
    """What to do where a run that several processes trained (plain BN: their batches are apart
    already) resumes in one, whose split BN cuts each batch into --bn-splits sub-batches."""
    b, splits = cfg.optim.batch_size, cfg.moco.bn_splits
    fits = [d for d in range(min(splits, b // 2), 0, -1) if b % d == 0]
    way = f"give --bn-splits {fits[0]}" if fits else "raise --batch-size"
    return (
        f"the run was trained by {saved_world} processes, which do not split BN; in one process split BN cuts "
        f"each batch of {b} into --bn-splits {splits} sub-batches: {way} (it may change on --resume), or "
        f"resume with {saved_world} processes"
    )


def check_same_model(saved: dict[str, Any], cfg: TrainConfig) -> None:
    now = to_dict(cfg)
    for section in ("model", "moco"):
        old, new = dict(saved[section]), now[section]
        if section == "model" and "stem" in old:  # "auto" as the stem it made at the saved image size
            old["stem"] = resolve_stem(old["stem"], saved["data"]["aug"]["image_size"])
            new = {**new, "stem": resolve_stem(new["stem"], cfg.data.aug.image_size)}
        # these change how a step runs, not the weights (split BN keeps plain BN's buffers): a run
        # trained by N processes (plain BN) resumes in one (split BN), and the other way round
        changeable = ("m", "t", "symmetric", "bank_m", "shuffle_exchange", "bn_splits", "shuffle_bn")
        # only MoCo's checkpoint holds something sized by K (its queue); the memory bank's K is the negatives
        # each step draws from a bank of one row a training image, and end-to-end reads none
        if section == "moco" and old.get("mechanism") == new["mechanism"] and not k_sizes_state(new["mechanism"]):
            changeable += ("k",)
        diff = [k for k in new if k in old and old[k] != new[k] and k not in changeable]
        if diff:
            raise ConfigError(
                f"--resume: the checkpoint was trained with other {section} settings "
                + ", ".join(f"{k}={old[k]!r} (now {new[k]!r})" for k in diff)
            )


def check_epochs(done: int, cfg: TrainConfig) -> None:
    """A ConfigError where --epochs is fewer than the `done` epochs the checkpoint finished: its weights
    cannot go back, and the run said "nothing to do: RUN trained for its 1 epoch already" of a run of
    2, the --epochs given left aside without a word. As many as it finished (within the next, a stop)
    is a finished run."""
    if done > cfg.optim.epochs:
        raise ConfigError(
            f"--epochs {cfg.optim.epochs}: the checkpoint --resume continues has trained {plural(done, 'epoch')} "
            f"already, and its weights cannot go back to fewer: give --epochs {done} or more, or leave --epochs out"
        )


def restore_rng(state: dict[str, Any], cfg: TrainConfig, world: int, rank: int, epoch: int) -> None:
    """Each rank continues its own random streams when the number of ranks is unchanged. Otherwise
    (N workers resumed with M) the streams start afresh from (seed, rank, epoch); data order and
    augmentations do not depend on them (the loaders seed from seed, epoch and rank)."""
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    if len(per_rank) == world:
        ckpt.set_rng_state(per_rank[rank])
        dist_utils.resume_shuffle_generator(state.get("shuffle_generator"))  # shuffle BN's permutations
        return
    dist_utils.resume_shuffle_generator(None)
    ckpt.seed_everything(cfg.runtime.seed + rank + 1_000_003 * epoch)
    written = plural(len(per_rank), "process", "processes")
    log.info("--resume: the checkpoint was written by %s, now %d: new random streams", written, world)
