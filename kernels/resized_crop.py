"""Random resized crop for a whole batch on the device: torchvision's `RandomResizedCrop`, batched.

Why: with the dataset resident on the GPU (`--loader resident`), cropping is the one augmentation
step that `augment_gpu` does not do, and a per-image loop would cost a kernel launch per image.
Here every image of a batch gets its own box in one pass, with no host sync:

    boxes = sample_boxes(n, height, width, scale, ratio, device, generator)  # N x 4: top, left, h, w
    out = resized_crop(x, boxes, size)             # fast: two batched matmuls
    out = resized_crop_reference(x, boxes, size)   # plain loop over torchvision.functional

`sample_boxes` draws as `RandomResizedCrop.get_params` does: up to ten tries of (area, log-ratio),
the first box that fits wins, else the central fallback crop; the ten tries are drawn at once and
the first fitting one is picked with `argmax`, so the distribution is the same.

`resized_crop` resizes with antialiased bilinear weights (the triangle filter widened by the scale
when shrinking, as PIL and `interpolate(..., antialias=True)` do). A resize is linear along each
axis, so the crop-and-resize of image n is `Wy[n] @ x[n] @ Wx[n]^T`, where `Wy[n]` (S x H) holds the
weights of output row o over the input rows, zero outside the box. Building the two weight
matrices per image and multiplying runs the whole batch in two batched matmuls.
"""

from __future__ import annotations

import math

import torch

TRIES = 10  # torchvision's RandomResizedCrop tries ten boxes before its central fallback


def fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's central crop when no try fits: the largest box with an allowed aspect ratio."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """N x 4 long (top, left, h, w) random resized crop boxes of a height x width image, on `device`."""
    device = torch.device(device)

    def rand(*shape):
        return torch.rand(*shape, device=device, generator=generator)

    area = height * width
    target = area * (rand(n, TRIES) * (scale[1] - scale[0]) + scale[0])  # N x TRIES
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(rand(n, TRIES) * (hi - lo) + lo)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting try (0 if none)
    any_fit = fits.any(dim=1)
    w = w.gather(1, first)[:, 0]
    h = h.gather(1, first)[:, 0]
    # Offsets: uniform over the positions where the box fits (torch.randint(0, H - h + 1)).
    top = torch.floor(rand(n) * (height - h + 1)).clamp(max=height - h)
    left = torch.floor(rand(n) * (width - w + 1)).clamp(max=width - w)
    # Where no try fits: the central fallback box (python scalars: no host->device copy).
    fb = fallback_box(height, width, ratio)
    cols = [torch.where(any_fit, col, v) for col, v in zip((top, left, h, w), fb, strict=True)]
    return torch.stack(cols, dim=1).long()


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """N x out_size x in_size: antialiased bilinear weights that resize the segment
    [start, start + length) of an axis of `in_size` pixels to `out_size` pixels (rows sum to 1).

    The filter of ATen's `_upsample_bilinear2d_aa` and PIL's resample: output pixel o is centred at
    c = scale * (o + 0.5) in the segment, scale = length / out_size; input pixel p weighs
    max(0, 1 - |p + 0.5 - c| / support) with support = max(scale, 1); weights are renormalised
    where the filter reaches past the segment's ends."""
    dev = start.device
    scale = length.to(torch.float32) / out_size  # N
    support = scale.clamp(min=1.0)  # N
    center = scale[:, None] * (torch.arange(out_size, device=dev, dtype=torch.float32) + 0.5)  # N x out
    p = torch.arange(in_size, device=dev)[None, :] - start[:, None]  # N x in: positions inside the segment
    dist = (p[:, None, :].to(torch.float32) + 0.5 - center[:, :, None]) / support[:, None, None]
    w = (1.0 - dist.abs()).clamp(min=0.0)  # N x out x in
    inside = (p >= 0) & (p < length[:, None])
    w = w * inside[:, None, :]
    return w / w.sum(dim=2, keepdim=True)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box n of image n and resize it to size x size: float N x C x H x W -> N x C x S x S.

    `boxes`: N x 4 long (top, left, h, w) on x's device, e.g. from `sample_boxes`."""
    if x.ndim != 4:
        raise ValueError(f"expected N x C x H x W, got {tuple(x.shape)}")
    if boxes.shape != (x.shape[0], 4):
        raise ValueError(f"expected {x.shape[0]} x 4 boxes, got {tuple(boxes.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a float tensor, got {x.dtype}")
    height, width = x.shape[2:]
    wy = resize_weights(boxes[:, 0], boxes[:, 2], height, size).to(x.dtype)  # N x S x H
    wx = resize_weights(boxes[:, 1], boxes[:, 3], width, size).to(x.dtype)  # N x S x W
    rows = torch.matmul(wy[:, None], x)  # N x C x S x W
    return torch.matmul(rows, wx.transpose(1, 2)[:, None])  # N x C x S x S


@torch.no_grad()
def resized_crop_reference(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The same, image by image with torchvision's `resized_crop` (antialiased bilinear)."""
    from torchvision.transforms import functional as TF

    out = []
    for img, (top, left, h, w) in zip(x, boxes.tolist(), strict=True):
        out.append(TF.resized_crop(img, top, left, h, w, [size, size], antialias=True))
    return torch.stack(out)
