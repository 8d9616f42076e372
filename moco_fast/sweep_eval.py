"""A sweep setting's result from its finished run: the last epoch's row, kNN on the backbone and
on the head's output (and of a random init with --knn-baseline), and optionally a short linear
classifier on cached features (written as sweep_lincls.json beside the checkpoint)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moco_fast.config import ConfigError, TrainConfig, read_json_object
from moco_fast.metrics import read_rows
from moco_fast.run_folder import SWEEP_LINCLS_RESULT, hold_output

if TYPE_CHECKING:
    from moco_fast.data import DataSplits
    from moco_fast.sweep import Setting

log = logging.getLogger("moco_fast")

# What the sweep's classifier records in its state and result (continued_by), and so how the sweep
# knows them for its own: a new wording would make every earlier sweep's files another run's.
SWEEP_CONTINUES = "the same sweep command continues it"


def _last_row(folder: Path) -> dict[str, Any]:
    """The last epoch's row of the setting's metrics.jsonl ({} without one)."""

    return next((row for row in reversed(read_rows(folder)) if "loss" in row), {})


def k_columns(cfg: TrainConfig, k: int | None) -> dict[str, Any]:
    """A row's K as the setting ran it (sweep_table.shown says which): end-to-end's batch (the
    negatives are the batch's other keys, one process), else `k`, the model's (the memory bank draws
    at most one negative per training image), with the K asked where it differs. `k` None: not known
    (a run that diverged on data whose images the sweep cannot count), the K asked."""
    if cfg.moco.mechanism == "end-to-end":
        return {"k": cfg.optim.batch_size}
    if k is None or k == cfg.moco.k:
        return {"k": cfg.moco.k}
    return {"k": k, "k_asked": cfg.moco.k}


def setting_columns(cfg: TrainConfig, s: Setting, k: int | None) -> dict[str, Any]:
    """The columns of a setting's row that say what it ran (k: as k_columns takes it), those of a
    finished setting's result and of a diverged one's row alike."""
    columns = {"name": s.name, "mechanism": s.mechanism, **k_columns(cfg, k)}
    return {**columns, "m": s.m, "shuffle_bn": s.shuffle_bn, "epochs": cfg.optim.epochs}


def evaluate_setting(
    cfg: TrainConfig, s: Setting, splits: DataSplits | None, lincls_epochs: int, lincls_lr: float
) -> dict[str, Any]:
    """One setting's result from its finished checkpoint and metrics: kNN on `splits` (the sweep's
    listing; None: no eval split, no kNN) on the backbone and on the head output (and of a random
    init with --knn-baseline), the linear classifier if asked."""
    from moco_fast.checkpoint import CHECKPOINT_NAME, load_model
    from moco_fast.monitor import knn_figures
    from moco_fast.trainer import resolve_device

    folder = Path(cfg.runtime.out)
    last = _last_row(folder)
    device = resolve_device(cfg.runtime.device)
    model, _ = load_model(folder / CHECKPOINT_NAME, device)
    res = setting_columns(cfg, s, int(model.k))
    res.update(
        {
            "loss": last.get("loss"),
            "pretext_acc": last.get("pretext_acc"),
            "knn_top1": None,
            "knn_head_top1": None,
            "random_knn_top1": None,  # with --knn-baseline
            "img_per_s": last.get("img_per_s"),
        }
    )
    if splits is not None:
        res.update(knn_figures(model, splits, cfg, device))
    del model
    if lincls_epochs > 0:
        res["linear_top1"] = _linear(cfg, folder, splits, lincls_epochs, lincls_lr)
    res["lincls_epochs"] = lincls_epochs
    res["lincls_lr"] = lincls_lr if lincls_epochs > 0 else None
    return res


def _linear(cfg: TrainConfig, folder: Path, splits: DataSplits, epochs: int, lr: float) -> float | None:
    """The linear classifier's top-1 on `splits`, the sweep's listing of the data (made once for
    every setting: sweep._check_device_and_data)."""
    from moco_fast.checkpoint import CHECKPOINT_NAME
    from moco_fast.classifier_epochs import clear_state, continued_by, resumable_state, state_path
    from moco_fast.data_listing import listing_fingerprint
    from moco_fast.lincls import LinclsConfig, run_lincls
    from moco_fast.trainer import eval_workers, resolve_device

    out = folder / SWEEP_LINCLS_RESULT  # not lincls.json: `moco-fast lincls`'s own result stays
    steps = ",".join(str(max(1, round(epochs * f))) for f in (0.6, 0.8))
    lc = LinclsConfig(
        checkpoint=str(folder / CHECKPOINT_NAME),
        data=cfg.data.data,
        epochs=epochs,
        lr=lr,
        schedule=steps,
        cached_features=True,
        workers=eval_workers(cfg.data.workers, resolve_device(cfg.runtime.device)),
        device=cfg.runtime.device,
        seed=cfg.runtime.seed,
        out=str(out),
    )
    # a sweep stopped in this setting's classifier continues it; one run with other settings (another
    # --lincls-epochs, a checkpoint trained further, other images in --data since), or one that cannot
    # be read, is the sweep's own to start over; a result or state it did not leave is refused
    # (refuse_others_files). run_lincls takes the state as read here
    with hold_output(out, "sweep", "lincls or finetune"):  # its other holders (a second sweep stops earlier)
        # run_sweep's check again, held: a user's run may have left its files there while other
        # settings trained, which the classifier would write over, delete or continue as its own
        refuse_others_files(folder)
        loaded = None
        if state_path(out).is_file():
            loaded, why = resumable_state(out, lc, "lincls", listing_fingerprint(splits))
            if loaded is None:
                log.info("%s: its linear classifier %s; it starts over", folder, why)
                clear_state(out)
        with continued_by(SWEEP_CONTINUES, "--lincls-lr"):
            return run_lincls(replace(lc, resume=state_path(out).is_file()), splits, loaded)["top1"]


def refuse_others_files(folder: Path) -> None:
    """A ConfigError when the setting's classifier files, its result (sweep_lincls.json) and the state
    beside it (sweep_lincls.state.pt), are not this sweep's classifier's (their continued_by): those
    of a user's `moco-fast lincls --out` of that name, or another command's state, which the sweep
    would otherwise overwrite, delete as its own state of other settings, or take over. A state that
    cannot be read is the sweep's to start over (nothing resumes it), a result that cannot be read its
    to write over; a result written before results recorded continued_by is taken for the sweep's.
    Called before any setting trains (run_sweep) and again as the classifier starts (_linear),
    holding its files."""
    from moco_fast import checkpoint as ckpt
    from moco_fast.classifier_epochs import state_path
    from moco_fast.data import DataError
    from moco_fast.finetune import PROTOCOL as FINETUNE_PROTOCOL

    out = folder / SWEEP_LINCLS_RESULT
    result = read_json_object(out) or {}  # one that cannot be read is the sweep's to write over, unsaid
    if result.get("continued_by", SWEEP_CONTINUES) != SWEEP_CONTINUES:
        command = "finetune" if result.get("protocol") == FINETUNE_PROTOCOL else "lincls"  # they record it
        raise ConfigError(
            f"{out} holds a {command} result that the sweep did not write (a `moco-fast {command} --out` of that "
            "name): the sweep's linear classifier of this setting writes its own there; move it away, then run the "
            "sweep again"
        )
    path = state_path(out)
    if not path.is_file():
        return
    try:
        state = ckpt.load(path, mmap=True)  # a look at two fields: no read of its tensors
    except DataError:
        return
    if state.get("continued_by") == SWEEP_CONTINUES:
        return
    command = state.get("command")
    what, whose, finish = "a file", "that the sweep did not leave", ""  # a training checkpoint, say
    if command in ("lincls", "finetune"):
        what = f"an interrupted {command} run's state"
        finish = f" (`moco-fast {command} --resume --out {out}` with that run's flags finishes it)"
        if "continued_by" not in state:  # saved before states recorded it: an older sweep's own, maybe
            whose = "that the sweep cannot tell for its own (saved before states said what continues them)"
    raise ConfigError(
        f"{path} holds {what} {whose}{finish}: the sweep's linear classifier of this setting keeps its state "
        "there; move it away, then run the sweep again"
    )
