"""The epoch loop that lincls and finetune share.

After every epoch the loop writes a state file beside the result (`lincls.json` ->
`lincls.state.pt`): what trains, the optimizer, the random streams and the history so far. An
interrupted run (100 epochs of lincls on ImageNet take hours) continues from there with `--resume`,
and the file goes once the result is written. A resumed run draws the batches of the uninterrupted
one, with any `--workers`: the order comes from the saved generator, each image's crop and flip from
(seed, epoch, its index) alone (lincls.image_batches, seeded_images.py), so on the CPU it ends with
the same weights. The commands hold a lock beside the result while they run
(`run_folder.hold_output`), so a second run into the same result stops at once.

`--eval-every N` evaluates every N epochs as well as after the last: the history holds each
evaluation, and the result adds the best epoch (`best_top1`, `best_epoch`), the figure the official
main_lincls.py reports. `top1` stays the last epoch's: choosing an epoch on the evaluation set is
choosing on the test set.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moco_fast import checkpoint as ckpt
from moco_fast.classifier_settings import (
    LISTED_LATER,
    differences,
    moved_paths,
    settings,
    what_differs,
)
from moco_fast.config import ConfigError
from moco_fast.data import DataError
from moco_fast.divergence import Diverged
from moco_fast.run_folder import state_name
from moco_fast.step import load_optimizer_state
from moco_fast.text import plural

log = logging.getLogger("moco_fast")


# what continues a stopped run, for the stop message: the command's --resume, or its caller (the sweep)
_HOW_TO_CONTINUE: ContextVar[str | None] = ContextVar("how_to_continue", default=None)  # None: --resume
# the flag that sets the lr, for a divergence's message: the command's --lr, or its caller's (the sweep)
_LR_FLAG: ContextVar[str] = ContextVar("lr_flag", default="--lr")
# an epoch's mean loss over this many times chance's (ln classes) warns that the lr overshoots
LOSS_OVER_CHANCE = 10


@contextmanager
def continued_by(how: str, lr_flag: str) -> Iterator[None]:
    """A run stopped inside this block says that `how` continues it (the sweep: "the same sweep
    command continues it"), not --resume; one that diverged names `lr_flag` (--lincls-lr), not --lr."""
    tokens = _HOW_TO_CONTINUE.set(how), _LR_FLAG.set(lr_flag)
    try:
        yield
    finally:
        _HOW_TO_CONTINUE.reset(tokens[0])
        _LR_FLAG.reset(tokens[1])


def run_by() -> str | None:
    """What continues the run under way, as its state and result record it (continued_by): None, the
    command's --resume; the caller's line inside continued_by (the sweep's), so that the sweep tells
    its own classifier's files from those of a user's run of the same name (sweep_eval)."""
    return _HOW_TO_CONTINUE.get()


def state_path(out: Path) -> Path:
    """The state file of the run whose result is `out`."""
    return out.with_name(state_name(out.name))


@dataclass
class LoadedState:
    """The state that --resume continues, read once, whole (its tensors are what the loop loads), by
    the first check that finds it (check_state, before the data is listed; the sweep's resumable_state)
    and handed on, not read again by each: to the check once the data is listed, and to the loop
    (EpochLoop), which takes it as it loads it, so that no caller holds a finetune state (the network
    and its optimizer's buffers, hundreds of MB) through the run."""

    state: dict[str, Any] | None

    def take(self) -> dict[str, Any] | None:
        state, self.state = self.state, None
        return state


def check_state(
    out: Path, cfg: Any, command: str, listing: str = LISTED_LATER, loaded: LoadedState | None = None
) -> LoadedState | None:
    """Before the data is read: a ConfigError when a state beside `out` would be thrown away (no
    --resume) or may not be resumed by `cfg` (other settings, another checkpoint), and when --resume
    finds no state but a finished result it would overwrite. Again with the data's `listing` once it
    is listed (other images: differences), before the work that precedes the first epoch
    (--cached-features' extraction), on the state that the first check read (`loaded`). Returns the
    state that --resume continues, read (None: there is none), for the later check and the loop."""
    state = state_path(out)
    if state.exists() and not state.is_file():
        raise ConfigError(f"{state}, where {command} keeps its state between epochs, is not a file: move it away")
    if not cfg.resume:
        if state.is_file():
            with contextlib.suppress(DataError):  # a damaged one: --resume names it
                load_state(state, command, mmap=True)  # another command's state: says so
            raise ConfigError(
                f"{state} holds an interrupted {command} run: --resume continues it (with the same settings); "
                "delete it to start over"
            )
        return
    if state.is_file():
        loaded = loaded if loaded is not None else LoadedState(load_state(state, command))
        refuse_other_settings(state, loaded.state, cfg, listing)
        return loaded
    if out.is_file():
        raise ConfigError(
            f"--resume: {out} is a finished {command} result and there is no state to continue ({state}): "
            "run without --resume to run it again"
        )
    return None


def refuse_other_settings(path: Path, state: dict[str, Any], cfg: Any, listing: str | None = None) -> None:
    """ConfigError, flag by flag, when `cfg` may not resume the state at `path` (`listing`: differences')."""
    images, flags = what_differs(state, cfg, listing)
    if images and flags:
        raise ConfigError(
            f"--resume: {path} ran on other images: {images}, and with other settings: {', '.join(flags)}; "
            "put the images back and resume with those settings, or delete it to start over"
        )
    if images:  # no setting changed: "resume with those" named none
        raise ConfigError(f"--resume: {path} ran on other images: {images}: put them back, or delete it to start over")
    if flags:
        raise ConfigError(
            f"--resume: {path} was run with other settings: {', '.join(flags)}; resume with those, "
            "or delete it to start over"
        )


def clear_state(out: Path) -> None:
    """After the result is written: the run is done, its state goes (and what a killed save left)."""
    state_path(out).unlink(missing_ok=True)
    remove_partial_saves(out)


def remove_partial_saves(out: Path) -> None:
    """The temporary files of state saves cut short (a kill while saving: a finetune state is hundreds
    of MB); call it only while holding the output's lock."""
    for tmp in ckpt.temporaries_of(state_path(out)):
        tmp.unlink(missing_ok=True)


class EpochLoop:
    """Runs `one_epoch(epoch) -> {"epoch", "lr", "loss"}` for the configured epochs, with
    `evaluate() -> (top1, top5, images evaluated)` every `eval_every` epochs and after the last, saving `parts`
    (name -> an object with state_dict/load_state_dict: what trains, an optimizer, a GradScaler) and
    `generator` (the training order's) after each epoch, and again after its evaluation. `cfg`: a
    LinclsConfig or FinetuneConfig (checkpoint, epochs, eval_every, resume). `loaded`: the state that
    --resume continues as the command's check read it (check_state), else read here."""

    def __init__(
        self,
        command: str,
        cfg: Any,
        out: Path,
        parts: dict[str, Any],
        generator: torch.Generator | None,
        t0: float,  # when the run started (time.perf_counter)
        checkpoint_stamp: list[Any] | None = None,  # of the checkpoint as the run read it (else: as it is now)
        data_listing: str | None = None,  # data_listing.listing_fingerprint of the splits the run reads
        classes: int | None = None,  # what the classifier tells apart: a loss far above chance's warns
        loaded: LoadedState | None = None,
    ):
        self.command, self.cfg, self.out, self.parts, self.generator = command, cfg, out, parts, generator
        self.loaded = loaded
        self.classes, self.warned_loss = classes, False
        self.path = state_path(out)
        self.t0, self.earlier_s = t0, 0.0
        self.saved = 0  # the epochs the state file holds
        # with the stamp of the checkpoint this run read and the listing of its data
        self.settings = settings(cfg, checkpoint_stamp, data_listing)

    def wall_s(self) -> float:
        """Seconds the run has taken, its interrupted parts included."""
        return self.earlier_s + time.perf_counter() - self.t0

    def run(self, one_epoch: Callable[[int], dict[str, Any]], evaluate: Callable[[], tuple[float, float, int]]):
        """The history: one row per epoch, with top1 and top5 where it was evaluated (always the last)."""
        if not self.cfg.resume:
            check_state(self.out, self.cfg, self.command)  # with --resume, _load checks what it loads
        remove_partial_saves(self.out)
        start, history = self._load() if self.cfg.resume else (0, [])
        try:
            if history and self._due(start) and "top1" not in history[-1]:
                self._evaluate(history, evaluate)  # interrupted in that evaluation
            for epoch in range(start, self.cfg.epochs):
                history.append(one_epoch(epoch))
                self._refuse_divergence(
                    epoch + 1, history[-1]["lr"]
                )  # before the save: the state keeps the last good epoch
                self._save(history)
                if self._due(epoch + 1):
                    self._evaluate(history, evaluate)
                row = history[-1]
                acc = f", top-1 {row['top1']:.2f}%" if "top1" in row else ""
                log.info(
                    "%s epoch %d/%d: loss %.4f, lr %.4g%s",
                    *(self.command, epoch + 1, self.cfg.epochs, row["loss"], row["lr"], acc),
                )
                self._warn_if_loss_overshoots(row)
        except BaseException as e:
            from moco_fast.cli import interruption  # Ctrl-C or SIGTERM, maybe behind a DataLoader's error

            if self.saved and interruption(e) is not None:
                held = "epoch 1" if self.saved == 1 else f"epochs 1-{self.saved}"  # not "epochs 1-1"
                how = _HOW_TO_CONTINUE.get() or "--resume continues"
                log.warning("%s: stopped; %s holds %s: %s", self.command, self.path, held, how)
            raise
        return history

    def _lower(self, lr: float) -> str:
        """The advice of a loss that overshoots or a divergence, at an epoch's `lr` (what the
        optimizer stepped with): lower the lr; and the weight decay too where lr x weight decay is at
        least 2 (1 + momentum), where the decay alone makes SGD's weights grow (with momentum m, w
        follows w' = (1 + m - lr wd) w - m w'', stable only for 0 < lr wd < 2 (1 + m)): lincls
        --weight-decay 1e12 was told to lower --lr alone."""
        fix = f"lower {_LR_FLAG.get()} (now {self.cfg.lr:g})"
        wd, m = self.cfg.weight_decay, self.cfg.momentum
        if lr * wd >= 2 * (1 + m):
            fix += (
                f" or --weight-decay (now {wd:g}): at lr {lr:g} a step's decay lr x weight decay = {lr * wd:.3g} is "
                f"past 2 (1 + --momentum {m:g}) = {2 * (1 + m):g}, where the decay alone makes the weights grow"
            )
        return fix

    def _refuse_divergence(self, epoch: int, lr: float) -> None:
        """Diverged when what trains (the parts that are modules: lincls's classifier, finetune's
        network with its BatchNorm statistics) holds NaN or inf after `epoch`: NaN logits still have a
        top-1 (lincls reported 33% on 3 classes) and finetune would write the network. One host sync
        an epoch, as the epoch's loss."""
        for name, part in self.parts.items():
            if not isinstance(part, torch.nn.Module):
                continue
            state = {k: v for k, v in part.state_dict().items() if v.is_floating_point() and v.numel()}
            finite = torch.stack([torch.isfinite(v).all() for v in state.values()])
            if bool(finite.all()):  # host sync: once per epoch
                continue
            bad = [k for k, ok in zip(state, finite.tolist(), strict=True) if not ok]
            fix = self._lower(lr)
            fix += ", or use --amp bf16 or off" if self.cfg.amp == "fp16" else ""
            held = "epoch 1" if self.saved == 1 else f"epochs 1-{self.saved}"
            # the sweep starts its own state over when its flags change: nothing to delete
            kept = self.saved and _HOW_TO_CONTINUE.get() is None
            raise Diverged(
                f"{self.command} diverged in epoch {epoch}: NaN or inf in {plural(len(bad), 'tensor')} of its {name} "
                f"(first: {bad[0]}): {fix} and start over"
                + (
                    f"; {self.path} holds {held}, which --resume continues with these settings only: delete it"
                    if kept
                    else ""
                )
            )

    def _warn_if_loss_overshoots(self, row: dict[str, Any]) -> None:
        """One warning line, at the first epoch whose mean loss stands over LOSS_OVER_CHANCE times
        chance's (ln classes, the loss of uniform logits, where both classifiers start): finite
        weights whose logits overshoot by orders of magnitude, which _refuse_divergence lets through.
        lincls's lr 30 is the official protocol's, found for ImageNet MoCo ResNet-50 features; on
        larger ones each step grows the logits by lr x |feature|^2 (a demo backbone trained 1 epoch:
        features of norm ~40, loss 3e4; one trained at 2 images per BN split: norm ~8000, loss 4e9)."""
        if self.warned_loss or self.classes is None or self.classes < 2:
            return
        chance = math.log(self.classes)
        if not row["loss"] > LOSS_OVER_CHANCE * chance:  # NaN: the loss is not a figure to judge
            return
        self.warned_loss = True
        log.warning(
            "%s epoch %d: the mean loss %.3g is over %dx chance's (ln %d = %.2f): the steps overshoot, and the "
            "accuracy means little; %s",
            *(self.command, row["epoch"], row["loss"], LOSS_OVER_CHANCE, self.classes, chance, self._lower(row["lr"])),
        )

    def _due(self, epochs_done: int) -> bool:
        every = self.cfg.eval_every
        return epochs_done == self.cfg.epochs or bool(every and epochs_done % every == 0)

    def _evaluate(self, history: list[dict[str, Any]], evaluate: Callable[[], tuple[float, float, int]]) -> None:
        with torch.random.fork_rng(devices=[]):  # training draws the same with or without it
            top1, top5, n = evaluate()
        history[-1].update(top1=top1, top5=top5, eval_images=n)
        self._save(history)

    def _save(self, history: list[dict[str, Any]]) -> None:
        state = {
            "command": self.command,
            "continued_by": run_by(),
            "config": self.settings,
            "epoch": len(history),
            "history": history,
            "wall_s": self.wall_s(),
            "rng": ckpt.rng_state(),
            "generator": None if self.generator is None else self.generator.get_state(),
            **{name: part.state_dict() for name, part in self.parts.items()},
        }
        ckpt.save_atomic(state, self.path)
        self.saved = len(history)

    def _load(self) -> tuple[int, list[dict[str, Any]]]:
        state = self.loaded.take() if self.loaded is not None else None
        if state is None:
            if not self.path.is_file():
                check_state(self.out, self.cfg, self.command)  # no finished result to overwrite
                log.warning(
                    "--resume: no interrupted %s run at %s; starting from the first epoch", self.command, self.path
                )
                return 0, []
            state = load_state(self.path, self.command)
        refuse_other_settings(self.path, state, self.cfg, self.settings["data_listing"])
        for moved in moved_paths(state["config"], self.settings):
            log.warning("--resume: %s ran on %s", self.path, moved)
        for name, part in self.parts.items():
            if isinstance(part, torch.optim.Optimizer):
                load_optimizer_state(part, state[name])  # saved on another device, maybe
            else:
                part.load_state_dict(state[name])
        ckpt.set_rng_state(state["rng"])
        if self.generator is not None:
            self.generator.set_state(state["generator"])
        self.earlier_s = state.get("wall_s", 0.0)
        self.saved = state["epoch"]
        log.info("--resume: %s continues after epoch %d of %d", self.command, state["epoch"], self.cfg.epochs)
        return state["epoch"], state["history"]


def load_state(path: Path, command: str, mmap: bool = False) -> dict[str, Any]:
    """The state file, or a one-line error that says how to go on. `mmap`: to look at its settings
    (checkpoint.load)."""
    try:
        state = ckpt.load(path, map_location="cpu", mmap=mmap)
    except ckpt.Damaged as e:  # its line ended "use another copy of it, or start over; delete it to start over"
        fix = "use another copy of it, or delete it to start over"
        raise DataError(f"--resume: {command}'s state {ckpt.Damaged(e.path, e.record, fix)}") from None
    except DataError as e:
        raise DataError(f"--resume: {command}'s state {e}; delete it to start over") from None
    other = state.get("command") if isinstance(state, dict) else None
    if other in ("lincls", "finetune") and other != command:  # a result of the same stem: foo.json, foo.txt
        raise ConfigError(
            f"{path} is the state of an interrupted {other} run, whose result has the same name before its "
            f"suffix: give --out another name (`moco-fast {other} --resume` finishes that run)"
        )
    if other != command:
        raise DataError(f"--resume: {path} is not the state of a {command} run; delete it to start over")
    return state


def resumable_state(out: Path, cfg: Any, command: str, listing: str) -> tuple[LoadedState | None, str]:
    """The state beside `out`, read, where `cfg` may resume it (for the sweep, which hands it to
    run_lincls), and ""; else None and why the sweep starts its own over, as its line says it: it ran
    with other settings, or it cannot be read (cut short, or a record failing its checksum, which
    the whole read checks). `listing`: of `cfg`'s data (data_listing.listing_fingerprint), so that
    other images there since, which the command refuses, are a state to start over too."""
    try:
        state = load_state(state_path(out), command)
    except (DataError, ConfigError):
        return None, "left a state that cannot be read (cut short or damaged?)"
    if differences(state, cfg, listing):
        return None, "stopped with other settings, checkpoint or images"
    return LoadedState(state), ""


def best_of(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The best evaluated epoch (the first of equals) as result fields."""
    best = max((row for row in history if "top1" in row), key=lambda row: row["top1"])
    return {"best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"]}
