"""Split BatchNorm (one-device shuffle BN): statistics per sub-batch, any memory format; the
whole-batch kernel (kernels/split_bn.py) and the regrouped one (the official demo's) against the
reference (F.batch_norm per sub-batch) and SplitBatchNorm2d against per-chunk nn.BatchNorm2d."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import ON_GPU
from moco_fast.kernels.split_bn import (
    _SplitBatchNorm,
    _stats,
    split_batch_norm,
    split_batch_norm_reference,
    split_batch_norm_regroup,
)
from torch import nn

from moco_fast.backbone import SplitBatchNorm2d


def reference_split(x, bn: nn.BatchNorm2d, s: int):
    outs = []
    for chunk in x.chunk(s):
        b = nn.BatchNorm2d(bn.num_features)
        b.load_state_dict(bn.state_dict())
        outs.append(b(chunk))
    return torch.cat(outs)


def split_bn(s: int, c: int = 3, **kw) -> SplitBatchNorm2d:
    bn = SplitBatchNorm2d(c, num_splits=s, **kw)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    return bn


def spread_batch(n: int = 16, c: int = 3, size: int = 5, channels_last: bool = False) -> torch.Tensor:
    """Images whose mean and spread grow along the batch: every sub-batch has statistics of its own,
    far from the whole batch's, so mixing up the splits' statistics shows."""
    x = torch.randn(n, c, size, size) * torch.linspace(0.5, 3, n).view(-1, 1, 1, 1) + torch.arange(n).view(-1, 1, 1, 1)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("s", [1, 2, 4])
def test_split_bn_matches_per_chunk_bn(s, channels_last):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bn = split_bn(s)
    ref = reference_split(x.contiguous(), bn, s)
    out = bn(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # Running stats: the mean over sub-batches of what each sub-batch's BN would record.
    chunks = x.contiguous().chunk(s)
    exp_mean = 0.9 * 0 + 0.1 * torch.stack([c.mean(dim=(0, 2, 3)) for c in chunks]).mean(0)
    torch.testing.assert_close(bn.running_mean, exp_mean, rtol=1e-4, atol=1e-5)
    # BN records the unbiased variance of each sub-batch (n - 1 in the denominator).
    exp_var = 0.9 * 1 + 0.1 * torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(bn.running_var, exp_var, rtol=1e-4, atol=1e-5)


def run_both(bn: SplitBatchNorm2d, x: torch.Tensor, steps: int = 2, bf16: bool = False):
    """(output, input grad) of SplitBatchNorm2d and of the reference kernel on a copy's parameters and
    statistics, after `steps` steps (the second one moves running statistics that are no longer the
    initial 0 and 1), and the copy."""
    ref = copy.deepcopy(bn)
    return [run_steps(fn, x, steps, bf16) for fn in (bn, kernel_of(ref, split_batch_norm_reference))], ref


def kernel_of(bn: nn.BatchNorm2d, kernel):
    """x -> `kernel` (a split BN function) on x with bn's splits, parameters and running statistics."""
    return lambda x: kernel(x, bn.num_splits, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.momentum, bn.eps)


def run_steps(fn, x: torch.Tensor, steps: int = 2, bf16: bool = False):
    """(output, input grad) of `fn` at its last step, the parameters' gradients accumulated over all."""
    for step in range(steps):
        xi = (x + step).detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = fn(xi)
        # a weighted sum: the uniform gradient of y.sum() would hide mistakes in the backward
        g = torch.cos(torch.arange(y.numel(), dtype=torch.float32, device=y.device)).view_as(y)
        (y.float() * g).sum().backward()
    return y, xi.grad


def assert_same_state(bn, ref, batches: int | None = 2, **tol):
    """Parameter gradients and running statistics alike, and `batches` counted in bn (None: not
    looked at, for kernels called without their module)."""
    if bn.affine:
        torch.testing.assert_close(bn.weight.grad, ref.weight.grad, **tol)
        torch.testing.assert_close(bn.bias.grad, ref.bias.grad, **tol)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, **tol)
    torch.testing.assert_close(bn.running_var, ref.running_var, **tol)
    if batches is not None:
        assert bn.num_batches_tracked.item() == batches


