"""Split BatchNorm's training pass (`split_bn.split_batch_norm`) as six Triton kernels.

Why: `split_batch_norm` is a few whole-batch torch passes, ~4 forward and ~6 backward with fp32
temporaries; cuDNN's BN of one batch reads x twice forward and (x, dy) twice backward. Here, per
(sub-batch, channel), as cuDNN does per batch:

    1. `_stats_body`: each program reads ROW_STEPS consecutive tiles of BLOCK_R values (rows: a
       sub-batch's images x pixels) by BLOCK_C channels (fewer in the last group: its loop stops at
       the rows, `_group_tiles`), merges their means and centred sums of squares (M2) in registers
       (Chan's formula) and writes the group's; `_combine_body` combines the S x groups x C
       partials with Chan's formula, one launch where torch took 13 ops, and makes from them the
       S x C rstd, scale and shift (7 torch ops before). No atomics: the same input gives the same
       bits. No E[x^2] - E[x]^2: a mean ~100 stds from 0 keeps its variance.
    2. `_apply_body`: y = x * scale + shift, per (sub-batch, channel) scale and shift.
    3. `_grad_sums_body`: sum(dy) and sum(dy * xhat) over ROW_STEPS tiles a program (the last
       group's up to the rows); `_grad_combine_body` sums them over the groups into their means
       per sub-batch, and over the sub-batches into dbias and dweight, one launch where torch took
       5 ops.
    4. `_dx_body`: dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)), means per sub-batch.

So x is read twice forward and (x, dy) twice backward, with fp32 arithmetic (fp64 for fp64 inputs,
which gradcheck takes) and outputs in x's dtype and memory format. One kernel per pass serves both
dense layouts through strides (value n, c, pixel p at n * s_n + c * s_c + p * s_p): NCHW tiles are
BLOCK_R x 1 (a channel's pixels are contiguous runs), channels-last tiles BLOCK_R x BLOCK_C (a pixel's
channels are contiguous). Any other strides are copied to NCHW first (one more pass); a gradient in
other strides than x's is copied to x's (a size-1 dimension's stride, never read, may differ). Offsets
are int64 from the image index on. Nothing is read on the host (no `.item()`): a CUDA graph can
capture both passes.

On the CPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`), which is how the tests
compare them with `split_batch_norm_reference` without a GPU. Opt-in (SplitBatchNorm2d's kernel,
MoCo(bn_kernel="triton")): its GPU speed is not measured (bench/split_bn.py's `triton` column will,
and bench/throughput.py's `bntriton` rows in the whole step).

The kernel bodies and their jit helpers are in split_bn_triton_kernels.py; this module is the host
side: the tiles' geometry, the launches, the autograd.Function and the checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .momentum_triton import _strides, check_device, interpreting, tl, triton
from .split_bn import _split, check_channels, record_running
from .split_bn_triton_kernels import _kernels

TILE = 4096  # values per program: a tile of 16 KB of fp32 in registers (4 warps: 32 a thread)
CL_CHANNELS = 64  # channels of a channels-last tile at most (a 128 B run of fp16 per row)
# Under the interpreter each op of each program is a Python call: fewer, larger programs.
INTERPRET_TILE = 16384
# Row tiles a statistics or grad-sums program walks, merging them in registers into one partial: the
# partials and the combinations' work ROW_STEPS-fold fewer (ResNet-50's stem at batch 256, 8 splits:
# 392 groups a sub-batch, not 6272 tiles), programs still many (3136 there). A guess: not timed on a GPU.
ROW_STEPS = 16
# Under the interpreter a step of that loop costs what a program does, so more tiles a program save
# nothing there: a tile a program (the tests were 4x slower at 16 while the last group walked up to
# 15 tiles past a small batch's rows; the loops stop at the rows now, and 16 took about as long as 1).
INTERPRET_ROW_STEPS = 1
# The partials' combination: groups by channels a step (128 B rows); under the interpreter up to
# INTERPRET_TILE // COMBINE_TILES channels.
COMBINE_TILES, COMBINE_CHANNELS = 64, 32
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class _Tiles:
    """How the kernels cut a dense N x C x H x W batch into S sub-batches: their geometry arguments
    (R = values per channel in a sub-batch, C, HW, M = images per sub-batch, and the strides of an
    image, a channel and a pixel), the grid (row tiles, channel tiles, S) and the tile's constexprs;
    `groups`, the statistics' and grad sums' grid: `row_steps` (ROW_STEPS, INTERPRET_ROW_STEPS) row
    tiles a program, one partial each."""

    args: tuple[int, ...]
    grid: tuple[int, int, int]
    blocks: dict[str, int]
    groups: tuple[int, int, int]
    row_steps: int

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
        steps = INTERPRET_ROW_STEPS if interpreting() else ROW_STEPS
        groups = (triton.cdiv(grid[0], steps), *grid[1:])
        return cls(args, grid, {"BLOCK_R": block_r, "BLOCK_C": block_c}, groups, steps)

    @property
    def sums_blocks(self) -> dict[str, int]:
        """The statistics' and grad sums' constexprs: the tile's and ROW_STEPS."""
        return self.blocks | {"ROW_STEPS": self.row_steps}

    @property
    def group_rows(self) -> int:
        """Rows of a partial: `row_steps` tiles' (what is left of R in the last group)."""
        return self.blocks["BLOCK_R"] * self.row_steps

    def partials(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """2 x S x groups x C, for a pass's two per-group figures."""
        return torch.empty(2, self.groups[2], self.groups[0], self.args[1], device=x.device, dtype=dtype)


def _combine_channels(c: int) -> int:
    """Channels a program of the two combinations takes: COMBINE_CHANNELS; under the interpreter
    INTERPRET_TILE values a step (a program costs ~10 ms there, whatever its size)."""
    if interpreting():
        return min(triton.next_power_of_2(c), INTERPRET_TILE // COMBINE_TILES)
    return COMBINE_CHANNELS


def _combine(kernel, part: torch.Tensor, t: _Tiles, weight, bias, eps: float) -> torch.Tensor:
    """(mean, biased variance, rstd, shift0, scale, shift), 6 x S x C, from the groups' means and
    M2s (`part`, 2 x S x groups x C) in one launch of `kernel` (`_combine_body`): torch took 13 small
    ops, each a pass over the partials (x's values / (64 * ROW_STEPS) per figure in channels-last),
    and 7 more for the last four."""
    rows, c = t.args[:2]
    out = torch.empty(6, t.grid[2], c, device=part.device, dtype=part.dtype)
    block_c = _combine_channels(c)
    grid = (t.grid[2], triton.cdiv(c, block_c))
    blocks = {"GROUP_R": t.group_rows, "BLOCK_T": COMBINE_TILES, "BLOCK_C": block_c}
    flags = {"HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None}
    kernel[grid](part[0], part[1], out, weight, bias, eps, rows, c, t.groups[0], **flags, **blocks)
    return out


def _grad_combine(kernel, part: torch.Tensor, t: _Tiles, w_dtype, b_dtype, wanted) -> tuple:
    """(mean(dy) and mean(dy * xhat), 2 x S x C; dweight; dbias) from the groups' sums (`part`,
    2 x S x groups x C) in one launch of `kernel` (`_grad_combine_body`); dweight (dbias) None where
    not `wanted` (two bools)."""
    rows, c = t.args[:2]
    means = torch.empty(2, t.grid[2], c, device=part.device, dtype=part.dtype)
    dw, db = (torch.empty(c, device=part.device, dtype=d) if w else None for d, w in zip((w_dtype, b_dtype), wanted))
    block_c = _combine_channels(c)
    flags = {"HAS_DWEIGHT": dw is not None, "HAS_DBIAS": db is not None}
    blocks = {"BLOCK_T": COMBINE_TILES, "BLOCK_C": block_c}
    kernel[(triton.cdiv(c, block_c),)](
        part[0], part[1], means, dw, db, rows, c, t.groups[2], t.groups[0], **flags, **blocks
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
        stats[t.groups](x, part[0], part[1], *t.args, ACC=acc_tl, **t.sums_blocks)
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
        if _strides(dy) != _strides(x):  # the kernels read dy at x's strides (a size-1 dimension's: none)
            dy = torch.empty_like(x).copy_(dy)
        *_, grad_sums, grad_combine, dx_kernel = _kernels()
        part = t.partials(x, rstd.dtype)
        grad_sums[t.groups](x, dy, rstd, shift0, part[0], part[1], *t.args, **t.sums_blocks)
        means, dw, db = _grad_combine(grad_combine, part, t, *ctx.param_dtypes, ctx.needs_input_grad[1:3])
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            dx_kernel[t.grid](x, dy, dx, rstd, shift0, scale, means[0], means[1], *t.args, **t.blocks)
        return dx, dw, db, None, None


def _check(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    check_device(x.device, "the triton split BN kernel")
    if x.ndim != 4 or x.dtype not in DTYPES:
        raise ValueError(
            f"the triton split BN kernel takes N x C x H x W in one of {DTYPES}, got {x.dtype} {tuple(x.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):  # read by the combination kernel as x is
        if t is not None and (t.device != x.device or t.dtype not in DTYPES):
            raise ValueError(
                f"the triton split BN kernel takes a {name} on x's device ({x.device}) in one of {DTYPES}, "
                f"got a {t.dtype} one on {t.device}"
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
    _check(x, weight, bias)
    check_channels(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()  # a copy: the kernels take the two dense layouts
    weight, bias = (t if t is None else t.contiguous() for t in (weight, bias))  # read at stride 1
    y, mean, var = _SplitBatchNormTriton.apply(x, weight, bias, eps, num_splits)
    record_running(running_mean, running_var, mean, var, x.numel() // mean.numel(), momentum)
    return y
