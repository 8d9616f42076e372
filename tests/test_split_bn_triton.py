"""The Triton split BN kernels (kernels/split_bn_triton.py) against `split_batch_norm_reference`
(F.batch_norm per sub-batch): outputs, input, weight and bias gradients, running statistics.

On the CPU under Triton's interpreter (TRITON_INTERPRET=1, set per test) on tiny batches; the sm_90
build is checked without a GPU with Triton's own ptxas, as in test_augment_triton.py; the compiled
kernels on CUDA where there is one.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

triton = pytest.importorskip("triton")

from conftest import ON_GPU  # noqa: E402
from moco_fast.kernels import split_bn_triton as sbt  # noqa: E402
from moco_fast.kernels import split_bn_triton_kernels as sbk  # noqa: E402
from moco_fast.kernels.split_bn import record_running, split_batch_norm, split_batch_norm_reference  # noqa: E402
from triton_helpers import sm90_ptx  # noqa: E402

FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
C = 6


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def small_tiles(monkeypatch):
    # 16 values a tile, 4 channels a channels-last tile: a sub-batch's 120 / 60 / 30 rows (1 / 2 /
    # 4 splits) are NCHW tiles of 16 rows, the last partly masked, or channels-last tiles of 4 rows
    # (the last partly masked at 4 splits) by 4 of the 6 channels;
    monkeypatch.setattr(sbt, "INTERPRET_TILE", 16)
    monkeypatch.setattr(sbt, "CL_CHANNELS", 4)
    # a program merges 3 tiles: NCHW's 8 / 4 / 2 tiles and channels-last's 8 at 4 splits end in a
    # short group (2 or 1 tiles, the last partly masked), so the merge, its bound at the rows and
    # the partials' combination count;
    monkeypatch.setattr(sbt, "INTERPRET_ROW_STEPS", 3)
    # and the combination takes the groups 4 by 4 channels a step (16 values, INTERPRET_TILE's):
    # several steps (channels-last's 10 / 5 groups), the last partial
    monkeypatch.setattr(sbt, "COMBINE_TILES", 4)


def spread_batch(fmt: str, dtype=torch.float32, n: int = 8, seed: int = 0) -> torch.Tensor:
    """n x C x 3 x 5 images whose mean and spread grow along the batch: each sub-batch has
    statistics of its own, so mixing up the splits' statistics shows."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.linspace(0.5, 3, n).view(-1, 1, 1, 1)
    x = torch.randn(n, C, 3, 5, generator=g) * spread + torch.arange(n).view(-1, 1, 1, 1)
    return x.to(dtype).contiguous(memory_format=FORMATS[fmt])


def affine(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)


def run(fn, x, s, weight, bias, track=True, momentum=0.1):
    """fn's output, input, weight and bias gradients of a weighted sum (a uniform gradient would hide
    mistakes in the backward), and its running statistics (None where not tracked)."""
    x = x.detach().clone().requires_grad_()
    params = [None if t is None else t.detach().clone().requires_grad_() for t in (weight, bias)]
    running = (torch.zeros(C), torch.ones(C)) if track else (None, None)
    y = fn(x, s, *running, *params, momentum, 1e-5)
    g = torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view_as(y)
    (y.float() * g).sum().backward()
    return y, x.grad, *(None if t is None else t.grad for t in params), *running


def tolerance(dtype):
    """fp32: float rounding; fp16 / bf16: their rounding of values of a few units (the interpreter
    casts bf16 by truncation, a GPU rounds to nearest)."""
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}


def assert_as_reference(x, s, weight, bias, track=True):
    got = run(sbt.split_batch_norm_triton, x, s, weight, bias, track)
    want = run(split_batch_norm_reference if track else split_batch_norm, x, s, weight, bias, track)
    y, dx = got[:2]
    assert y.dtype == dx.dtype == x.dtype
    for fmt in FORMATS.values():
        assert (
            y.is_contiguous(memory_format=fmt)
            == dx.is_contiguous(memory_format=fmt)
            == x.is_contiguous(memory_format=fmt)
        )
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **tolerance(x.dtype))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("s", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_the_reference(interpret, fmt, s, dtype):
    assert_as_reference(spread_batch(fmt, dtype), s, *affine())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("s", [1, 2, 4])
def test_tiles_of_a_part_of_a_sub_batch(interpret, small_tiles, fmt, s):
    assert_as_reference(spread_batch(fmt), s, *affine())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("with_weight", "with_bias"), [(False, False), (True, False), (False, True)])
