"""One epoch of training: the thin loop over the loader's steps, the row metrics.jsonl gets, and
the part of an epoch that a checkpoint saved within it holds (a stop, --save-every).

The step never syncs the device to the host: losses are summed on the device and read once every
`log_every` steps (the progress bar; there the ranks also agree on a stop or a save) and once per
epoch (for metrics.jsonl).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moco_fast import distributed as dist_utils
from moco_fast.config import TrainConfig
from moco_fast.metrics import progress, rate
from moco_fast.stops import SaveClock, StopRequests, agree_at_sync
from moco_fast.text import plural

log = logging.getLogger("moco_fast")


@dataclass
class EpochPart:
    """The steps of an epoch done before a checkpoint within it: the epoch's row, after a resume,
    counts them with the rest (its loss, accuracy, time and speed are those of the whole epoch)."""

    step: int = 0  # steps of the epoch done
    loss_sum: float = 0.0  # sum of their losses (each the mean over the ranks)
    acc_sum: float = 0.0  # the same for the pretext accuracy (0-1)
    elapsed: float = 0.0  # seconds they took (saves not counted)
    steps: int = 0  # steps per epoch then: with another --batch-size or world size the epoch restarts
    batch_size: int = 0
    world_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def other_images(saved: int | None, now: int) -> str | None:
    """Where the data's images, counted anew (`now`), are not the checkpoint's count (`saved`; None:
    a checkpoint from before it held one), what changed, for a resume's warning; else None. A folder
    changed in place (a class folder added) is no changed setting: only the count tells."""
    if saved is None or saved == now:
        return None
    return (
        f"the data has {plural(now, 'image')} now, the run trained on {saved} "
        "(images or class folders added or removed since)"
    )


def resumed_part(saved: dict[str, Any] | None, epoch: int, loader, batch_size: int, world: int) -> EpochPart | None:
    """The part of epoch `epoch` (0-based) that the checkpoint holds, where this run can continue it
    at the next step; None at an epoch end. A checkpoint of other steps per epoch (another
    --batch-size, number of processes or data) or a loader that starts epochs at their first step
    only restarts the epoch, with a warning: its steps stay trained, their images come again.
    `saved["num_images"]` (the checkpoint's, where it has it): a data folder whose images were
    added or removed since restarts it too, even at the same steps per epoch, as the epoch's order
    of images is drawn over the new list and its steps done would not be the ones skipped."""
    if not saved or not saved.get("step"):
        return None
    part = EpochPart(**{k: saved[k] for k in EpochPart.__dataclass_fields__ if k in saved})
    now = (len(loader), batch_size, world)
    data_changed = other_images(saved.get("num_images"), loader.num_images)
    if (part.steps, part.batch_size, part.world_size) == now and loader.starts_mid_epoch and not data_changed:
        log.info("--resume: epoch %d continues at step %d of %d", epoch + 1, part.step + 1, part.steps)
        return part
    if not loader.starts_mid_epoch:
        # no advice: this loader restarts the epoch on any data; a changed count is still said, as
        # at an epoch's end (resume.warn_other_images)
        why, advice = "this loader starts an epoch at its first step only", ""
        if data_changed:
            why = f"{why}, and {data_changed}"
    elif data_changed:
        why, advice = data_changed, "; resume on the same images to continue it"
    else:
        why = (
            f"it had {plural(part.steps, 'step')} of {plural(part.batch_size, 'image')} in "
            f"{plural(part.world_size, 'process', 'processes')}, now {now[0]} of {now[1]} in {now[2]}"
        )
        advice = "; resume with the same --batch-size and process count to continue it"
    log.warning(
        "--resume: the checkpoint was saved at step %d of epoch %d, and %s: epoch %d starts again from its first "
        "step (the steps done stay in the weights%s)",
        *(part.step, epoch + 1, why, epoch + 1, advice),
    )
    return None


def run_epoch(
    step,
    loader,
    cfg: TrainConfig,
    epoch: int,
    lr: float,
    device: torch.device,
    world: int,
    done: EpochPart | None = None,
    stops: StopRequests | None = None,
    clock: SaveClock | None = None,
    save: Callable[[EpochPart], None] | None = None,
) -> dict[str, Any]:
    """One pass over the loader (from step `done.step`, which the loader must start at): the epoch's
    row (mean loss and pretext accuracy over every rank's steps, speed, time; its loss is what
    check_finite reads, so no second read of the device). At each host sync, a stop that a rank
    recorded or a save due by `clock` calls save(part) (None: the loader cannot resume within an
    epoch, and a stop drops the steps of the epoch done) and then raises the stop; a stop after the
    epoch's last sync within it (to the loop's end) is left agreed in `stops` for the trainer, after
    its epoch-end save."""
    done = done or EpochPart()
    stops = stops or StopRequests()
    clock = clock or SaveClock(0)
    b = cfg.optim.batch_size
    loss_sum = torch.full((), done.loss_sum, device=device)
    acc_sum = torch.full((), done.acc_sum, device=device)
    steps = len(loader)
    bar = progress(
        total=steps, initial=done.step, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", enabled=dist_utils.is_main()
    )
    t0 = time.perf_counter() - done.elapsed
    n = done.step
    with stops.deferred():  # the loader's workers start in here: they too record a stop, not die of it
        for i, batch in enumerate(loader, done.step):
            loss, acc = step(batch)
            loss_sum += loss
            acc_sum += acc
            n += 1
            bar.update(1)
            if (i + 1) % cfg.runtime.log_every == 0 or i + 1 == steps:
                # Host sync point: only every log_every steps, for the progress bar and what the
                # ranks agree on (a stop, a save: one all-reduce with several processes). The bar's
                # count runs on between syncs, so its figures name the step they are of. The clock is
                # read after the loss, whose copy waits for the step: before it, the rate counted steps
                # the host had queued but the device had not run.
                shown_loss = loss.item()
                elapsed = time.perf_counter() - t0
                figures = f"loss={shown_loss:.3f}, img_s={rate(n * b * world / elapsed)}"
                bar.set_postfix_str(f"at step {i + 1}: {figures}", refresh=False)
                # the last step's agreement comes after the loop: the loader ends its epoch first
                signum, due = agree_at_sync(stops, clock, device) if i + 1 < steps else (None, False)
                if (signum or due) and save is not None:
                    began = time.perf_counter()
                    sums = dist_utils.all_reduce_mean(torch.stack([loss_sum, acc_sum])).tolist()  # host sync
                    save(EpochPart(i + 1, *sums, elapsed, steps, b, world))
                    clock.saved()
                    t0 += time.perf_counter() - began  # the save's time is not the epoch's
                if signum:
                    bar.close()
                    raise stops.error()
        # The epoch's end (a host sync already, for its row): a stop that came after the last
        # --log-every sync, or while the loader ended, is agreed here, so that every rank saves the
        # epoch's end and then stops, rather than the rank that got it stopping alone (the others
        # waiting in the next collective) and the epoch's steps being lost.
        agree_at_sync(stops, clock, device)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    # host sync: once an epoch, both figures in one copy (an .item() each was a copy and a wait each)
    loss, acc = dist_utils.all_reduce_mean(torch.stack([loss_sum, acc_sum]) / max(n, 1)).tolist()
    row = {
        "epoch": epoch + 1,
        "loss": loss,
        "pretext_acc": acc * 100,
        "lr": lr,
        "img_per_s": n * b * world / elapsed,
        "img_per_s_per_device": n * b / elapsed,
        "epoch_time_s": elapsed,
    }
    return row
