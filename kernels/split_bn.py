"""Split BatchNorm in training: BN statistics per sub-batch (`num_splits` equal slices along N).

The reference runs the native batch_norm kernel (cuDNN / oneDNN) once per sub-batch and concatenates
the outputs: at the default 8 splits that is 8 small launches per BN layer and a copy of the
activations, which on a GPU made the fp16 channels-last ResNet-50 step ~2.6x slower than plain BN
(154 against 59.7 ms at batch 256 on an H200, bench/results/h200-2026-11-30.md; issue 6).
`split_batch_norm` views the batch as S x N/S x C x H x W instead (a view for NCHW and channels-last
alike: only N splits) and makes a few whole-batch passes whatever S is: statistics, one affine pass,
and a closed-form backward. Neither reads a tensor on the host, so a CUDA graph can capture both.
`split_batch_norm_regroup` is the official CIFAR demo's way, one native call on S x C channels,
kept for bench/split_bn.py to time against the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def split_batch_norm(
    x: torch.Tensor,
    num_splits: int,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """Training-mode BN of `x` (N x C x H x W) with each sub-batch's own statistics; the running
    statistics move (in place) towards the mean over sub-batches of what each one's BN would record:
    its mean, and its unbiased variance. None for both (track_running_stats=False): nothing recorded."""
    xs = _split(x, num_splits)
    check_channels(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    y, mean, var = _SplitBatchNorm.apply(xs, weight, bias, eps)
    record_running(running_mean, running_var, mean, var, xs.numel() // mean.numel(), momentum)
    return y.view(x.shape)


def record_running(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float,
) -> None:
    """Moves the running statistics (in place; None: nothing recorded) towards the mean over
    sub-batches of each one's `mean` and unbiased variance: `var` (biased, of `count` values per
    channel) times count / (count - 1). `mean` and `var`: S x ... x C x ..., one value per sub-batch
    and channel, S first (S x 1 x C x 1 x 1 here, S x C in the Triton version)."""
    if running_mean is None:
        return
    with torch.no_grad():
        running_mean.lerp_(mean.mean(0).flatten().to(running_mean.dtype), momentum)
        running_var.lerp_((var * (count / (count - 1))).mean(0).flatten().to(running_var.dtype), momentum)


def split_batch_norm_reference(
    x: torch.Tensor,
    num_splits: int,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """`split_batch_norm` the plain way: F.batch_norm on each sub-batch (a slice of a channels-last
    batch along N stays channels-last), each updating its own copy of the running statistics, whose
    mean becomes the new running statistics; the outputs concatenated."""
    chunks = _split(x, num_splits).unbind(0)
    run_mean = running_mean.unsqueeze(0).repeat(num_splits, 1)  # S x C
    run_var = running_var.unsqueeze(0).repeat(num_splits, 1)
    outs = [
        F.batch_norm(chunk, run_mean[i], run_var[i], weight, bias, True, momentum, eps)
        for i, chunk in enumerate(chunks)
    ]
    with torch.no_grad():
        running_mean.copy_(run_mean.mean(0))
        running_var.copy_(run_var.mean(0))
    return torch.cat(outs)


def split_batch_norm_regroup(
    x: torch.Tensor,
    num_splits: int,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """The official CIFAR demo's split BN: one native F.batch_norm on the batch regrouped to
    N/S x S*C x H x W, so that sub-batch i is images i, i + S, i + 2S, ... (interleaved, where the
    others take N/S consecutive images: the same BN of a randomly shuffled batch, not the same
    function). A view of an NCHW batch; any other layout (channels-last) is copied in, and the output
    copied back to it. Running statistics as the reference keeps them: S copies, each moved by its
    sub-batch, averaged. Timed against the others by bench/split_bn.py; no model uses it."""
    n, c = x.shape[:2]
    _split(x, num_splits)  # the same errors as the others
    layout = torch.contiguous_format
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        layout = torch.channels_last
    xr = x.contiguous().view(n // num_splits, num_splits * c, *x.shape[2:])
    track = running_mean is not None
    run_mean = running_mean.repeat(num_splits) if track else None  # S*C, split-major as the channels
    run_var = running_var.repeat(num_splits) if track else None
    affine = (None if t is None else t.repeat(num_splits) for t in (weight, bias))
    y = F.batch_norm(xr, run_mean, run_var, *affine, True, momentum, eps)
    if track:
        with torch.no_grad():
            running_mean.copy_(run_mean.view(num_splits, c).mean(0))
            running_var.copy_(run_var.view(num_splits, c).mean(0))
    return y.view(x.shape).contiguous(memory_format=layout)


def _split(x: torch.Tensor, s: int) -> torch.Tensor:
    """`x` (N x C x H x W) as S x N/S x C x H x W, or ValueError where BN cannot train on it."""
    n = x.shape[0]
    if n % s:
        raise ValueError(f"batch {n} is not divisible by bn_splits={s}")
    if x[: n // s, 0].numel() == 1:  # F.batch_norm's error
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x[: n // s].shape}")
    return x.view(s, n // s, *x.shape[1:])


def check_channels(x: torch.Tensor, **per_channel: torch.Tensor | None) -> None:
    """ValueError, in F.batch_norm's words, unless each tensor given (weight, bias, running statistics)
    holds one value per channel of `x`: a weight of 1 would broadcast over every channel, and the
    Triton kernels would read a shorter one past its end."""
    c = x.shape[1]
    for name, t in per_channel.items():
        if t is not None and t.numel() != c:
            raise ValueError(f"{name} should contain {c} elements not {t.numel()}")


class _SplitBatchNorm(torch.autograd.Function):
    """y = (x - mean) * rstd * weight + bias with each sub-batch's own mean and rstd, and the
    closed-form BN backward; on S x M x C x H x W (`_split`), reducing over M, H and W.

    Statistics and arithmetic are fp32 for fp16 / bf16 inputs too, as in cuDNN: a shift
    (bias - mean * scale) rounded to fp16 is off by ~0.03 where a mean is ~100 stds, and so is every
    output. The affine pass and the input gradient write x's dtype from fp32 operands
    (`_addcmul_like`). Saved for backward: `x` as it came and the S x C statistics, not an fp32 copy
    (autograd through the statistics would keep one per layer). The backward is once_differentiable:
    no gradient of a gradient (native BN has one), which no moco_fast loss takes.
    No torch.amp.custom_fwd / custom_bwd: with autocast on or off (the backward runs under whatever
    state its caller has) every op here gets the same dtypes, its operands being fp32 already where
    autocast would cast (rsqrt, sum) or promote (addcmul), and out= and dtype= calls not autocast.
    """

    @staticmethod
    def forward(ctx, xs, weight, bias, eps):
        var, mean = _stats(xs, welford=xs.is_cuda)  # S x 1 x C x 1 x 1
        rstd = torch.rsqrt(var + eps)
        shift0 = torch.mul(mean, rstd).neg_()  # xhat = x * rstd + shift0
        w, b = (None if t is None else t.view(-1, 1, 1) for t in (weight, bias))
        scale = rstd if w is None else rstd * w
        # y = xhat * w + b: shift0 * w + b, each term where given (one op for both, as the model has)
        if b is None:
            shift = shift0 if w is None else shift0 * w
        else:
            shift = shift0 + b if w is None else torch.addcmul(b, shift0, w)
        ctx.set_materialize_grads(False)  # no zero tensors for the statistics' gradients
        ctx.save_for_backward(xs, rstd, shift0, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return _addcmul_like(xs, shift, xs, scale), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _mean, _var):
        if dy is None:  # y took no part in the loss
            return None, None, None, None
        xs, rstd, shift0, weight = ctx.saved_tensors
        xhat = torch.addcmul(shift0, xs, rstd)  # fp32 (fp64 for gradcheck)
        sum_dy = dy.sum((1, 3, 4), keepdim=True, dtype=rstd.dtype)
        sum_dy_xhat = (dy * xhat).sum((1, 3, 4), keepdim=True)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)), means over each sub-batch
            scale = rstd if weight is None else rstd * weight.view(-1, 1, 1)
            per_count = scale * (-rstd.numel() / xs.numel())  # -scale / values per channel in a sub-batch
            dx = _addcmul_like(xs, torch.addcmul(per_count * sum_dy, xhat, per_count * sum_dy_xhat), dy, scale)
        if ctx.needs_input_grad[1]:
            dw = sum_dy_xhat.sum(0).flatten().to(weight.dtype)
        if ctx.needs_input_grad[2]:
            db = sum_dy.sum(0).flatten().to(ctx.bias_dtype)
        return dx, dw, db, None


def _stats(xs: torch.Tensor, welford: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(biased variance, mean) of each sub-batch and channel, fp32 (fp64 for an fp64 `xs`: gradcheck),
    without E[x^2] - E[x]^2's cancellation. `welford`: one var_mean pass over an fp32 copy (fp16 /
    bf16) or `xs` itself (fp32), for CUDA. Else a sum, then the centred sum of squares: on the CPU
    var_mean over these dimensions (not the innermost) took ~9x as long as those two (fp32,
    32 x 256 x 16 x 16 channels-last, one thread)."""
    dims = (1, 3, 4)
    acc = torch.promote_types(xs.dtype, torch.float32)
    if welford:
        return torch.var_mean(xs.to(acc), dim=dims, correction=0, keepdim=True)
    count = xs.numel() // (xs.shape[0] * xs.shape[2])
    mean = xs.sum(dims, keepdim=True, dtype=acc) / count
    return (xs - mean).square_().sum(dims, keepdim=True) / count, mean


def _addcmul_like(x: torch.Tensor, t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """t + a * b, computed in the operands' common dtype (fp32) and written in x's dtype and layout:
    one pass in eager mode; under torch.compile, which takes no strided `out=`, a cast that the
    compiler fuses into it."""
    if torch.compiler.is_compiling():
        return torch.addcmul(t, a, b).to(x.dtype)
    return torch.addcmul(t, a, b, out=torch.empty_like(x))