REFERENCE_CASES = [(s, cl, affine, False) for s in (2, 4) for cl in (False, True) for affine in (True, False)]


@pytest.mark.parametrize(("s", "channels_last", "affine", "bf16"), [*REFERENCE_CASES, (4, True, True, True)])
def test_split_bn_matches_its_reference(s, channels_last, affine, bf16):
    # The whole-batch passes (S x N/S x C x H x W statistics, one affine pass, the closed-form
    # backward) against the native batch_norm once per sub-batch: outputs, input, weight and bias
    # gradients, running statistics and the batch count, in fp32 (tight) and bf16 under autocast
    # (loose); the output and the input gradient keep the input's dtype and layout.
    torch.manual_seed(0)
    bn = split_bn(s, affine=affine)
    x = spread_batch(channels_last=channels_last).to(torch.bfloat16 if bf16 else torch.float32)
    ((y, dx), (y_ref, dx_ref)), ref = run_both(bn, x, bf16=bf16)
    assert y.dtype == dx.dtype == x.dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert dx.is_contiguous(memory_format=torch.channels_last) == channels_last
    tol = {"rtol": 2e-2, "atol": 5e-2} if bf16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    assert_same_state(bn, ref, **tol)


CUDA = pytest.param("cuda", marks=ON_GPU)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_split_bn_matches_its_reference_on_each_device(device, dtype):
    # fp16 / bf16 inputs without autocast (the parameters and statistics stay fp32, as autocast leaves
    # them; moco_fast never casts the model) and CUDA's own path: var_mean statistics, the affine
    # pass and the input gradient written from fp32 operands into x's dtype, against cuDNN per sub-batch
    torch.manual_seed(0)
    bn = split_bn(8, c=16).to(device)
    x = spread_batch(n=32, c=16, size=7, channels_last=True).to(device, dtype)
    ((y, dx), (y_ref, dx_ref)), ref = run_both(bn, x)
    assert y.dtype == dx.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    assert_same_state(bn, ref, **tol)


def interleaved_reference(x, s, *state):
    """The reference on sub-batches of images i, i + S, i + 2S, ...: the regrouped split BN's."""
    order = torch.arange(x.shape[0], device=x.device).view(-1, s).t().flatten()  # sub-batch i's images, then i + 1's
    return split_batch_norm_reference(x[order], s, *state)[torch.argsort(order)]


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize(
    ("s", "channels_last", "affine", "dtype"),
    [
        *((s, cl, affine, torch.float32) for s in (2, 4) for cl in (False, True) for affine in (True, False)),
        (8, True, True, torch.float16),
        (8, False, True, torch.bfloat16),
    ],
)
def test_the_regrouped_split_bn_is_the_reference_on_interleaved_sub_batches(s, channels_last, affine, dtype, device):
    # One F.batch_norm over N/S x S*C channels (the official demo's; cuDNN's on CUDA): outputs, input,
    # weight and bias gradients and running statistics over two steps, against the reference per
    # sub-batch of interleaved images; the output keeps the input's dtype and layout (channels-last
    # copied back)
    torch.manual_seed(0)
    bn = split_bn(s, c=16, affine=affine).to(device)
    ref = copy.deepcopy(bn)
    x = spread_batch(n=32, c=16, channels_last=channels_last).to(device, dtype)
    y, dx = run_steps(kernel_of(bn, split_batch_norm_regroup), x)
    y_ref, dx_ref = run_steps(kernel_of(ref, interleaved_reference), x)
    assert y.dtype == dx.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    assert_same_state(bn, ref, batches=None, **tol)
    # without running statistics: the same outputs
    y_free = split_batch_norm_regroup(x + 1, s, None, None, bn.weight, bn.bias, bn.momentum, bn.eps)
    torch.testing.assert_close(y_free, y, **tol)
    with pytest.raises(ValueError, match="divisible"):
        split_batch_norm_regroup(x[1:], s, None, None, None, None, 0.1, 1e-5)