def test_without_weight_or_bias(interpret, fmt, with_weight, with_bias):
    weight, bias = affine()
    assert_as_reference(spread_batch(fmt), 2, weight if with_weight else None, bias if with_bias else None)


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_running_statistics(interpret, fmt):
    # None for both: nothing recorded, the same output and gradients as split_batch_norm's
    assert_as_reference(spread_batch(fmt), 2, *affine(), track=False)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_mean_far_from_zero_keeps_its_variance(interpret, small_tiles, fmt, dtype):
    # Every value ~100 stds from 0: E[x^2] - E[x]^2 in fp32 would be off by ~1e-3 of the variance
    # (10^4 at fp32's 1.2e-7); the tiles' centred sums and Chan's combination keep float64's
    # statistics of the same values to fp32 precision. momentum 1: the running statistics are the
    # sub-batches' mean and unbiased variance, averaged.
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(8, C, 3, 5, generator=g) + 100).to(dtype).contiguous(memory_format=FORMATS[fmt])
    y, *_, running_mean, running_var = run(sbt.split_batch_norm_triton, x, 2, None, None, momentum=1.0)
    x64 = x.double().view(2, 4, C, 3, 5)
    var, mean = torch.var_mean(x64, dim=(1, 3, 4), keepdim=True)  # unbiased
    torch.testing.assert_close(running_mean, mean.mean(0).flatten().float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(running_var, var.mean(0).flatten().float(), rtol=1e-5, atol=0)
    expected = (x64 - mean) / (var * (59 / 60) + 1e-5).sqrt()
    torch.testing.assert_close(
        y.double(), expected.view(x.shape), rtol=0, atol=1e-4 if dtype == torch.float32 else 2e-3
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tile_runs_along_the_innermost_dimension(fmt):
    # Channels-last tiles take several channels (each row a contiguous run of them), NCHW tiles one
    # (a run of its pixels). An N x C x 1 x 1 batch is contiguous in both formats: its channels are
    # innermost, so channels-last tiles, not one channel read at stride C; one channel: NCHW tiles.
    x = torch.empty(8, C, 3, 5).contiguous(memory_format=FORMATS[fmt])
    assert sbt._Tiles.of(x, 2).blocks["BLOCK_C"] == (1 if fmt == "nchw" else 8)
    assert sbt._Tiles.of(torch.empty(8, 96, 1, 1).contiguous(memory_format=FORMATS[fmt]), 2).blocks["BLOCK_C"] == 64
    assert sbt._Tiles.of(torch.empty(8, 1, 3, 5).contiguous(memory_format=FORMATS[fmt]), 2).blocks["BLOCK_C"] == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_batch_of_1_x_1_images(interpret, small_tiles, fmt):
    # N x C x 1 x 1 in channels-last tiles: a row is an image, the pixel stride is never used
    x = spread_batch(fmt, n=40)[..., :1, :1].contiguous(memory_format=FORMATS[fmt])
    assert sbt._Tiles.of(x, 2).grid == (5, 2, 2)  # 20 images a sub-batch in 4-row tiles, 6 channels in 4s
    assert_as_reference(x, 2, *affine())


class TorchOps(TorchDispatchMode):
    """The torch ops dispatched outside the kernels' launches (the interpreter's copies of a launch's
    arguments are not the caller's): (name, whether a view, the storages of its tensor arguments)."""

    def __init__(self):
        super().__init__()
        self.ops, self.launching = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.launching:
            # every tensor argument, also one in a list (cat, stack, foreach ops)
            tensors = [a for a in tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]
            storages = {a.untyped_storage().data_ptr() for a in tensors}
            self.ops.append((func.overloadpacket.__name__, func.is_view, storages))
        return func(*args, **(kwargs or {}))

    def quiet_kernels(self, monkeypatch):
        """Has `sbt._kernels` give kernels whose launches this mode leaves out."""
        mode = self

        class Quiet:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    mode.launching = True
                    try:
                        return self.kernel[grid](*args, **kwargs)
                    finally:
                        mode.launching = False

                return launch

        kernels = sbt._kernels()
        monkeypatch.setattr(sbt, "_kernels", lambda: tuple(map(Quiet, kernels)))
        return self


def test_no_torch_op_reads_the_partials(interpret, small_tiles, monkeypatch):
    # The forward's partials (S x groups x C per figure; x's values / (64 * ROW_STEPS) in
    # channels-last) are read by the kernels alone: Chan's combination was 13 torch ops, each a
    # launch and a pass over them.
    # The partials are told by their storage, whatever view or shape an op takes of them, also in a
    # list (cat, stack); `made` keeps them alive, so no later tensor gets their memory.
    made = []
    partials = sbt._Tiles.partials
    monkeypatch.setattr(sbt._Tiles, "partials", lambda *a: made.append(partials(*a)) or made[-1])
    with TorchOps().quiet_kernels(monkeypatch) as mode:
        sbt.split_batch_norm_triton(spread_batch("cl"), 2, torch.zeros(C), torch.ones(C), *affine(), 0.1, 1e-5)
    ptrs = {p.untyped_storage().data_ptr() for p in made}
    assert len(made) == 1 and [name for name, view, used in mode.ops if used & ptrs and not view] == []


def forward_partials(monkeypatch, x: torch.Tensor, s: int, row_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's partials (means and M2s, S x groups x C) at `row_steps` tiles a program, and its
    S x C variance."""
    made = []
    partials = sbt._Tiles.partials
    monkeypatch.setattr(sbt._Tiles, "partials", lambda *a: made.append(partials(*a)) or made[-1])
    monkeypatch.setattr(sbt, "INTERPRET_ROW_STEPS", row_steps)
    _, _, var = sbt._SplitBatchNormTriton.apply(x, None, None, 1e-5, s)
    return made[0], var


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_group_of_tiles_merges_as_their_partials(interpret, small_tiles, monkeypatch, fmt):
    # A program's ROW_STEPS tiles merged in registers make the partial that Chan's formula makes of
    # the tiles' own (ROW_STEPS = 1): counts, the cross term of the tiles' means, a partly masked
    # last tile in a short last group (of 3: 4 rows then 2 in channels-last, the 30 rows' NCHW tiles
    # 16 then 14). fp64, so that only rounding differs.
    x, rows, steps = spread_batch(fmt, torch.float64), 30, 3
    (tile_mean, tile_m2), var1 = forward_partials(monkeypatch, x, 4, 1)
    (group_mean, group_m2), var3 = forward_partials(monkeypatch, x, 4, steps)
    block_r = sbt.INTERPRET_TILE // (1 if fmt == "nchw" else 4)
    tiles = tile_mean.shape[1]
    n = (rows - torch.arange(tiles) * block_r).clamp(max=block_r).to(x.dtype).view(1, -1, 1)
    assert group_mean.shape[1] == -(-tiles // steps) and tiles % steps
    for g in range(group_mean.shape[1]):
        t = slice(g * steps, (g + 1) * steps)
        mean = (n[:, t] * tile_mean[:, t]).sum(1) / n[:, t].sum(1)
        m2 = (tile_m2[:, t] + n[:, t] * (tile_mean[:, t] - mean[:, None]) ** 2).sum(1)
        torch.testing.assert_close(group_mean[:, g], mean, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(group_m2[:, g], m2, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(var3, var1, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_last_group_walks_no_tile_past_the_rows(interpret, small_tiles, monkeypatch, fmt):
    # The last group of 3 tiles at 4 splits ends past the 30 rows a sub-batch (NCHW: 2 tiles of 16,
    # channels-last: 8 of 4); its statistics and grad sums programs walked those tiles too, each a
    # step of masked loads. Now each pass reads each tile once: statistics, apply, grad sums, dx.
    x = spread_batch(fmt).requires_grad_()
    t = sbt._Tiles.of(x, 4)
    assert t.groups[0] * t.row_steps > t.grid[0]
    sbt._kernels()  # the helpers of this mode, jitted into the cache the kernels' globals come from
    helpers = sbk._KERNELS[True][0]
    tile, walked = helpers["_tile"], []
    monkeypatch.setitem(helpers, "_tile", lambda *a: walked.append(1) or tile(*a))
    y = sbt.split_batch_norm_triton(x, 4, None, None, *affine(), 0.1, 1e-5)
    torch.autograd.grad(y, x, torch.randn_like(y))
    assert len(walked) == 4 * math.prod(t.grid)


@pytest.mark.parametrize(("with_weight", "with_bias"), [(True, True), (False, False)])
def test_torch_computes_only_the_running_statistics(interpret, monkeypatch, with_weight, with_bias):
    # The combination kernel writes rstd, shift0, scale and shift too: 7 small torch ops before, each
    # a launch on a GPU. What torch computes (views and allocations aside) is record_running's update;
    # in the backward nothing: a kernel combines the tiles' sums (5 torch ops before).
    def computed(ops):
        return [name for name, view, _ in ops if not view and name not in ("empty", "empty_like", "promote_types")]

    weight, bias = affine()
    x, params = spread_batch("cl"), (weight if with_weight else None, bias if with_bias else None)
    running, figures = (torch.zeros(C), torch.ones(C)), (torch.rand(2, C), torch.rand(2, C))
    x.requires_grad_()
    params = tuple(p if p is None else p.requires_grad_() for p in params)
    mode = TorchOps().quiet_kernels(monkeypatch)
    with mode:
        y = sbt.split_batch_norm_triton(x, 2, *running, *params, 0.1, 1e-5)
    forward, mode.ops, dy = mode.ops, [], torch.randn_like(y)
    with mode:
        torch.autograd.grad(y, [x, *(p for p in params if p is not None)], dy)
    with TorchOps() as update:
        record_running(*running, *figures, 60, 0.1)
    assert computed(forward) == computed(update.ops) != []
    assert mode.ops and computed(mode.ops) == []


def test_the_interpreter_combines_in_few_programs(interpret, monkeypatch):
    # Under the interpreter a program costs ~10 ms whatever its size: at the compiled 32 channels a
    # program, combining a 512-channel layer's partials took 16 programs a sub-batch, and the
    # combination ~40% of the resnet18 step below. INTERPRET_TILE values a program: 64 tiles by 256.
    grids = []
    stats, combine, *rest = sbt._kernels()

    class Recorded:
        def __getitem__(self, grid):
            grids.append(grid)
            return combine[grid]

    monkeypatch.setattr(sbt, "_kernels", lambda: (stats, Recorded(), *rest))
    for c in (512, 6):
        x = torch.randn(4, c, 2, 2).contiguous(memory_format=torch.channels_last)
        sbt.split_batch_norm_triton(x, 2, None, None, None, None, 0.1, 1e-5)
    assert grids == [(2, 2), (2, 1)]


def test_other_strides_are_copied_to_nchw(interpret):
    # a slice of a channels-last batch along W is neither layout: copied first, its output NCHW
    big = spread_batch("cl").requires_grad_()
    x = big[..., 1:4]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    weight, bias = affine()
    y = sbt.split_batch_norm_triton(x, 2, None, None, weight, bias, 0.1, 1e-5)
    y_ref = split_batch_norm_reference(x, 2, torch.zeros(C), torch.ones(C), weight, bias, 0.1, 1e-5)
    assert y.is_contiguous()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view_as(y)
    torch.testing.assert_close(*(torch.autograd.grad((t * g).sum(), big) for t in (y, y_ref)), rtol=1e-5, atol=1e-5)


def test_a_gradient_in_other_strides(interpret):
    # a channels-last batch whose output's gradient comes NCHW: read at x's strides after a copy
    x = spread_batch("cl").requires_grad_()
    ref = x.detach().clone().requires_grad_()
    weight, bias = affine()
    dy = torch.randn(x.shape)
    assert dy.is_contiguous() and not dy.is_contiguous(memory_format=torch.channels_last)
    (dx,) = torch.autograd.grad(sbt.split_batch_norm_triton(x, 2, None, None, weight, bias, 0.1, 1e-5), x, dy)
    (dx_ref,) = torch.autograd.grad(split_batch_norm(ref, 2, None, None, weight, bias, 0.1, 1e-5), ref, dy)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_gradient_whose_size_1_dimension_has_another_stride_is_not_copied(interpret, monkeypatch, fmt):
    # N x C x 3 x 1: the kernels never read W's stride, but a gradient whose only other stride was
    # W's was copied to x's strides (a pass over dy on a GPU); now no torch op runs in the backward
    x = spread_batch(fmt)[..., :1].contiguous(memory_format=FORMATS[fmt]).requires_grad_()
    strides = (*x.stride()[:3], 7)
    dy = torch.randn(x.numel()).as_strided(x.shape, strides)
    assert dy.stride() != x.stride()
    weight, bias = affine()
    y = sbt.split_batch_norm_triton(x, 2, None, None, weight, bias, 0.1, 1e-5)
    with TorchOps().quiet_kernels(monkeypatch) as mode:
        (dx,) = torch.autograd.grad(y, x, dy)
    assert [name for name, view, _ in mode.ops if not view and name not in ("empty", "empty_like")] == []
    ref = x.detach().clone().requires_grad_()
    (dx_ref,) = torch.autograd.grad(split_batch_norm(ref, 2, None, None, weight, bias, 0.1, 1e-5), ref, dy)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)


def test_a_weight_and_bias_of_other_strides(interpret):
    # F.batch_norm takes parameters of any strides; the combination kernel reads them at stride 1
    # (every other channel's here, before they were copied)
    x = spread_batch("cl").requires_grad_()
    leaves = [torch.stack([t, -t], 1).flatten().requires_grad_() for t in affine()]
    weight, bias = (t[::2] for t in leaves)
    g = torch.randn(x.shape)
    y = sbt.split_batch_norm_triton(x, 2, None, None, weight, bias, 0.1, 1e-5)
    y_ref = split_batch_norm_reference(x, 2, torch.zeros(C), torch.ones(C), weight, bias, 0.1, 1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(*(torch.autograd.grad(t, [x, *leaves], g) for t in (y, y_ref)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_the_same_errors_as_split_batch_norm(interpret):
    # a weight or bias of another length than the channels' too: the combination kernel read a shorter
    # one past its end (a weight of 1: 2 values not its own, their gradient summed into its one)
    x = torch.randn(4, 3, 2, 2)
    cases = [(torch.randn(6, 3, 2, 2), 4, None, None), (torch.randn(4, 3, 1, 1), 4, None, None)]
    cases += [(x, 2, torch.ones(n), None) for n in (1, 2, 4)] + [(x, 2, None, torch.ones(n)) for n in (1, 2, 4)]
    for x, s, weight, bias in cases:
        with pytest.raises(ValueError) as want:
            split_batch_norm(x, s, None, None, weight, bias, 0.1, 1e-5)
        with pytest.raises(ValueError) as got:
            sbt.split_batch_norm_triton(x, s, None, None, weight, bias, 0.1, 1e-5)
        assert str(got.value) == str(want.value)


def test_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="N x C x H x W in one of"):
        sbt.split_batch_norm_triton(torch.randn(4, 3, 2, 2).to(torch.int32), 2, None, None, None, None, 0.1, 1e-5)
    # a weight or bias the kernel cannot read as it reads x: on another device (a meta one here: the
    # interpreter failed on copying it), or not a float (an int32 one ran)
    x = torch.randn(4, 3, 2, 2)
    for param in (torch.ones(3, device="meta"), torch.ones(3, dtype=torch.int32)):
        for weight, bias, name in ((param, None, "weight"), (None, param, "bias")):
            with pytest.raises(ValueError, match=rf"takes a {name} on x's device \(cpu\) in one of .*, got a"):
                sbt.split_batch_norm_triton(x, 2, None, None, weight, bias, 0.1, 1e-5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA batch"):
            sbt.split_batch_norm_triton(torch.randn(4, 3, 2, 2), 2, None, None, None, None, 0.1, 1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_backward_is_the_gradient(interpret, fmt):
    # fp64 through the kernels (fp64 accumulation for fp64 inputs), against finite differences;
    # fast_mode (a random projection of the Jacobian): the interpreter takes ~0.1 s a call
    x = spread_batch(fmt, torch.float64, n=4)[:, :3, :2].contiguous(memory_format=FORMATS[fmt]).requires_grad_()
    weight, bias = (t[:3].double().requires_grad_() for t in affine())
    fn = lambda *a: sbt._SplitBatchNormTriton.apply(*a, 1e-5, 2)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias), fast_mode=True)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("block_c", [1, sbt.CL_CHANNELS], ids=["nchw", "cl"])
def test_sm90_build(monkeypatch, dtype, block_c):
    # Every kernel compiles for an H100/H200 (sm_90) without a GPU, for each input dtype and both
    # tiles: the compiled frontend is stricter than the interpreter. As a launch builds them: Triton
    # makes an int argument of 1 a constexpr, here the unit stride (a pixel's in NCHW, a channel's
    # in channels-last).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    stats, combine, apply, grad_sums, grad_combine, dx = sbt._kernels()
    unit = "s_p" if block_c == 1 else "s_c"
    sizes = dict.fromkeys({"R", "C", "HW", "M", "s_n", "s_c", "s_p"} - {unit}, "i32")
    blocks = {"BLOCK_R": sbt.TILE // block_c, "BLOCK_C": block_c, unit: 1}
    steps = blocks | {"ROW_STEPS": sbt.ROW_STEPS}  # the statistics' and grad sums' loop
    x, f32 = f"*{dtype}", "*fp32"
    builds = [
        (stats, {"x": x, "part_mean": f32, "part_m2": f32} | sizes, {"ACC": triton.language.float32} | steps),
        (apply, {"x": x, "y": x, "scale": f32, "shift": f32} | sizes, blocks),
        (grad_sums, {"x": x, "dy": x} | dict.fromkeys(("rstd", "shift0", "part_dy", "part_dyx"), f32) | sizes, steps),
        (
            dx,
            {"x": x, "dy": x, "dx": x} | dict.fromkeys(("rstd", "shift0", "scale", "mean_dy", "mean_dyx"), f32) | sizes,
            blocks,
        ),
    ]
    combine_blocks = {
        "GROUP_R": blocks["BLOCK_R"] * sbt.ROW_STEPS,
        "BLOCK_T": sbt.COMBINE_TILES,
        "BLOCK_C": sbt.COMBINE_CHANNELS,
    }
    for has_weight, has_bias in ((True, True), (False, False), (True, False), (False, True)):
        # fp32 partials whatever x's dtype, fp32 parameters; a None weight or bias is a constexpr
        params = {name: f32 for name, given in (("weight", has_weight), ("bias", has_bias)) if given}
        absent = {name: None for name, given in (("weight", has_weight), ("bias", has_bias)) if not given}
        signature = dict.fromkeys(("part_mean", "part_m2", "out"), f32) | params | {"eps": "fp64"}
        signature |= dict.fromkeys(("R", "C", "TILES"), "i32")
        flags = {"HAS_WEIGHT": has_weight, "HAS_BIAS": has_bias}
        builds.append((combine, signature, absent | flags | combine_blocks))
        # the backward's: fp32 sums, the parameters' gradients in fp32 or left out
        grads = {name: f32 for name, given in (("dweight", has_weight), ("dbias", has_bias)) if given}
        absent = {name: None for name, given in (("dweight", has_weight), ("dbias", has_bias)) if not given}
        signature = dict.fromkeys(("part_dy", "part_dyx", "means"), f32) | grads
        signature |= dict.fromkeys(("R", "C", "S", "TILES"), "i32")
        flags = {"HAS_DWEIGHT": has_weight, "HAS_DBIAS": has_bias, "BLOCK_T": sbt.COMBINE_TILES}
        builds.append((grad_combine, signature, absent | flags | {"BLOCK_C": sbt.COMBINE_CHANNELS}))
    for fn, signature, consts in builds:
        assert ".entry" in sm90_ptx(fn, signature, consts)


@pytest.mark.parametrize("acc", ["fp32", "fp64"])
def test_eps_reaches_the_combination_in_fp64(monkeypatch, acc):
    # A launch types a Python float argument fp32 unless its parameter says otherwise: eps 1e-5 was
    # 9.99999975e-06 in the compiled fp64 combination (gradcheck's dtype; the interpreter keeps the
    # float, so the tests under it cannot see this). Annotated fp64, it is eps for fp64 partials and
    # rounds once with the variance for fp32 ones: both build for sm_90.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    combine = sbt._kernels()[1]
    assert {p.name: p.annotation_type for p in combine.params}["eps"] == "fp64"
    signature = dict.fromkeys(("part_mean", "part_m2", "out"), f"*{acc}") | {"eps": "fp64"}
    signature |= dict.fromkeys(("R", "C", "TILES"), "i32")
    consts = {"weight": None, "bias": None, "HAS_WEIGHT": False, "HAS_BIAS": False, "GROUP_R": sbt.TILE}
    consts |= {"BLOCK_T": sbt.COMBINE_TILES, "BLOCK_C": sbt.COMBINE_CHANNELS}
    assert ".entry" in sm90_ptx(combine, signature, consts)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=ON_GPU)])
def test_compiled_kernels_on_cuda(monkeypatch, device, fmt, dtype):
    # The compiled kernels against cuDNN per sub-batch at a ResNet layer's shape (several tiles of
    # each kind, a partly masked last one), without a host sync in forward or backward.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    x = (torch.randn(64, 96, 15, 15, device=device) * 2 + 5).to(dtype).contiguous(memory_format=FORMATS[fmt])
    weight, bias = (torch.rand(96, device=device) + 0.5), torch.randn(96, device=device)
    dy = torch.randn(x.shape, device=device).to(dtype).contiguous(memory_format=FORMATS[fmt])
    outs = []
    for fn in (sbt.split_batch_norm_triton, split_batch_norm_reference):
        xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
        running = torch.zeros(96, device=device), torch.ones(96, device=device)
        fn(xi, 8, *running, wi, bi, 0.1, 1e-5)  # compiled outside the sync check
        running = torch.zeros(96, device=device), torch.ones(96, device=device)
        torch.cuda.set_sync_debug_mode("error" if fn is sbt.split_batch_norm_triton else 0)
        try:
            y = fn(xi, 8, *running, wi, bi, 0.1, 1e-5)
            grads = torch.autograd.grad(y, (xi, wi, bi), dy)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        outs.append((y, *grads, *running))
    assert outs[0][0].is_contiguous(memory_format=FORMATS[fmt])
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=ON_GPU)])
def test_a_cuda_graph_captures_forward_and_backward(monkeypatch, device):
    # No host sync anywhere: the whole training pass replays from a CUDA graph, on new values.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(32, 64, 14, 14, device=device, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight, bias = (
        (torch.rand(64, device=device) + 0.5).requires_grad_(),
        torch.randn(64, device=device).requires_grad_(),
    )
    running = torch.zeros(64, device=device), torch.ones(64, device=device)
    dy = torch.randn_like(x)

    def step():
        y = sbt.split_batch_norm_triton(x, 8, *running, weight, bias, 0.1, 1e-5)
        return (y, *torch.autograd.grad(y, (x, weight, bias), dy))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiled, and the allocator warmed, outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    with torch.no_grad():
        x.mul_(3).add_(1)
        running[0].zero_(), running[1].fill_(1)
    graph.replay()
    torch.cuda.synchronize()
    ref_running = torch.zeros(64, device=device), torch.ones(64, device=device)
    xr = x.detach().clone().requires_grad_()
    y_ref = split_batch_norm_reference(xr, 8, *ref_running, weight, bias, 0.1, 1e-5)
    want = (y_ref, *torch.autograd.grad(y_ref, (xr, weight, bias), dy))
    for a, b in zip((*outs, *running), (*want, *ref_running), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=5e-2)


# -- the kernel as split BN's choice in the model (backbone.SplitBatchNorm2d, MoCo(bn_kernel=...)) --------
def tiny_moco(bn_kernel: str):
    from moco_fast.config import build_config
    from moco_fast.model import MoCo
    from moco_fast.trainer import StepState, make_optimizer

    over = {"model.arch": "resnet18", "model.stem": "imagenet", "moco.k": 64, "optim.batch_size": 8}
    cfg = build_config("v2", {**over, "moco.bn_splits": 2})
    torch.manual_seed(0)
    model = MoCo(cfg.model, cfg.moco, 32, bn_kernel=bn_kernel).to(memory_format=torch.channels_last)
    dev = torch.device("cpu")
    return StepState(model, make_optimizer(model, cfg, dev), torch.amp.GradScaler("cpu", enabled=False), None, dev)


def test_a_trainer_step_with_the_triton_kernel_is_torchs(interpret, monkeypatch):
    from moco_fast.loaders.base import Batch

    from moco_fast.step import train_step

    ran = []  # the triton version's layer calls: a kernel choice that did not reach forward would pass
    monkeypatch.setattr(sbt, "record_running", lambda *a: (ran.append(1), record_running(*a)))

    g = torch.Generator().manual_seed(0)
    views = [torch.randn(8, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    batch = Batch(*views, torch.zeros(8, dtype=torch.long), torch.arange(8))
    got = {}
    for kernel in ("torch", "triton"):
        s = tiny_moco(kernel)
        torch.manual_seed(1)  # the key batch's shuffle
        loss, _ = train_step(s, batch, 0.99)
        grads = {n: p.grad for n, p in s.model.named_parameters() if p.grad is not None}
        got[kernel] = (loss, grads, s.model.state_dict())
    (loss_t, grads_t, state_t), (loss, grads, state) = got["torch"], got["triton"]
    assert len(ran) == 2 * 20  # resnet18's 20 BN layers in each encoder
    assert state.keys() == state_t.keys() and grads.keys() == grads_t.keys()
    torch.testing.assert_close(loss, loss_t, rtol=1e-5, atol=1e-5)
    for name in grads_t:
        # fp32 sums in another order through 20 BN layers: to the gradient's scale, not elementwise
        torch.testing.assert_close(grads[name], grads_t[name], rtol=0, atol=1e-3 * grads_t[name].abs().max().item())
    moved = [n for n in state_t if n.endswith(("running_mean", "running_var"))]
    assert any("encoder_k" in n for n in moved)  # both encoders' split BN ran
    for name in [*moved, *(n for n in state_t if n.endswith("num_batches_tracked"))]:
        torch.testing.assert_close(state[name], state_t[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_triton_kernel_is_refused_when_the_model_is_built_where_it_cannot_run(monkeypatch):
    from moco_fast.backbone import SplitBatchNorm2d, build_backbone

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^split BN's kernel 'triton' needs a CUDA batch \(or TRITON_INTERPRET=1"):
        build_backbone("resnet18", bn_splits=2, bn_kernel="triton")
    with pytest.raises(ValueError, match="unknown split BN kernel 'cuda'; choose from torch, triton"):
        SplitBatchNorm2d(4, 2, kernel="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    net, _ = build_backbone("resnet18", bn_splits=2, bn_kernel="triton")
    assert {m.kernel for m in net.modules() if isinstance(m, SplitBatchNorm2d)} == {"triton"}
    assert net.state_dict().keys() == build_backbone("resnet18", bn_splits=2)[0].state_dict().keys()


def test_a_model_without_split_bn_builds_with_the_triton_kernel_where_it_cannot_run(monkeypatch):
    # one split, or no shuffle BN (bench/throughput.py's noshuffle row under --bn-kernel triton), or
    # several processes: no layer runs the kernel, so the machine is not refused; a wrong name still is
    from moco_fast.backbone import SplitBatchNorm2d, build_backbone
    from moco_fast.config import build_config
    from moco_fast.model import MoCo

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    net, _ = build_backbone("resnet18", bn_splits=1, bn_kernel="triton")
    assert not any(isinstance(m, SplitBatchNorm2d) for m in net.modules())
    cfg = build_config("v2", {"model.arch": "resnet18", "moco.k": 64, "moco.shuffle_bn": False})
    MoCo(cfg.model, cfg.moco, 32, bn_kernel="triton")
    with pytest.raises(ValueError, match="unknown split BN kernel 'cuda'"):
        build_backbone("resnet18", bn_splits=1, bn_kernel="cuda")
