"""The check that the run has not diverged (at each epoch's end and before a save within an
epoch), and the advice its error gives.

Non-finite weights must stop a run before they are saved over the last good checkpoint; the check
costs one host sync an epoch and one a save within an epoch, never one a step.
"""

from __future__ import annotations

import logging
import math

import torch

from moco_fast.config import PRESETS, OptimConfig, TrainConfig

log = logging.getLogger("moco_fast")


class Diverged(RuntimeError):
    """The weights became NaN or infinite: the run stops and keeps its last good checkpoint."""


def divergence_fix(cfg: TrainConfig) -> str:
    """The advice of a divergence: the flags whose values stand far out, each with its value (a
    temperature under 0.01, where the logits l / T overflow; an lr over 10x its preset's), or
    "lower --lr" where none does."""
    fixes = []
    if cfg.moco.t < 0.01:  # v1 0.07, v2 0.2, cifar 0.1
        fixes.append(f"raise --moco-t {cfg.moco.t:g} (usually 0.05-0.2)")
    preset_lr = PRESETS[cfg.preset].get("optim.lr", OptimConfig.lr)
    if cfg.optim.lr > 10 * preset_lr:
        fixes.append(f"lower --lr {cfg.optim.lr:g} (the {cfg.preset} preset's is {preset_lr:g})")
    return " and ".join(fixes) or "lower --lr"


def check_finite(
    model: torch.nn.Module,
    loss: float | None,
    epoch: int,
    amp_dtype: torch.dtype | None,
    cfg: TrainConfig,
    kept: bool | None = None,
) -> None:
    """Once per epoch and before a save within one (one host sync): non-finite weights, BN
    statistics or queue stop the run before they are saved over the last good checkpoint (an fp16
    forward that overflows poisons BN's running statistics for good even though the scaler skips its
    step); a non-finite epoch loss (the row's; None: none to check) with a finite state is a warning
    (the fp16 scaler skipped those steps, and training goes on). The message advises what `cfg`
    makes likely (divergence_fix) and says whether a checkpoint is `kept` (None: one is from epoch 2
    on)."""
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point() and v.numel()}
    finite = torch.stack([torch.isfinite(v).all() for v in state.values()])
    if kept is None:
        kept = epoch > 1
    if not bool(finite.all()):
        bad = [k for k, ok in zip(state, finite.tolist(), strict=True) if not ok]
        amp = {torch.float16: ", or use --amp bf16 or off", torch.bfloat16: ", or use --amp off"}.get(amp_dtype, "")
        raise Diverged(
            f"the run diverged in epoch {epoch}: {len(bad)} tensors of the model hold NaN or inf "
            f"(first: {bad[0]}); {'the last checkpoint is kept' if kept else 'nothing was saved'}: "
            f"{divergence_fix(cfg)}{amp}"
        )
    if loss is not None and not math.isfinite(loss):
        log.warning(
            "epoch %d: the mean loss is %s (some steps overflowed%s)",
            epoch,
            loss,
            "; the loss scaler skipped them" if amp_dtype == torch.float16 else "",
        )