def test_fp16_split_bn_keeps_fp32_statistics():
    # A channel whose mean is ~200 stds: in fp16 the mean is off by up to 0.06 (its spacing is 0.125
    # there), and so is every output; fp32 statistics leave only the output's own fp16 rounding.
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(2, num_splits=2)
    x = torch.randn(8, 2, 4, 4)
    x[:, 1] += 200
    x = x.half().contiguous(memory_format=torch.channels_last)
    y = bn(x)
    assert y.dtype == torch.float16 and y.is_contiguous(memory_format=torch.channels_last)
    x64 = x.double().view(2, 4, 2, 4, 4)
    var, mean = torch.var_mean(x64, dim=(1, 3, 4), correction=0, keepdim=True)
    expected = ((x64 - mean) / (var + bn.eps).sqrt()).view(x.shape)
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=2e-3)


@pytest.mark.parametrize("welford", [True, False], ids=["cuda-welford", "cpu-two-pass"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_both_ways_to_the_statistics_are_fp32_exact(welford, dtype):
    # CUDA's one var_mean pass and the CPU's sum and centred sum of squares, each on its own device in
    # training, give float64's statistics of the same values to fp32's precision, a mean of ~200
    # stds included
    torch.manual_seed(0)
    x = torch.randn(4, 2, 3, 5, 5)  # S x N/S x C x H x W
    x[:, :, 1] *= 1e-3
    x[:, :, 2] += 200
    x = x.to(dtype)
    var, mean = _stats(x, welford)
    var64, mean64 = torch.var_mean(x.double(), dim=(1, 3, 4), correction=0, keepdim=True)
    assert var.dtype == mean.dtype == torch.float32
    torch.testing.assert_close(mean, mean64.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, var64.float(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("affine", [True, False])
def test_the_closed_form_backward_is_the_gradient(affine):
    torch.manual_seed(0)
    xs = torch.randn(3, 2, 4, 3, 2, dtype=torch.float64, requires_grad=True)  # S x N/S x C x H x W
    affine_args = (torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64))
    args = (xs, *(t.requires_grad_() for t in affine_args)) if affine else (xs, None, None)
    assert torch.autograd.gradcheck(lambda *a: _SplitBatchNorm.apply(*a, 1e-5)[0], args)


@pytest.mark.parametrize(("with_weight", "with_bias"), [(True, False), (False, True)])
def test_a_weight_without_a_bias_and_a_bias_without_a_weight(with_weight, with_bias):
    # F.batch_norm takes either alone; the shift was shift0 without a bias (a weight's output off by
    # mean * rstd * (1 - weight)), and a bias without a weight raised on weight.view / weight.dtype
    torch.manual_seed(0)
    x = spread_batch(8).requires_grad_()
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    params = [t.requires_grad_() if given else None for t, given in ((weight, with_weight), (bias, with_bias))]
    got = split_batch_norm(x, 2, None, None, *params, 0.1, 1e-5)
    want = torch.cat([F.batch_norm(c, None, None, *params, True) for c in x.chunk(2)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    inputs = [x, *(p for p in params if p is not None)]
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_split_bn_eval_is_plain_bn_and_rejects_spread_batches():
    bn = SplitBatchNorm2d(3, num_splits=4)
    with pytest.raises(ValueError, match="divisible"):
        bn(torch.randn(6, 3, 2, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(4, 3, 1, 1))  # one image of 1 x 1 per sub-batch, as F.batch_norm says
    bn.eval()
    x = torch.randn(6, 3, 2, 2)
    torch.testing.assert_close(bn(x), x / (1 + 1e-5) ** 0.5)
    assert bn.num_batches_tracked.item() == 0


def test_split_bn_without_momentum_is_refused():
    # nn.BatchNorm2d's momentum=None is a cumulative average; split BN used 0.1 there instead
    bn = SplitBatchNorm2d(3, num_splits=2, momentum=None)
    with pytest.raises(ValueError, match="momentum=None"):
        bn(torch.randn(4, 3, 2, 2))


@pytest.mark.parametrize(
    ("built_without", "tracks"),
    [(True, False), (False, False), (True, True)],
    ids=["built-without", "turned-off", "built-without-turned-on"],
)
def test_split_bn_without_running_statistics_normalises_each_split(built_without, tracks):
    # track_running_stats=False, at construction (running statistics None: split BN's training pass
    # raised AttributeError on them) or set later: each sub-batch's own statistics and nothing
    # recorded, momentum=None allowed, as nn.BatchNorm2d does. Built without and turned on later
    # there is still nothing to record into: nn.BatchNorm2d records nothing; split BN raised
    # AttributeError on the count (None) and refused momentum=None
    torch.manual_seed(0)
    bn = split_bn(2, momentum=None, track_running_stats=not built_without)
    bn.track_running_stats = tracks
    x = spread_batch().requires_grad_()
    y = bn(x)
    ref = torch.cat([F.batch_norm(c, None, None, bn.weight, bn.bias, True) for c in x.chunk(2)])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view_as(y)
    dx, dw = torch.autograd.grad((y * g).sum(), (x, bn.weight))
    dx_ref, dw_ref = torch.autograd.grad((ref * g).sum(), (x, bn.weight))
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)
    if built_without:
        assert bn.running_mean is None and bn.num_batches_tracked is None
    else:
        torch.testing.assert_close(bn.running_mean, torch.zeros(3))
        torch.testing.assert_close(bn.running_var, torch.ones(3))
        assert bn.num_batches_tracked.item() == 0


@pytest.mark.parametrize("shape", [(0, 3, 5, 5), (4, 3, 0, 5)])
def test_split_bn_of_an_empty_batch_is_plain_bns(shape):
    # what nn.BatchNorm2d (and split BN once, per sub-batch) does: an empty output, running statistics
    # as they were, a batch counted; the whole-batch kernel recorded the mean and variance of no values
    # (NaN) and its backward divided by zero
    bn = split_bn(2)
    x = torch.randn(shape, requires_grad=True)
    bn(x).sum().backward()
    assert x.grad.shape == shape
    torch.testing.assert_close(bn.running_mean, torch.zeros(3))
    torch.testing.assert_close(bn.running_var, torch.ones(3))
    assert bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("cut", ["w-slice", "every-other-image", "hw-transposed"])
def test_split_bn_takes_inputs_of_any_strides(cut):
    # Neither dense nor NCHW / NHWC: the S x N/S x C x H x W view splits N alone, so it takes any
    # strides, as the per-sub-batch version did; outputs, input gradients and statistics as its
    torch.manual_seed(0)
    big = spread_batch(n=32, size=8, channels_last=True).requires_grad_()
    x = {"w-slice": big[..., 2:7], "every-other-image": big[::2], "hw-transposed": big.transpose(2, 3)}[cut]
    bn = split_bn(4)
    ref = copy.deepcopy(bn)
    y = bn(x)
    y_ref = split_batch_norm_reference(x, 4, ref.running_mean, ref.running_var, ref.weight, ref.bias, 0.1, ref.eps)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view_as(y)
    torch.testing.assert_close(*(torch.autograd.grad((t * g).sum(), big) for t in (y, y_ref)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("length", [1, 2, 4])
def test_split_bn_refuses_a_parameter_of_another_channel_count(name, length):
    # F.batch_norm's error, in its words, before anything is computed: a weight or bias of 1 was
    # broadcast over the 3 channels, other lengths failed in a broadcast whose error named no
    # parameter, the running statistics' after the forward had run
    x = torch.randn(4, 3, 2, 2)
    given = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), "weight": None, "bias": None}
    given[name] = torch.ones(length)
    with pytest.raises(RuntimeError) as want:
        F.batch_norm(x, given["running_mean"], given["running_var"], given["weight"], given["bias"], True)
    with pytest.raises(ValueError, match=f"^{name} should contain 3 elements not {length}$") as got:
        split_batch_norm(x, 2, given["running_mean"], given["running_var"], given["weight"], given["bias"], 0.1, 1e-5)
    assert str(got.value) == str(want.value)
