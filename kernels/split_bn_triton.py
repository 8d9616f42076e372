"""Split BatchNorm's training pass (`split_bn.split_batch_norm`) as six Triton kernels.

Why: `split_batch_norm` is a few whole-batch torch passes, ~4 forward and ~6 backward with fp32
temporaries; cuDNN's BN of one batch reads x twice forward and (x, dy) twice backward. Here, per
(sub-batch, channel), as cuDNN does per batch:

    1. `_stats_body`: each program reads a tile of BLOCK_R values (rows: a sub-batch's images x
       pixels) by BLOCK_C channels and writes the tile's mean and centred sum of squares (M2);
       `_combine_body` combines the S x tiles x C partials with Chan's formula, one launch where
       torch took 13 ops, and makes from them the S x C rstd, scale and shift (7 torch ops
       before). No atomics: the same input gives the same bits. No E[x^2] - E[x]^2: a mean ~100
       stds from 0 keeps its variance.
    2. `_apply_body`: y = x * scale + shift, per (sub-batch, channel) scale and shift.
    3. `_grad_sums_body`: the tiles' sum(dy) and sum(dy * xhat); `_grad_combine_body` sums them
       over the tiles into their means per sub-batch, and over the sub-batches into dbias and
       dweight, one launch where torch took 5 ops.
    4. `_dx_body`: dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)), means per sub-batch.

So x is read twice forward and (x, dy) twice backward, with fp32 arithmetic (fp64 for fp64 inputs,
which gradcheck takes) and outputs in x's dtype and memory format. One kernel per pass serves both
dense layouts through strides (value n, c, pixel p at n * s_n + c * s_c + p * s_p): NCHW tiles are
BLOCK_R x 1 (a channel's pixels are contiguous runs), channels-last tiles BLOCK_R x BLOCK_C (a pixel's
channels are contiguous). Any other strides are copied to NCHW first (one more pass); a gradient in
other strides than x's is copied to x's. Offsets are int64 from the image index on. Nothing is read
on the host (no `.item()`): a CUDA graph can capture both passes.

On the CPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`), which is how the tests
compare them with `split_batch_norm_reference` without a GPU. Opt-in (SplitBatchNorm2d's kernel,
MoCo(bn_kernel="triton")): its GPU speed is not measured (bench/split_bn.py's `triton` column will,
and bench/throughput.py's `bntriton` rows in the whole step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .momentum_triton import interpreting, jitted_for_mode, tl, triton
from .split_bn import _split, record_running

TILE = 4096  # values per program: a tile of 16 KB of fp32 in registers (4 warps: 32 a thread)
CL_CHANNELS = 64  # channels of a channels-last tile at most (a 128 B run of fp16 per row)
# Under the interpreter each op of each program is a Python call: fewer, larger programs.
INTERPRET_TILE = 16384
# The partials' combination: tiles by channels a step (128 B rows); under the interpreter up to
# INTERPRET_TILE // COMBINE_TILES channels.
COMBINE_TILES, COMBINE_CHANNELS = 64, 32
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _sum0(v):
    # Not tl.sum (a jit function of triton's, built without the interpreter when triton was imported
    # before TRITON_INTERPRET was set, cannot run under it), nor tl.reduce with a helper of this
    # module's (the interpreter calls it once per element: minutes for these tests); tl.reduce with
    # triton's own sum combiner, which the interpreter does as one numpy sum.
    return tl.reduce(v, 0, tl.standard._sum_combine)


def _div_rn(a, b):
    # Correctly rounded: Triton's fp32 / is approximate (div.full.f32), and torch's on CUDA by a
    # number multiplies by its reciprocal
    if a.dtype == tl.float64:
        return a / b  # div.rn.f64
    return tl.math.div_rn(a, b)


def _tile(R, C, HW, M, s_n, s_c, s_p, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: rows r of sub-batch program_id(2) (image s * M + r // HW, pixel r % HW)
    by channels; (value offsets, their mask, channels, channel mask)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = (tl.program_id(2) * M + r // HW).to(tl.int64)  # n * s_n passes 2**31 in large batches
    row = n * s_n + (r % HW).to(tl.int64) * s_p
    offs = row[:, None] + c.to(tl.int64)[None, :] * s_c
    return offs, (r < R)[:, None] & (c < C)[None, :], c, c < C


def _stats_body(
    x,
    part_mean,
    part_m2,
    R,
    C,
    HW,
    M,
    s_n,
    s_c,
    s_p,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs, mask, c, cmask = _tile(R, C, HW, M, s_n, s_c, s_p, BLOCK_R, BLOCK_C)
    v = tl.load(x + offs, mask=mask, other=0.0).to(ACC)
    rb = tl.program_id(0)
    count = tl.minimum(R - rb * BLOCK_R, BLOCK_R).to(ACC)  # the last tile of rows is partly masked
    mean = _sum0(v) / count
    d = tl.where(mask, v - mean[None, :], 0.0)
    at = (tl.program_id(2) * tl.num_programs(0) + rb) * C + c  # S x tiles x C
    tl.store(part_mean + at, mean, mask=cmask)
    tl.store(part_m2 + at, _sum0(d * d), mask=cmask)


def _combine_body(
    part_mean,
    part_m2,
    out,
    weight,
    bias,
    eps,
    R,
    C,
    TILES,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Sub-batch program_id(0)'s figures of BLOCK_C channels from its tiles' partials (S x TILES x
    C): the mean and biased variance by Chan's formula, M2 = sum of the tiles' M2 + sum of count *
    (tile mean - mean)^2, the last tile's count being what is left of R rows (two passes over the
    tiles); then what the other kernels take, so that no torch op makes it: rstd, shift0 = -mean *
    rstd (xhat = x * rstd + shift0), scale and shift (y = x * scale + shift; rstd and shift0 without
    weight and bias). `out`: those six, S x C each, in that order."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = tl.program_id(0) * TILES * C
    acc = part_mean.dtype.element_ty
    total = tl.full([BLOCK_C], 0.0, acc)  # not tl.zeros: a jit function, as tl.sum (`_sum0`)
    for t0 in range(0, TILES, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < TILES)[:, None] & cmask[None, :]
        count = tl.minimum(R - t * BLOCK_R, BLOCK_R).to(acc)[:, None]
        total += _sum0(tl.load(part_mean + base + t[:, None] * C + c[None, :], mask=mask, other=0.0) * count)
    mu = total / R
    m2 = tl.full([BLOCK_C], 0.0, acc)
    for t0 in range(0, TILES, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < TILES)[:, None] & cmask[None, :]
        count = tl.minimum(R - t * BLOCK_R, BLOCK_R).to(acc)[:, None]
        at = base + t[:, None] * C + c[None, :]
        d = tl.load(part_mean + at, mask=mask, other=0.0) - mu[None, :]
        m2 += _sum0(tl.load(part_m2 + at, mask=mask, other=0.0) + tl.where(mask, count * d * d, 0.0))
    var = m2 / R
    if acc == tl.float64:  # sqrt.rn.f64 and div.rn.f64: correctly rounded
        rstd = 1.0 / tl.sqrt(var + eps)
    else:
        # Both steps correctly rounded (Triton's fp32 sqrt and / are approximate): within ~1 ulp of
        # 1 / sqrt(var + eps); torch.rsqrt on CUDA is rsqrtf, within 2 ulp
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
    shift0 = -mu * rstd
    scale, shift = rstd, shift0
    if HAS_WEIGHT:
        w = tl.load(weight + c, mask=cmask).to(acc)
        scale, shift = rstd * w, shift0 * w
    if HAS_BIAS:
        shift = shift + tl.load(bias + c, mask=cmask).to(acc)
    at = tl.program_id(0) * C + c
    figure = tl.num_programs(0) * C  # the S x C of one figure
    tl.store(out + at, mu, mask=cmask)
    tl.store(out + figure + at, var, mask=cmask)
    tl.store(out + 2 * figure + at, rstd, mask=cmask)
    tl.store(out + 3 * figure + at, shift0, mask=cmask)
    tl.store(out + 4 * figure + at, scale, mask=cmask)
    tl.store(out + 5 * figure + at, shift, mask=cmask)


def _apply_body(x, y, scale, shift, R, C, HW, M, s_n, s_c, s_p, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offs, mask, c, cmask = _tile(R, C, HW, M, s_n, s_c, s_p, BLOCK_R, BLOCK_C)
    at = tl.program_id(2) * C + c  # S x C
    a = tl.load(scale + at, mask=cmask)
    b = tl.load(shift + at, mask=cmask)
    v = tl.load(x + offs, mask=mask).to(a.dtype)
    tl.store(y + offs, (v * a[None, :] + b[None, :]).to(y.dtype.element_ty), mask=mask)


def _grad_sums_body(
    x,
    dy,
    rstd,
    shift0,
    part_dy,
    part_dyx,
    R,
    C,
    HW,
    M,
    s_n,
    s_c,
    s_p,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs, mask, c, cmask = _tile(R, C, HW, M, s_n, s_c, s_p, BLOCK_R, BLOCK_C)
    at = tl.program_id(2) * C + c
    k = tl.load(rstd + at, mask=cmask)
    k0 = tl.load(shift0 + at, mask=cmask)
    g = tl.load(dy + offs, mask=mask, other=0.0).to(k.dtype)  # 0 where masked: no term in either sum
    xhat = tl.load(x + offs, mask=mask, other=0.0).to(k.dtype) * k[None, :] + k0[None, :]
    out = (tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)) * C + c
    tl.store(part_dy + out, _sum0(g), mask=cmask)
    tl.store(part_dyx + out, _sum0(g * xhat), mask=cmask)


def _grad_combine_body(
    part_dy,
    part_dyx,
    means,
    dweight,
    dbias,
    R,
    C,
    S,
    TILES,
    HAS_DWEIGHT: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """BLOCK_C channels' sums of the tiles' sum(dy) and sum(dy * xhat) (S x TILES x C each): per
    sub-batch their means over its R values (`means`, 2 x S x C, what `_dx_body` takes), and over
    the sub-batches dbias and dweight, in their dtypes (None: not wanted). One launch where torch
    took 5 ops."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc = part_dy.dtype.element_ty
    total_dy = tl.full([BLOCK_C], 0.0, acc)
    total_dyx = tl.full([BLOCK_C], 0.0, acc)
    for s in range(0, S):
        sum_dy = tl.full([BLOCK_C], 0.0, acc)
        sum_dyx = tl.full([BLOCK_C], 0.0, acc)
        for t0 in range(0, TILES, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            at = (s * TILES + t[:, None]) * C + c[None, :]
            mask = (t < TILES)[:, None] & cmask[None, :]
            sum_dy += _sum0(tl.load(part_dy + at, mask=mask, other=0.0))
            sum_dyx += _sum0(tl.load(part_dyx + at, mask=mask, other=0.0))
        rows = tl.full([BLOCK_C], R, acc)
        tl.store(means + s * C + c, _div_rn(sum_dy, rows), mask=cmask)
        tl.store(means + (S + s) * C + c, _div_rn(sum_dyx, rows), mask=cmask)
        total_dy += sum_dy
        total_dyx += sum_dyx
    if HAS_DWEIGHT:
        tl.store(dweight + c, total_dyx.to(dweight.dtype.element_ty), mask=cmask)
    if HAS_DBIAS:
        tl.store(dbias + c, total_dy.to(dbias.dtype.element_ty), mask=cmask)


def _dx_body(
    x,
    dy,
    dx,
    rstd,
    shift0,
    scale,
    mean_dy,
    mean_dyx,
    R,
    C,
    HW,
    M,
    s_n,
    s_c,
    s_p,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs, mask, c, cmask = _tile(R, C, HW, M, s_n, s_c, s_p, BLOCK_R, BLOCK_C)
    at = tl.program_id(2) * C + c
    k = tl.load(rstd + at, mask=cmask)[None, :]
    k0 = tl.load(shift0 + at, mask=cmask)[None, :]
    a = tl.load(scale + at, mask=cmask)[None, :]
    m_dy = tl.load(mean_dy + at, mask=cmask)[None, :]
    m_dyx = tl.load(mean_dyx + at, mask=cmask)[None, :]
    g = tl.load(dy + offs, mask=mask).to(k.dtype)
    xhat = tl.load(x + offs, mask=mask).to(k.dtype) * k + k0
    tl.store(dx + offs, (a * (g - m_dy - xhat * m_dyx)).to(dx.dtype.element_ty), mask=mask)


# Jitted per mode with their helpers (momentum_triton.jitted_for_mode, as augment_triton's).
_HELPERS = {"_sum0": _sum0, "_div_rn": _div_rn, "_tile": _tile}
_KERNELS: dict[bool, tuple] = {}


def _kernels() -> tuple:
    return jitted_for_mode(
        _KERNELS,
        globals(),
        _HELPERS,
        _stats_body,
        _combine_body,
        _apply_body,
        _grad_sums_body,
        _grad_combine_body,
        _dx_body,
    )


@dataclass(frozen=True)
class _Tiles:
    """How the kernels cut a dense N x C x H x W batch into S sub-batches: their geometry arguments
    (R = values per channel in a sub-batch, C, HW, M = images per sub-batch, and the strides of an
    image, a channel and a pixel), the grid (row tiles, channel tiles, S) and the tile's constexprs."""

    args: tuple[int, ...]
    grid: tuple[int, int, int]
    blocks: dict[str, int]

    @classmethod
    def of(cls, x: torch.Tensor, s: int) -> _Tiles:
        n, c, h, w = x.shape
        s_n, s_c, s_h, s_w = x.stride()
        m, hw = n // s, h * w
        # Channels along the tile where they are the innermost dimension (stride 1): channels-last,
        # and an N x C x 1 x 1 batch, which is_contiguous() in both formats and whose pixel tile
        # would read one channel at stride C. A single channel (C == 1): pixels along it.
        block_c = min(CL_CHANNELS, triton.next_power_of_2(c)) if c > 1 and s_c == 1 else 1
        block_r = (INTERPRET_TILE if interpreting() else TILE) // block_c
        # a pixel's stride: W's, or H's where W is 1 (the stride of a size-1 dimension is arbitrary)
        args = (m * hw, c, hw, m, s_n, s_c, s_w if w > 1 else s_h)
        grid = (triton.cdiv(m * hw, block_r), triton.cdiv(c, block_c), s)
        return cls(args, grid, {"BLOCK_R": block_r, "BLOCK_C": block_c})

    def partials(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """2 x S x row tiles x C, for a pass's two per-tile figures."""
        return torch.empty(2, self.grid[2], self.grid[0], self.args[1], device=x.device, dtype=dtype)


def _combine_channels(c: int) -> int:
    """Channels a program of the two combinations takes: COMBINE_CHANNELS; under the interpreter
    INTERPRET_TILE values a step (a program costs ~10 ms there, whatever its size)."""
    if interpreting():
        return min(triton.next_power_of_2(c), INTERPRET_TILE // COMBINE_TILES)
    return COMBINE_CHANNELS


def _combine(kernel, part: torch.Tensor, t: _Tiles, weight, bias, eps: float) -> torch.Tensor:
    """(mean, biased variance, rstd, shift0, scale, shift), 6 x S x C, from the tiles' means and
    M2s (`part`, 2 x S x tiles x C) in one launch of `kernel` (`_combine_body`): torch took 13 small
    ops, each a pass over the partials (x's values / 64 per figure in channels-last), and 7 more for
    the last four."""
    rows, c = t.args[:2]
    out = torch.empty(6, t.grid[2], c, device=part.device, dtype=part.dtype)
    block_c = _combine_channels(c)
    grid = (t.grid[2], triton.cdiv(c, block_c))
    blocks = {"BLOCK_R": t.blocks["BLOCK_R"], "BLOCK_T": COMBINE_TILES, "BLOCK_C": block_c}
    flags = {"HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None}
    kernel[grid](part[0], part[1], out, weight, bias, eps, rows, c, t.grid[0], **flags, **blocks)
    return out


def _grad_combine(kernel, part: torch.Tensor, t: _Tiles, w_dtype, b_dtype, wanted) -> tuple:
    """(mean(dy) and mean(dy * xhat), 2 x S x C; dweight; dbias) from the tiles' sums (`part`,
    2 x S x tiles x C) in one launch of `kernel` (`_grad_combine_body`); dweight (dbias) None where
    not `wanted` (two bools)."""
    rows, c = t.args[:2]
    means = torch.empty(2, t.grid[2], c, device=part.device, dtype=part.dtype)
    dw, db = (torch.empty(c, device=part.device, dtype=d) if w else None for d, w in zip((w_dtype, b_dtype), wanted))
    block_c = _combine_channels(c)
    flags = {"HAS_DWEIGHT": dw is not None, "HAS_DBIAS": db is not None}
    blocks = {"BLOCK_T": COMBINE_TILES, "BLOCK_C": block_c}
    kernel[(triton.cdiv(c, block_c),)](
        part[0], part[1], means, dw, db, rows, c, t.grid[2], t.grid[0], **flags, **blocks
    )
    return means, dw, db


class _SplitBatchNormTriton(torch.autograd.Function):
    """`split_bn._SplitBatchNorm`'s forward and closed-form backward on a dense N x C x H x W batch,
    in the six kernels. Saved for backward: x as it came and the S x C figures. once_differentiable,
    as the torch version: no gradient of a gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, num_splits):
        t = _Tiles.of(x, num_splits)
        acc = torch.promote_types(x.dtype, torch.float32)
        stats, combine, apply, *_ = _kernels()
        part = t.partials(x, acc)
        acc_tl = getattr(tl, str(acc).removeprefix("torch."))  # tl.float32 or tl.float64
        stats[t.grid](x, part[0], part[1], *t.args, ACC=acc_tl, **t.blocks)
        mean, var, rstd, shift0, scale, shift = _combine(combine, part, t, weight, bias, eps)  # S x C each
        y = torch.empty_like(x)  # x's dtype and strides
        apply[t.grid](x, y, scale, shift, *t.args, **t.blocks)
        ctx.set_materialize_grads(False)  # no zero tensors for the statistics' gradients
        ctx.save_for_backward(x, rstd, shift0, scale)
        ctx.tiles = t
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _mean, _var):
        if dy is None:  # y took no part in the loss
            return None, None, None, None, None
        x, rstd, shift0, scale = ctx.saved_tensors
        t = ctx.tiles
        if dy.stride() != x.stride():  # the kernels read dy at x's strides
            dy = torch.empty_like(x).copy_(dy)
        *_, grad_sums, grad_combine, dx_kernel = _kernels()
        part = t.partials(x, rstd.dtype)
        grad_sums[t.grid](x, dy, rstd, shift0, part[0], part[1], *t.args, **t.blocks)
        means, dw, db = _grad_combine(grad_combine, part, t, *ctx.param_dtypes, ctx.needs_input_grad[1:3])
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            dx_kernel[t.grid](x, dy, dx, rstd, shift0, scale, means[0], means[1], *t.args, **t.blocks)
        return dx, dw, db, None, None


def _check(x: torch.Tensor) -> None:
    if triton is None:
        raise ValueError("the triton split BN kernel needs the triton package")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError("the triton split BN kernel needs a CUDA batch (or TRITON_INTERPRET=1 on the CPU)")
    if x.ndim != 4 or x.dtype not in DTYPES:
        raise ValueError(
            f"the triton split BN kernel takes N x C x H x W in one of {DTYPES}, got {x.dtype} {tuple(x.shape)}"
        )


def split_batch_norm_triton(
    x: torch.Tensor,
    num_splits: int,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """`split_bn.split_batch_norm` in the Triton kernels: training-mode BN of `x` (N x C x H x W) with
    each sub-batch's own statistics; the running statistics (None: nothing recorded) move in place
    towards the mean over sub-batches of each one's mean and unbiased variance. The same errors."""
    _split(x, num_splits)
    _check(x)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()  # a copy: the kernels take the two dense layouts
    y, mean, var = _SplitBatchNormTriton.apply(x, weight, bias, eps, num_splits)
    record_running(running_mean, running_var, mean, var, x.numel() // mean.numel(), momentum)
    return y
