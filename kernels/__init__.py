"""Hot numeric code, each kernel beside the plain reference version its tests compare it with."""

from .momentum import momentum_update, momentum_update_foreach, momentum_update_reference

__all__ = ["momentum_update", "momentum_update_foreach", "momentum_update_reference"]

# Batched augmentations (colour jitter, grayscale, blur, flip) for the FFCV/DALI device pass.
from .augment_gpu import AugParams, apply_reference, sample_params

__all__ += ["AugParams", "apply_reference", "sample_params"]
