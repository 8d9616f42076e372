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
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from moco_fast import checkpoint as ckpt
from moco_fast.config import ConfigError
from moco_fast.run_folder import state_name

log = logging.getLogger("moco_fast")

# settings a resumed run may change: they change where and how fast it runs, not what it computes
MAY_CHANGE = ("workers", "device", "amp", "out", "resume", "eval_every")


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
    (name -> an object with state_dict/load_state_dict) and `generator` (the training order's) after
    each epoch. `cfg`: a LinclsConfig or FinetuneConfig (epochs, eval_every, resume)."""

    def __init__(
        self, command: str, cfg: Any, out: Path, parts: dict[str, Any], generator: torch.Generator | None = None
    ):
        self.command, self.cfg, self.out, self.parts, self.generator = command, cfg, out, parts, generator
        self.path = state_path(out)

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

    def _config(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self.cfg).items() if k not in MAY_CHANGE}

    def _save(self, epoch: int, history: list[dict[str, Any]]) -> None:
        state = {
            "command": self.command,
            "config": self._config(),
            "epoch": epoch,
            "history": history,
            "rng": ckpt.rng_state(),
            "generator": None if self.generator is None else self.generator.get_state(),
            **{name: part.state_dict() for name, part in self.parts.items()},
        }
        ckpt.save_atomic(state, self.path)

    def _load(self) -> tuple[int, list[dict[str, Any]]]:
        if not self.path.is_file():
            log.warning("--resume: no interrupted %s run at %s; starting from the first epoch", self.command, self.path)
            return 0, []
        state = ckpt.load(self.path, map_location="cpu")
        if state.get("command") != self.command:
            raise ConfigError(f"--resume: {self.path} is not the state of a {self.command} run")
        saved, now = state["config"], self._config()
        diff = [f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in now if saved.get(k) != now[k]]
        if diff:
            raise ConfigError(
                f"--resume: {self.path} was run with other settings: {', '.join(diff)}; "
                "resume with those, or delete it to start over"
            )
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
        ckpt.set_rng_state(state["rng"])
        if self.generator is not None:
            self.generator.set_state(state["generator"])
        log.info("--resume: %s continues after epoch %d of %d", self.command, state["epoch"], self.cfg.epochs)
        return state["epoch"], state["history"]


def best_of(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The best evaluated epoch (the first of equals) as result fields."""
    best = max((row for row in history if "top1" in row), key=lambda row: row["top1"])
    return {"best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"]}
