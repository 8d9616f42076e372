"""The epoch loop that lincls and finetune share.

After every epoch the loop writes a state file beside the result (`lincls.json` ->
`lincls.state.pt`): what trains, the optimizer, the random streams and the history so far. An
interrupted run (100 epochs of lincls on ImageNet take hours) continues from there with `--resume`,
and the file goes once the result is written. With `--workers 0` a resumed run is the uninterrupted
one exactly; with workers it goes on with a new data order and new crops (the worker processes'
random streams are not saved).

`--eval-every N` evaluates every N epochs as well as after the last: the history holds each
evaluation, and the result adds the best epoch (`best_top1`, `best_epoch`), the figure the official
main_lincls.py reports. `top1` stays the last epoch's: choosing an epoch on the evaluation set is
choosing on the test set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from moco_fast import checkpoint as ckpt
from moco_fast.config import ConfigError
from moco_fast.data import DataError
from moco_fast.run_folder import state_name
from moco_fast.step import load_optimizer_state

log = logging.getLogger("moco_fast")

# settings a resumed run may change: where it runs and how fast, where its result goes, when it evaluates
# (not --amp: it changes what the features are, and a GradScaler state cannot move between fp16 and not)
MAY_CHANGE = ("workers", "device", "out", "resume", "eval_every")


def state_path(out: Path) -> Path:
    """The state file of the run whose result is `out`."""
    return out.with_name(state_name(out.name))


def check_state(out: Path, resume: bool, command: str) -> None:
    """ConfigError when an interrupted run left its state beside `out` and `resume` is off: starting
    over would throw its epochs away, silently."""
    state = state_path(out)
    if state.is_file() and not resume:
        raise ConfigError(
            f"{state} holds an interrupted {command} run: --resume continues it (with the same settings); "
            "delete it to start over"
        )


def clear_state(out: Path) -> None:
    """After the result is written: the run is done, its state goes."""
    state_path(out).unlink(missing_ok=True)


class EpochLoop:
    """Runs `one_epoch(epoch) -> {"epoch", "lr", "loss"}` for the configured epochs, with
    `evaluate() -> (top1, top5)` every `eval_every` epochs and after the last, saving `parts`
    (name -> an object with state_dict/load_state_dict: what trains, an optimizer, a GradScaler) and
    `generator` (the training order's) after each epoch. `cfg`: a LinclsConfig or FinetuneConfig
    (checkpoint, epochs, eval_every, resume)."""

    def __init__(
        self,
        command: str,
        cfg: Any,
        out: Path,
        parts: dict[str, Any],
        generator: torch.Generator | None,
        t0: float,  # when the run started (time.perf_counter)
    ):
        self.command, self.cfg, self.out, self.parts, self.generator = command, cfg, out, parts, generator
        self.path = state_path(out)
        self.t0, self.earlier_s = t0, 0.0

    def wall_s(self) -> float:
        """Seconds the run has taken, its interrupted parts included."""
        return self.earlier_s + time.perf_counter() - self.t0

    def run(self, one_epoch: Callable[[int], dict[str, Any]], evaluate: Callable[[], tuple[float, float]]):
        """The history: one row per epoch, with top1 and top5 where it was evaluated (always the last)."""
        check_state(self.out, self.cfg.resume, self.command)
        start, history = self._load() if self.cfg.resume else (0, [])
        epochs, every = self.cfg.epochs, self.cfg.eval_every
        for epoch in range(start, epochs):
            row = one_epoch(epoch)
            if epoch + 1 == epochs or (every and (epoch + 1) % every == 0):
                with torch.random.fork_rng(devices=[]):  # training draws the same with or without it
                    row["top1"], row["top5"] = evaluate()
            history.append(row)
            acc = f", top-1 {row['top1']:.2f}%" if "top1" in row else ""
            log.info(
                "%s epoch %d/%d: loss %.4f, lr %.4g%s", self.command, epoch + 1, epochs, row["loss"], row["lr"], acc
            )
            self._save(epoch + 1, history)
        return history

    def _save(self, epoch: int, history: list[dict[str, Any]]) -> None:
        state = {
            "command": self.command,
            "config": settings(self.cfg),
            "epoch": epoch,
            "history": history,
            "wall_s": self.wall_s(),
            "rng": ckpt.rng_state(),
            "generator": None if self.generator is None else self.generator.get_state(),
            **{name: part.state_dict() for name, part in self.parts.items()},
        }
        ckpt.save_atomic(state, self.path)

    def _load(self) -> tuple[int, list[dict[str, Any]]]:
        if not self.path.is_file():
            log.warning("--resume: no interrupted %s run at %s; starting from the first epoch", self.command, self.path)
            return 0, []
        state = load_state(self.path, self.command)
        diff = differences(state, self.cfg)
        if diff:
            raise ConfigError(
                f"--resume: {self.path} was run with other settings or another checkpoint: {', '.join(diff)}; "
                "resume with those, or delete it to start over"
            )
        for name, part in self.parts.items():
            if isinstance(part, torch.optim.Optimizer):
                load_optimizer_state(part, state[name])  # saved on another device, maybe
            else:
                part.load_state_dict(state[name])
        ckpt.set_rng_state(state["rng"])
        if self.generator is not None:
            self.generator.set_state(state["generator"])
        self.earlier_s = state.get("wall_s", 0.0)
        log.info("--resume: %s continues after epoch %d of %d", self.command, state["epoch"], self.cfg.epochs)
        return state["epoch"], state["history"]


def settings(cfg: Any) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: every setting but MAY_CHANGE, and the
    checkpoint file itself (trained further since, it is another backbone)."""
    now = {k: v for k, v in asdict(cfg).items() if k not in MAY_CHANGE}
    now["checkpoint_stamp"] = ckpt.file_stamp(cfg.checkpoint) if cfg.checkpoint else None
    return now


def load_state(path: Path, command: str) -> dict[str, Any]:
    """The state file, or a one-line error that says how to go on."""
    try:
        state = ckpt.load(path, map_location="cpu")
    except DataError as e:
        raise DataError(f"--resume: {e}; delete it to start over") from None
    if not isinstance(state, dict) or state.get("command") != command:
        raise DataError(f"--resume: {path} is not the state of a {command} run; delete it to start over")
    return state


def differences(state: dict[str, Any], cfg: Any) -> list[str]:
    """How `cfg` differs from the settings the state was run with ([] when it may resume)."""
    saved, now = state["config"], settings(cfg)
    return [f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in now if saved.get(k) != now[k]]


def resumable(out: Path, cfg: Any, command: str) -> bool:
    """A state beside `out` that `cfg` may resume (for the sweep, which starts its own over otherwise)."""
    path = state_path(out)
    if not path.is_file():
        return False
    try:
        return not differences(load_state(path, command), cfg)
    except DataError:
        return False


def best_of(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The best evaluated epoch (the first of equals) as result fields."""
    best = max((row for row in history if "top1" in row), key=lambda row: row["top1"])
    return {"best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"]}
