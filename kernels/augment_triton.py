"""MoCo's colour jitter and random grayscale as two fused Triton kernels (`apply(..., kernel="triton")`).

Why: the torch "where" formulation of `augment_gpu` makes a dozen-plus full passes over the batch
(luma, mean, blend, clamp and hue at every one of the four jitter stages, then grayscale). Here each
pixel's three channels are loaded once, every op of its image runs in registers, and it is stored
once. Only contrast needs a value from the whole image: the mean luma of the image as it is just
before contrast in that image's order. So:

    1. `_mean_luma_kernel`, one program per image: applies the ops that precede contrast in the
       image's order (grayscale first with MoCo v1) and sums the luma: N floats.
    2. `_colour_kernel`, one program per image and BLOCK pixels: every op in order with those
       means, then grayscale.

The batch is read twice and written once. Arithmetic follows `augment_gpu` (torchvision's: clamps
after each op, LUMA weights, hue through its closed-form HSV round trip), equal to its "where" path
to float rounding. Blur and flip stay in torch (`augment_gpu._apply`), or run in `blur_triton`.

The input is read through its strides (a channels-last batch is not copied first), as fp32 in
[0, 1] or as uint8, which the kernels divide by 255 as they load it: FFCV's uint8 batch of two
views, N x 2 x S x S x 3, is read where it lies, with no permute, float or divide pass before
(`jitter_gray`). The output is fp32 (V * N) x 3 x H x W, contiguous.

On the CPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`), which is how the tests
compare them with the torch version without a GPU. Opt-in: the GPU speed is not measured yet.
"""

from __future__ import annotations

import torch

from .augment_gpu import BRIGHTNESS, CONTRAST, HUE, LUMA, AugParams, check_count
from .momentum_triton import check_device, jitted_for_mode, tl, triton
from .momentum_triton import sum0 as _sum0  # a jit helper, jitted per mode below

BLOCK = 1024  # pixels per program of the colour kernel (and per step of the mean kernel's loop)

# What the kernels read of this module, as constexprs (the only globals a compiled kernel may read).
_const = tl.constexpr if tl is not None else float
_W0, _W1, _W2 = (_const(w) for w in LUMA)
_BRIGHTNESS, _CONTRAST, _HUE = _const(BRIGHTNESS), _const(CONTRAST), _const(HUE)
_TINY = _const(torch.finfo(torch.float32).tiny)  # adjust_hue's guard against 0 / 0 for grey pixels


def _luma(r, g, b):
    return _W0 * r + _W1 * g + _W2 * b


def _sector(n, h6, minc, cr):
    k = n + h6
    k = k - 6.0 * tl.floor(k / 6.0)  # torch.remainder: the sign of the divisor
    return minc + cr * tl.minimum(tl.maximum(tl.abs(k - 2.0) - 1.0, 0.0), 1.0)


def _hue(r, g, b, shift):
    # augment_gpu.adjust_hue per pixel: channel c is min + chroma * clamp(|k - 2| - 1, 0, 1) with
    # k = (n_c + 6 h) mod 6, n = (5, 3, 1).
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    cr = maxc - minc
    h6 = tl.where(maxc == r, g - b, tl.where(maxc == g, b - r + 2.0 * cr, r - g + 4.0 * cr))
    h6 = h6 / tl.maximum(cr, _TINY) + 6.0 * shift
    return _sector(5.0, h6, minc, cr), _sector(3.0, h6, minc, cr), _sector(1.0, h6, minc, cr)


def _op(r, g, b, op, f, mean, USE_HUE):
    """One jitter op (`op`, read per image) with its factor; `mean`: contrast's mean luma."""
    if op == _BRIGHTNESS:
        r, g, b = f * r, f * g, f * b
    elif op == _HUE:
        if USE_HUE:
            r, g, b = _hue(r, g, b, f)
    else:  # contrast blends towards the image's mean luma, saturation towards each pixel's
        target = _luma(r, g, b)
        if op == _CONTRAST:
            target = r * 0.0 + mean  # a block, as in the other branch
        r, g, b = f * r + (1.0 - f) * target, f * g + (1.0 - f) * target, f * b + (1.0 - f) * target
    if op != _HUE:
        r = tl.minimum(tl.maximum(r, 0.0), 1.0)
        g = tl.minimum(tl.maximum(g, 0.0), 1.0)
        b = tl.minimum(tl.maximum(b, 0.0), 1.0)
    return r, g, b


