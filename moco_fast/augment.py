"""The augmentation recipe: one frozen description that every loader backend translates.

No backend-specific field lives here (no DALI operator names, no FFCV pipeline objects): a backend
reads the numbers and builds its own operators. Each backend's tests check it against this spec
statistically (flip, grayscale, jitter and blur rates, crop areas and ratios): tests/test_dali.py,
test_ffcv_batches.py, test_resident.py and test_augment_kernels.py (the batched colour pass).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)  # the values the official MoCo CIFAR demo normalises with


@dataclass(frozen=True)
class AugSpec:
    """Two independent views of one image are drawn with these parameters."""

    image_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_prob: float = 0.2
    # MoCo v1 applies grayscale before the colour jitter; v2 after it.
    gray_before_jitter: bool = False
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # Kernel side as a fraction of the image side, forced odd (SimCLR/torchvision recipe: 23 at 224).
    blur_kernel_frac: float = 0.1
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def blur_kernel_size(self) -> int:
        k = max(3, int(self.blur_kernel_frac * self.image_size))
        return k if k % 2 == 1 else k + 1

    def with_size(self, image_size: int) -> AugSpec:
        return replace(self, image_size=image_size)


# MoCo v1 (He et al. 2020): RandomResizedCrop, RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4)
# always applied, horizontal flip; no blur.
MOCO_V1 = AugSpec(jitter_prob=1.0, hue=0.4, gray_before_jitter=True, blur_prob=0.0)
# MoCo v2 (Chen et al. 2020): jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale 0.2, blur p=0.5.
MOCO_V2 = AugSpec()
# The official MoCo CIFAR-10 demo: RandomResizedCrop(32) with torchvision's default scale
# (0.08, 1), v2 colour recipe, no blur, the demo's CIFAR statistics.
MOCO_CIFAR = AugSpec(image_size=32, crop_scale=(0.08, 1.0), blur_prob=0.0, mean=CIFAR_MEAN, std=CIFAR_STD)

# The CPU demo: crops of at least 20% of the image (v2's scale) so that 8 short epochs learn.
MOCO_DEMO = replace(MOCO_CIFAR, crop_scale=(0.2, 1.0))

AUG_PRESETS = {"v1": MOCO_V1, "v2": MOCO_V2, "cifar": MOCO_CIFAR, "demo": MOCO_DEMO}
