"""The end of the FFCV / resident device pass as two Triton kernels: Gaussian blur, flip, then
normalisation, the cast to the trainer's dtype and its memory format (`DeviceAugment(kernel="triton")`).

Why: in torch this end is reflect pad, two depthwise convolutions, the flip's `where`, the
normalisation's subtract and divide, the cast and the channels-last copy: about six full passes over
the batch after the colour pass. Here:

    1. `_vertical_body`, one program per image and BLOCK pixels (all three channels): the vertical
       pass of the separable blur with the image's own taps into an fp32 temporary.
    2. `_horizontal_body`, the same grid: the horizontal pass read at the flipped column where the
       image is flipped, normalised per channel, cast and stored at the output's strides (a
       channels-last output is a strided store: no copy after).

The batch is read twice and written twice (once as fp32, once in the output's dtype). Reflect
padding is index arithmetic (no padded copy): row -1 reads row 1, row H reads row H - 2, as
`F.pad(mode="reflect")`, which `augment_gpu.gaussian_blur` pads with. `reference` is today's torch
code path, which the tests compare with; equal to float rounding. Without blur (`kernels=None`) only
kernel 2 runs, without its taps; without flip (`flip=None`, FFCV flips on the CPU) nothing is read.

On the CPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`), as `augment_triton`'s.
Opt-in: the GPU speed is not measured yet.
"""

from __future__ import annotations

import torch

from .augment_gpu import AugParams, _col, gaussian_blur, gaussian_kernels
from .augment_triton import check_batch, jitter_gray
from .momentum_triton import interpreting, jitted_for_mode, tl, triton

BLOCK = 1024  # pixels per program (times three channels)
# Under the interpreter each op of each program is a Python call over numpy arrays: the programs'
# count, not the pixels, sets the time (8 images of 224 px, 23 taps: 60 s at 1,024, 9 s at 16,384).
INTERPRET_BLOCK = 16384
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _zeros(offs):
    return offs.to(tl.float32) * 0.0


