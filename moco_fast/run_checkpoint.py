"""The training run's checkpoint.pt: what each save holds (at an epoch's end, or within an epoch for a
stop or --save-every), and the check that the weights are finite before they replace the last save."""

from __future__ import annotations

import logging
from pathlib import Path

from moco_fast import checkpoint as ckpt
from moco_fast import distributed as dist_utils
from moco_fast.config import TrainConfig, to_dict
from moco_fast.divergence import check_finite
from moco_fast.epoch import EpochPart
from moco_fast.metrics import sync_rows
from moco_fast.model import MoCo
from moco_fast.step import amp_name

log = logging.getLogger("moco_fast")


class RunCheckpoints:
    """The run's checkpoint.pt, and the check that its weights are finite (divergence.check_finite)."""

    def __init__(
        self,
        out: Path,
        cfg: TrainConfig,
        model: MoCo,
        optimizer,
        scaler,
        world,
        num_images,
        amp_dtype,
        resumed: Path | None,
    ):
        self.out, self.cfg, self.model, self.optimizer, self.scaler = out, cfg, model, optimizer, scaler
        self.world, self.num_images, self.amp_dtype = world, num_images, amp_dtype
        # a checkpoint of the run is there (the one resumed from, or one saved since): a divergence says so
        self.kept = resumed is not None

    def check(self, mean_loss: float | None, epoch: int) -> None:
        check_finite(self.model, mean_loss, epoch, self.amp_dtype, self.cfg, self.kept)

    def save(self, epochs_done: int, part: EpochPart | None = None, row: dict | None = None) -> None:
        """checkpoint.pt (on rank 0; every rank takes part: the RNG states are gathered). "epoch" is
        the epochs finished, whatever else reads the file (evaluations, find_resume, the run folder's
        checks); a save within the next epoch adds "step" (its steps done) and "epoch_part" (EpochPart),
        after the check an epoch's end makes: non-finite weights must not replace the last good save.
        `row`: the metrics row of the epoch just finished, which --resume writes where the run ended
        before its writer did (an epoch's end saves first, then runs its kNN monitor)."""
        if part is not None:
            self.check(None, epochs_done + 1)  # a host sync, at a sync point
        rng_states = dist_utils.all_gather_objects(ckpt.rng_state())  # each rank's streams, for --resume
        self.kept = True
        if not dist_utils.is_main():
            return
        state = {
            "config": to_dict(self.cfg),
            "epoch": epochs_done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states[0],
            "rng_per_rank": rng_states,
            "shuffle_generator": dist_utils.shuffle_generator_state(),
            "world_size": self.world,
            "num_images": self.num_images,
            "amp_ran": amp_name(self.amp_dtype),  # --amp auto as it ran here (resume.warn_other_amp)
            "save_id": ckpt.new_save_id(),  # what the evaluations' results name (file_stamp)
        }
        if part is not None:
            state.update(step=part.step, epoch_part=part.to_dict())
        if row is not None:
            state["row"] = row
        path = self.out / ckpt.CHECKPOINT_NAME
        sync_rows(self.out)  # the rows this save covers: a resume from it would not write them again
        ckpt.save_atomic(state, path)
        if part is not None:
            log.info("saved %s at step %d of epoch %d", path, part.step, epochs_done + 1)
