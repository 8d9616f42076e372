"""Evaluation's resize (shorter side to S) and center crop, without the huge image a thin one makes.

`T.Resize(S)` then `T.CenterCrop(C)` on a 1 x 5000 image makes a 256 x 1,280,000 image (983 MB for
S = 256) to keep 224 x 224 of it. Where the resized image would be more than `THIN` times longer than
wide, `ResizeCenterCrop` resizes only the region the crop keeps, with PIL's `box`: the same filter at
the same scale and positions, read from the same pixels, so the crop is the same up to rounding (a
value off by 1 at most: the box's coordinates are not the exact products of the full resize). Other
images take torchvision's own two steps, whose bytes every evaluation has given so far.
"""

from __future__ import annotations

from PIL import Image
from torchvision import transforms as T

# Resized images longer than this many times their shorter side are cut first (at 16, a 256-pixel
# side makes at most a 256 x 4096 image: 3 MB). No photograph of ImageNet's comes near it.
THIN = 16


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) of `T.Resize(size)`'s output: the shorter side to `size`, the longer scaled
    and rounded down, as torchvision computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


class ResizeCenterCrop:
    """`T.Resize(size)` then `T.CenterCrop(crop)` (crop <= size) on a PIL image."""

    def __init__(self, size: int, crop: int):
        self.size, self.crop = size, crop
        self.resize, self.center_crop = T.Resize(size), T.CenterCrop(crop)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        new_w, new_h = resized_size(w, h, self.size)
        if max(new_w, new_h) <= THIN * self.size:
            return self.center_crop(self.resize(img))
        # T.CenterCrop's offsets in the resized image (its round, half to even), mapped back to the
        # image: a box of crop x crop resized pixels, which PIL resamples with the full resize's filter
        left = round((new_w - self.crop) / 2.0)
        top = round((new_h - self.crop) / 2.0)
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy)
        return img.resize((self.crop, self.crop), Image.Resampling.BILINEAR, box=box)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, crop={self.crop})"