def _vertical_body(x, tmp, taps, H, W, K: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # n * 3 * HW passes 2**31 at 14k images of 224 px
    HW = H * W
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    h, w = offs // W, offs % W
    src, dst = x + n * 3 * HW, tmp + n * 3 * HW
    # Not tl.zeros: a jit function of triton's, which cannot run under the interpreter when triton
    # was imported before TRITON_INTERPRET was set (as augment_triton's tl.sum).
    r, g, b = _zeros(offs), _zeros(offs), _zeros(offs)
    for j in tl.static_range(K):
        t = tl.load(taps + n * K + j)
        row = tl.abs(h + (j - K // 2))  # reflect at the top edge: -1 -> 1
        row = tl.where(row >= H, 2 * H - 2 - row, row)  # and at the bottom: H -> H - 2
        at = row * W + w
        r += t * tl.load(src + at, mask=mask)
        g += t * tl.load(src + HW + at, mask=mask)
        b += t * tl.load(src + 2 * HW + at, mask=mask)
    tl.store(dst + offs, r, mask=mask)
    tl.store(dst + HW + offs, g, mask=mask)
    tl.store(dst + 2 * HW + offs, b, mask=mask)


def _horizontal_body(
    tmp,
    out,
    taps,
    flip,
    mean,
    std,
    H,
    W,
    s_n,
    s_c,
    s_h,
    s_w,
    K: tl.constexpr,
    BLUR: tl.constexpr,
    FLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    HW = H * W
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    h, w = offs // W, offs % W
    col = w  # the column of the blurred image that lands at w: W - 1 - w where flipped
    if FLIP:
        col = tl.where(tl.load(flip + n) != 0, W - 1 - w, w)
    src = tmp + n * 3 * HW + h * W
    if BLUR:
        r, g, b = _zeros(offs), _zeros(offs), _zeros(offs)
        for j in tl.static_range(K):
            t = tl.load(taps + n * K + j)
            at = tl.abs(col + (j - K // 2))  # reflect at the left edge
            at = tl.where(at >= W, 2 * W - 2 - at, at)  # and at the right
            r += t * tl.load(src + at, mask=mask)
            g += t * tl.load(src + HW + at, mask=mask)
            b += t * tl.load(src + 2 * HW + at, mask=mask)
    else:
        r = tl.load(src + col, mask=mask)
        g = tl.load(src + HW + col, mask=mask)
        b = tl.load(src + 2 * HW + col, mask=mask)
    dst = out + n * s_n + h * s_h + w * s_w
    ty = out.dtype.element_ty
    tl.store(dst, ((r - tl.load(mean)) / tl.load(std)).to(ty), mask=mask)
    tl.store(dst + s_c, ((g - tl.load(mean + 1)) / tl.load(std + 1)).to(ty), mask=mask)
    tl.store(dst + 2 * s_c, ((b - tl.load(mean + 2)) / tl.load(std + 2)).to(ty), mask=mask)


# Jitted per mode with its helper (jitted_for_mode, as augment_triton's): the kernels find `_zeros`
# among this module's globals, the plain function until then and the current mode's jitted one after.
_HELPERS = {"_zeros": _zeros}
_KERNELS: dict[bool, tuple] = {}


def _kernels() -> tuple:
    return jitted_for_mode(_KERNELS, globals(), _HELPERS, _vertical_body, _horizontal_body)


def reference(x, kernels, flip, mean, std, dtype, memory_format) -> torch.Tensor:
    """Today's torch code path: `augment_gpu`'s blur ("where": a delta kernel where not blurred) and
    flip, then `DeviceAugment`'s normalisation line."""
    if kernels is not None:
        x = gaussian_blur(x, kernels)
    if flip is not None:
        x = torch.where(_col(flip), x.flip(-1), x)
    return ((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).to(dtype).contiguous(memory_format=memory_format)


def _check(x, kernels, flip, dtype) -> None:
    check_batch(x, "the triton blur kernel")
    if dtype not in DTYPES:
        raise ValueError(f"the triton blur kernel writes one of {DTYPES}, not {dtype}")
    n, _, h, w = x.shape
    if flip is not None and flip.shape != (n,):
        raise ValueError(f"flip is {tuple(flip.shape)} for {n} images")
    if kernels is not None:
        k = kernels.shape[-1]
        if kernels.shape != (n, k) or k % 2 == 0:
            raise ValueError(f"kernels must be N x k with k odd, got {tuple(kernels.shape)} for {n} images")
        if k // 2 >= min(h, w):  # one reflection only, as F.pad(mode="reflect") refuses more
            raise ValueError(f"a blur kernel of {k} taps needs images larger than {k // 2} px, got {h} x {w}")


@torch.no_grad()
def blur_flip_normalize(
    x: torch.Tensor,
    kernels: torch.Tensor | None,
    flip: torch.Tensor | None,
    mean: torch.Tensor,
    std: torch.Tensor,
    dtype: torch.dtype,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """`reference` in two launches: float32 N x 3 x H x W, kernels N x k (None: no blur), flip N
    bool (None: no flip), mean and std of 3 channels -> a new tensor of `dtype` in `memory_format`.
    No host sync: the taps and flips are read on the device."""
    _check(x, kernels, flip, dtype)
    x = x.contiguous()
    n, _, h, w = x.shape
    out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=memory_format)
    if n == 0:
        return out
    vertical, horizontal = _kernels()
    block = INTERPRET_BLOCK if interpreting() else BLOCK
    grid = (n, triton.cdiv(h * w, block))
    mean, std = (t.to(torch.float32).reshape(3).contiguous() for t in (mean, std))
    src, taps, k = x, x, 1  # without blur kernel 2 reads x, and no taps (x: any pointer will do)
    if kernels is not None:
        taps, k = kernels.to(torch.float32).contiguous(), kernels.shape[1]
        src = torch.empty_like(x)
        vertical[grid](x, src, taps, h, w, K=k, BLOCK=block)
    flips = x if flip is None else flip.to(torch.int8)  # one byte per image; unread without flip
    horizontal[grid](
        src,
        out,
        taps,
        flips,
        mean,
        std,
        h,
        w,
        *out.stride(),
        K=k,
        BLUR=kernels is not None,
        FLIP=flip is not None,
        BLOCK=block,
    )
    return out


def augment_normalize(
    x: torch.Tensor, p: AugParams, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype, memory_format
) -> torch.Tensor:
    """The whole device pass of `DeviceAugment` in the fused kernels: jitter and grayscale
    (`augment_triton`), then blur, flip, normalisation, cast and layout (here): four passes over the
    batch (three without jitter or blur), beside a few small per-image ops (the taps, the flags).
    x: what `augment_triton.jitter_gray` reads (float32 in [0, 1] or uint8, N x 3 x H x W or views
    V x N x 3 x H x W, any strides); the result is (V * N) x 3 x H x W, view-major."""
    kernels = gaussian_kernels(p.sigma, p.blur, p.kernel_size) if p.use_blur else None
    return blur_flip_normalize(jitter_gray(x, p), kernels, p.flip, mean, std, dtype, memory_format)
