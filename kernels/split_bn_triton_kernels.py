"""The six @triton.jit bodies of split BN's training pass and their jit helpers, for the host side
in split_bn_triton.py (tiles, launches, the autograd.Function, checks), whose docstring says what each
computes and why. `_kernels()` jits them once per mode (compiled or TRITON_INTERPRET=1); no geometry
or tile size is read here: the host passes them as arguments and constexprs.
split_bn_triton.py calls `_kernels` through its own name for it, which the tests replace there.
"""

from __future__ import annotations

from .momentum_triton import jitted_for_mode, tl
from .momentum_triton import sum0 as _sum0  # a jit helper, jitted per mode below


def _div_rn(a, b):
    # Correctly rounded: Triton's fp32 / is approximate (div.full.f32), and torch's on CUDA by a
    # number multiplies by its reciprocal
    if a.dtype == tl.float64:
        return a / b  # div.rn.f64
    return tl.math.div_rn(a, b)


def _tile(rb, R, C, HW, M, s_n, s_c, s_p, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row tile rb of sub-batch program_id(2): rows r (image s * M + r // HW, pixel r % HW) by
    channels; (value offsets, their mask, channels, channel mask)."""
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = (tl.program_id(2) * M + r // HW).to(tl.int64)  # n * s_n passes 2**31 in large batches
    row = n * s_n + (r % HW).to(tl.int64) * s_p
    offs = row[:, None] + c.to(tl.int64)[None, :] * s_c
    return offs, (r < R)[:, None] & (c < C)[None, :], c, c < C


def _group_tiles(rb, R, ROW_STEPS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Tiles with rows from row tile rb (a group's first) on, ROW_STEPS at most: fewer in the last
    group, whose tiles past R the loops then do not walk (each a step of masked loads). From the
    arguments, nothing read on the host."""
    return tl.minimum((R - rb * BLOCK_R + BLOCK_R - 1) // BLOCK_R, ROW_STEPS)


def _tile_stats(x, rb, R, C, HW, M, s_n, s_c, s_p, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row tile rb's count of rows (what is left of R in the last, partly masked; rb < the tiles),
    its channels' means and M2s, its channels and their mask."""
    offs, mask, c, cmask = _tile(rb, R, C, HW, M, s_n, s_c, s_p, BLOCK_R, BLOCK_C)
    v = tl.load(x + offs, mask=mask, other=0.0).to(ACC)
    count = tl.minimum(R - rb * BLOCK_R, BLOCK_R).to(ACC)
    mean = _sum0(v) / count
    d = tl.where(mask, v - mean[None, :], 0.0)
    return count, mean, _sum0(d * d), c, cmask


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
    ROW_STEPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """ROW_STEPS consecutive row tiles from program_id(0) * ROW_STEPS on (the last group's up to R's
    last): each tile's count, mean and M2, merged into the group's by Chan's formula (exact, as the
    combination's), one partial of the group (S x groups x C)."""
    rb = tl.program_id(0) * ROW_STEPS
    n, mean, m2, c, cmask = _tile_stats(x, rb, R, C, HW, M, s_n, s_c, s_p, ACC, BLOCK_R, BLOCK_C)
    for i in range(1, _group_tiles(rb, R, ROW_STEPS, BLOCK_R)):
        n_b, mean_b, m2_b, c, cmask = _tile_stats(x, rb + i, R, C, HW, M, s_n, s_c, s_p, ACC, BLOCK_R, BLOCK_C)
        total = n + n_b
        delta = mean_b - mean
        mean += delta * (n_b / total)
        m2 += m2_b + delta * delta * (n * n_b / total)  # the cross term of the two tiles' means
        n = total
    at = (tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)) * C + c  # S x groups x C
    tl.store(part_mean + at, mean, mask=cmask)
    tl.store(part_m2 + at, m2, mask=cmask)


def _combine_body(
    part_mean,
    part_m2,
    out,
    weight,
    bias,
    eps: tl.float64,  # unannotated, a launch takes a Python float as fp32: 1e-5 off by 2.5e-14 in fp64
    R,
    C,
    TILES,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUP_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Sub-batch program_id(0)'s figures of BLOCK_C channels from its groups' partials (S x TILES x
    C, a group being GROUP_R rows): the mean and biased variance by Chan's formula, M2 = sum of the
    groups' M2 + sum of count * (group mean - mean)^2, the last group's count being what is left of
    R rows (two passes over the groups); then what the other kernels take, so that no torch op
    makes it: rstd, shift0 = -mean * rstd (xhat = x * rstd + shift0), scale and shift (y = x *
    scale + shift; rstd and shift0 without weight and bias). `out`: those six, S x C each, in that
    order."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = tl.program_id(0) * TILES * C
    acc = part_mean.dtype.element_ty
    total = tl.full([BLOCK_C], 0.0, acc)  # not tl.zeros: a jit function, as tl.sum (`_sum0`)
    for t0 in range(0, TILES, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < TILES)[:, None] & cmask[None, :]
        count = tl.minimum(R - t * GROUP_R, GROUP_R).to(acc)[:, None]
        total += _sum0(tl.load(part_mean + base + t[:, None] * C + c[None, :], mask=mask, other=0.0) * count)
    mu = total / R
    m2 = tl.full([BLOCK_C], 0.0, acc)
    for t0 in range(0, TILES, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < TILES)[:, None] & cmask[None, :]
        count = tl.minimum(R - t * GROUP_R, GROUP_R).to(acc)[:, None]
        at = base + t[:, None] * C + c[None, :]
        d = tl.load(part_mean + at, mask=mask, other=0.0) - mu[None, :]
        m2 += _sum0(tl.load(part_m2 + at, mask=mask, other=0.0) + tl.where(mask, count * d * d, 0.0))
    var = m2 / R
    var_eps = (var + eps).to(acc)  # an fp32 var + the fp64 eps is fp64 (compiled): rounded back once
    if acc == tl.float64:  # sqrt.rn.f64 and div.rn.f64: correctly rounded
        rstd = 1.0 / tl.sqrt(var_eps)
    else:
        # Both steps correctly rounded (Triton's fp32 sqrt and / are approximate): within ~1 ulp of
        # 1 / sqrt(var + eps); torch.rsqrt on CUDA is rsqrtf, within 2 ulp
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var_eps))
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
    offs, mask, c, cmask = _tile(tl.program_id(0), R, C, HW, M, s_n, s_c, s_p, BLOCK_R, BLOCK_C)
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
    ROW_STEPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """ROW_STEPS consecutive row tiles' (the last group's up to R's last) sum(dy) and sum(dy * xhat),
    one partial of the group (S x groups x C)."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    at = tl.program_id(2) * C + c
    k = tl.load(rstd + at, mask=cmask)
    k0 = tl.load(shift0 + at, mask=cmask)
    sum_dy = tl.full([BLOCK_C], 0.0, k.dtype)
    sum_dyx = tl.full([BLOCK_C], 0.0, k.dtype)
    rb = tl.program_id(0) * ROW_STEPS
    for i in range(0, _group_tiles(rb, R, ROW_STEPS, BLOCK_R)):
        offs, mask, _, _ = _tile(rb + i, R, C, HW, M, s_n, s_c, s_p, BLOCK_R, BLOCK_C)
        g = tl.load(dy + offs, mask=mask, other=0.0).to(k.dtype)  # 0 where masked: no term in either sum
        xhat = tl.load(x + offs, mask=mask, other=0.0).to(k.dtype) * k[None, :] + k0[None, :]
        sum_dy += _sum0(g)
        sum_dyx += _sum0(g * xhat)
    out = (tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)) * C + c
    tl.store(part_dy + out, sum_dy, mask=cmask)
    tl.store(part_dyx + out, sum_dyx, mask=cmask)


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
    """BLOCK_C channels' sums of the groups' sum(dy) and sum(dy * xhat) (S x TILES x C each): per
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
    offs, mask, c, cmask = _tile(tl.program_id(0), R, C, HW, M, s_n, s_c, s_p, BLOCK_R, BLOCK_C)
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
_HELPERS = {
    "_sum0": _sum0,
    "_div_rn": _div_rn,
    "_tile": _tile,
    "_tile_stats": _tile_stats,
    "_group_tiles": _group_tiles,
}
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
