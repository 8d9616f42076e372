"""The torch backend's blur against torchvision's GaussianBlur, which it replaces for speed."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from moco_fast.loaders.torch_loader import SeparableBlur, view_transform
from PIL import Image
from torchvision import transforms as T

from moco_fast.augment import MOCO_V2


def noise(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Noise: every pixel differs from its neighbours, so any error in the taps or the border shows."""
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.mark.parametrize(
    ("kernel", "sigma"), [(3, 0.1), (3, 2.0), (7, 0.5), (23, 0.1), (23, 0.3), (23, 1.0), (23, 2.0)]
)
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_blur_is_torchvisions_to_one_grey_level(kernel, sigma, mode):
    # torchvision's kernel and mirrored border, rounded as torchvision rounds: at most one grey level
    # apart, and that on under 1% of the pixels (a sum that lands on .5 one way or the other)
    img = noise(40, 56, mode)  # not square: each pass on its own axis
    ref = TF.gaussian_blur(TF.pil_to_tensor(img), [kernel, kernel], [sigma, sigma]).int()
    out = SeparableBlur(kernel, (sigma, sigma))(img)
    assert out.mode == img.mode and out.size == img.size
    diff = (TF.pil_to_tensor(out).int() - ref).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


def test_views_draw_what_torchvisions_blur_drew_from_the_same_seed():
    # the same draws from torch's generator (whether to blur, then sigma), so a worker's seed gives the
    # views it gave before, and the same rate and sigmas the spec asks for
    spec = replace(MOCO_V2, image_size=48, blur_prob=0.5)
    ops = view_transform(spec).transforms
    i = next(
        i for i, op in enumerate(ops) if isinstance(op, T.RandomApply) and isinstance(op.transforms[0], SeparableBlur)
    )
    torchvisions = T.Compose(
        [*ops[:i], T.RandomApply([T.GaussianBlur(spec.blur_kernel_size, spec.blur_sigma)], 0.5), *ops[i + 1 :]]
    )
    img = noise(64, 80)
    for seed in range(12):
        torch.manual_seed(seed)
        ours = view_transform(spec)(img).int()
        torch.manual_seed(seed)
        theirs = torchvisions(img).int()
        assert (ours - theirs).abs().max() <= 1, seed