def _gray(r, g, b, gray):
    if gray:
        y = _luma(r, g, b)
        r, g, b = y, y, y
    return r, g, b


def _contrast_stage(n, order):
    """Where contrast stands in image n's order (0-3; the order is a permutation of the four ops)."""
    at = 0
    for k in tl.static_range(4):
        at += k * (tl.load(order + n * 4 + k) == _CONTRAST).to(tl.int32)
    return at


def _load_rgb(x, n, offs, mask, layout, U8: tl.constexpr):
    """Image n's three channels at pixels `offs` as fp32 in [0, 1]: row n is image n % NI of view
    n // NI, read through x's strides; uint8 is divided by 255 here, in registers. `layout`: a
    tuple (HW, W, NI, then x's strides of views, images, channels, rows, columns)."""
    _, W, NI, s_v, s_i, s_c, s_h, s_w = layout
    src = x + (n // NI) * s_v + (n % NI) * s_i + (offs // W) * s_h + (offs % W) * s_w
    r = tl.load(src, mask=mask, other=0).to(tl.float32)
    g = tl.load(src + s_c, mask=mask, other=0).to(tl.float32)
    b = tl.load(src + 2 * s_c, mask=mask, other=0).to(tl.float32)
    if U8:  # div.rn, as torch's u8.float().div_(255): the same floats (`/` is div.full on a GPU)
        r, g, b = tl.math.div_rn(r, 255.0), tl.math.div_rn(g, 255.0), tl.math.div_rn(b, 255.0)
    return r, g, b


def _mean_luma_body(
    x,
    means,
    flags,
    order,
    factors,
    layout,
    U8: tl.constexpr,
    USE_HUE: tl.constexpr,
    USE_GRAY: tl.constexpr,
    GRAY_FIRST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # n * 3 * HW passes 2**31 at 14k images of 224 px
    at = _contrast_stage(n, order)
    gr = tl.load(flags + 2 * n + 1) != 0
    HW = layout[0]
    acc = tl.arange(0, BLOCK).to(tl.float32) * 0.0  # not tl.zeros (a jit function of triton's: see below)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < HW
        r, g, b = _load_rgb(x, n, offs, mask, layout, U8)
        if USE_GRAY and GRAY_FIRST:
            r, g, b = _gray(r, g, b, gr)
        if tl.load(flags + 2 * n) != 0:
            for k in tl.static_range(3):  # the ops before contrast: at most the first three
                if k < at:
                    op = tl.load(order + n * 4 + k)
                    r, g, b = _op(r, g, b, op, tl.load(factors + n * 4 + op), 0.0, USE_HUE)
        acc += tl.where(mask, _luma(r, g, b), 0.0)
    tl.store(means + n, _sum0(acc) / HW)  # momentum_triton.sum0: not tl.sum, see there


def _colour_body(
    x,
    out,
    means,
    flags,
    order,
    factors,
    layout,
    U8: tl.constexpr,
    USE_JITTER: tl.constexpr,
    USE_HUE: tl.constexpr,
    USE_GRAY: tl.constexpr,
    GRAY_FIRST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    HW = layout[0]
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    dst = out + n * 3 * HW
    r, g, b = _load_rgb(x, n, offs, mask, layout, U8)
    gr = tl.load(flags + 2 * n + 1) != 0
    if USE_GRAY and GRAY_FIRST:
        r, g, b = _gray(r, g, b, gr)
    if USE_JITTER:
        if tl.load(flags + 2 * n) != 0:
            mean = tl.load(means + n)
            for k in tl.static_range(4):
                op = tl.load(order + n * 4 + k)
                r, g, b = _op(r, g, b, op, tl.load(factors + n * 4 + op), mean, USE_HUE)
    if USE_GRAY and not GRAY_FIRST:
        r, g, b = _gray(r, g, b, gr)
    tl.store(dst + offs, r, mask=mask)
    tl.store(dst + HW + offs, g, mask=mask)
    tl.store(dst + 2 * HW + offs, b, mask=mask)


# The kernels' helpers, jitted per mode with them (jitted_for_mode): until then the module's globals
# hold the plain functions, after it the current mode's jitted ones.
_HELPERS = {
    "_sum0": _sum0,
    **{name: globals()[name] for name in ("_load_rgb", "_luma", "_sector", "_hue", "_op", "_gray", "_contrast_stage")},
}
_KERNELS: dict[bool, tuple] = {}


def _kernels() -> tuple:
    return jitted_for_mode(_KERNELS, globals(), _HELPERS, _mean_luma_body, _colour_body)


def check_batch(x: torch.Tensor, kernel: str, views: bool = False) -> None:
    """The Triton augmentation kernels' one input: a float32 N x 3 x H x W batch where check_device
    allows; with `views` (jitter_gray's) also uint8, and V x N x 3 x H x W. Else a ValueError."""
    check_device(x.device, kernel)
    if views and x.dtype in (torch.float32, torch.uint8) and x.ndim in (4, 5) and x.shape[-3] == 3:
        return
    if x.dtype != torch.float32 or x.ndim != 4 or x.shape[1] != 3:
        takes = "float32 or uint8 N x 3 x H x W or V x N x 3 x H x W" if views else "float32 N x 3 x H x W"
        raise ValueError(f"{kernel} takes {takes}, got {x.dtype} {tuple(x.shape)}")


def image_rows(x: torch.Tensor) -> torch.Tensor:
    """jitter_gray's input as V x N x 3 x H x W (a 4-D batch is one view): a view, no copy."""
    return x if x.ndim == 5 else x.unsqueeze(0)


def layout_of(rows: torch.Tensor) -> tuple[int, ...]:
    """The kernels' `layout` of V x N x 3 x H x W rows: HW, W, NI and the strides of views, images,
    channels, rows and columns (the JIT specialises each int: a stride of 1 is a constant)."""
    _, ni, _, h, w = rows.shape
    return (h * w, w, ni, *rows.stride())


@torch.no_grad()
def jitter_gray(x: torch.Tensor, p: AugParams) -> torch.Tensor:
    """`augment_gpu`'s colour jitter and grayscale of a batch in two launches; a new contiguous
    float32 (V * N) x 3 x H x W tensor. No host sync: every per-image choice is read on the device.

    x: float32 in [0, 1] or uint8 (divided by 255 as it is read, as `x.float().div_(255)` does), of
    any strides: N x 3 x H x W, or V x N x 3 x H x W, views of the same N images whose rows are
    view-major (row v * N + i: image i of view v). FFCV's N x V x S x S x 3 batch permuted
    (1, 0, 4, 2, 3) is such a view: the kernels read it where it lies, with no copy before them."""
    check_batch(x, "the triton augmentation kernel", views=True)
    rows = image_rows(x)
    v, ni, _, h, w = rows.shape
    n = v * ni
    check_count(n, p)
    out = torch.empty((n, 3, h, w), device=x.device, dtype=torch.float32)
    if n == 0:
        return out
    mean_kernel, colour_kernel = _kernels()
    # Per image: jitter and gray flags (N x 2 int8), order, fp32 factors: made on the device, no
    # copy to the host.
    flags = torch.stack([p.jitter, p.gray], dim=1).to(torch.int8)
    order, factors = p.order.contiguous(), p.factors.to(torch.float32).contiguous()
    spec = {"USE_HUE": p.use_hue, "USE_GRAY": p.use_gray, "GRAY_FIRST": p.gray_first, "BLOCK": BLOCK}
    spec["U8"] = x.dtype == torch.uint8
    layout = layout_of(rows)
    means = torch.empty(n, device=x.device, dtype=torch.float32)  # read only where p.use_jitter
    if p.use_jitter:
        mean_kernel[(n,)](rows, means, flags, order, factors, layout, **spec)
    grid = (n, triton.cdiv(h * w, BLOCK))
    colour_kernel[grid](rows, out, means, flags, order, factors, layout, USE_JITTER=p.use_jitter, **spec)
    return out
