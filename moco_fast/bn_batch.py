"""How many images each BatchNorm of the training step normalises together, and the run's warning
where they are too few for MoCo to learn."""

from __future__ import annotations

import logging

import torch

from moco_fast.config import MoCoConfig, TrainConfig

log = logging.getLogger("moco_fast")

# Below this many images a BN normalisation, a run is warned: on the demo set 4 a split did not learn
# and 16 did (docs/experiments.md, "Measured on the CPU"); the demo preset gives 16
FEW_BN_IMAGES = 8


def bn_splits(moco: MoCoConfig, world: int) -> int:
    """The sub-batches split BN cuts each batch into: --bn-splits with shuffle BN on one device (it
    stands in for the GPUs that shuffle BN spreads the batch over), else 1 (with several processes
    each one's BN normalises its own batch). The one rule of the model's BN layers and of the checks
    and warning on the images each sees."""
    return moco.bn_splits if moco.shuffle_bn and world == 1 else 1


def warn_few_bn_images(cfg: TrainConfig, world: int, device: torch.device) -> None:
    """One line where each BN normalisation of the step sees fewer than FEW_BN_IMAGES images: their
    statistics are noisy and MoCo may not learn. A run at --batch-size 16 with --bn-splits 8 (2
    images a split) trained without a word while its backbone's weights grew 250-fold in 15 steps,
    and the linear classifier on it logged losses of 1e9. Said by rank 0 of a run that trains, once:
    not by trainer.validate, which a sweep runs for each setting before training it and the run then
    runs again, nor by a refused run or one with nothing left to train. --sync-bn is named as a fix on
    CUDA only: with several CPU processes it is refused (PyTorch's SyncBatchNorm runs on GPUs only)."""
    b, splits = cfg.optim.batch_size, bn_splits(cfg.moco, world)
    fix = "raise --batch-size"
    if splits > 1:
        images, what = b // splits, f"--batch-size {b} split by --bn-splits {splits} gives each BN sub-batch"
        fix += " or lower --bn-splits"
    elif world > 1 and cfg.runtime.sync_bn:  # SyncBatchNorm: the statistics of every process's batch
        images, what = b * world, f"--sync-bn over {world} processes of --batch-size {b} gives BN"
    elif world > 1:  # --sync-bn would normalise every process's batch together, on GPUs
        images, what = b, f"--batch-size {b} gives each process's BN"
        fix += " or add --sync-bn" * (device.type == "cuda")
    else:
        images, what = b, f"--batch-size {b} gives BN"
    if images < FEW_BN_IMAGES:
        log.warning(
            "%s %d images: their statistics are noisy and MoCo may not learn (docs/experiments.md): %s",
            *(what, images, fix),
        )
