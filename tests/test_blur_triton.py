"""The fused Triton blur + flip + normalise + cast + layout kernels against today's torch code path.

On the CPU under Triton's interpreter (TRITON_INTERPRET=1, set per test) on tiny batches; the sm_90
build is checked without a GPU with Triton's own ptxas, as in test_augment_triton.py.
"""

from dataclasses import replace

import pytest
import torch

triton = pytest.importorskip("triton")

from moco_fast.kernels import augment_gpu as ag  # noqa: E402
from moco_fast.kernels import blur_triton as bt  # noqa: E402
from moco_fast.loaders.base import DeviceAugment, LoaderArgs  # noqa: E402
from triton_helpers import sm90_ptx  # noqa: E402

from moco_fast.augment import MOCO_V2  # noqa: E402

BLUR = torch.tensor([True, False, True, True])  # one image not blurred (a delta kernel)
FLIP = torch.tensor([False, True, True, False])  # flipped and not, blurred and not
MEAN, STD = torch.tensor(MOCO_V2.mean).view(1, 3, 1, 1), torch.tensor(MOCO_V2.std).view(1, 3, 1, 1)
FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def batch(k: int, seed=0, h=9, w=7):
    """4 images of h x w and their taps: k = 5 reads two rows and columns past every edge (reflect)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, h, w, generator=g)
    sigma = torch.rand(4, generator=g) * 1.5 + 0.5
    return x, ag.gaussian_kernels(sigma, BLUR, k)


def assert_close(got, want):
    """fp32: equal to float rounding; bf16: one bf16 step apart at most, as Triton's interpreter
    casts by truncation (a GPU rounds to nearest, as torch)."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=0.0)


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_the_torch_path(interpret, k, dtype, fmt):
    x, kernels = batch(k)
    args = (x, kernels, FLIP, MEAN, STD, dtype, FORMATS[fmt])
    got, want = bt.blur_flip_normalize(*args), bt.reference(*args)
    assert got.dtype == dtype and got.is_contiguous(memory_format=FORMATS[fmt])
    assert_close(got, want)
    # The cases differ: a test that held without the blur or the flip would say nothing of them.
    for without in ((x, None, FLIP), (x, kernels, None)):
        assert not torch.equal(bt.reference(*without, MEAN, STD, dtype, FORMATS[fmt]), want)


def test_an_image_over_several_programs(interpret, monkeypatch):
    # 63 pixels in programs of 16 (a GPU's 1,024 and the interpreter's larger block hold each tiny
    # image whole): rows and columns read across the programs' edges, the last one partly masked.
    monkeypatch.setattr(bt, "INTERPRET_BLOCK", 16)
    x, kernels = batch(5, seed=2)
    args = (x, kernels, FLIP, MEAN, STD, torch.float32, torch.channels_last)
    assert_close(bt.blur_flip_normalize(*args), bt.reference(*args))


def test_without_blur_or_flip(interpret):
    # A spec without blur (no taps: kernel 2 alone) or with FFCV's flip on the CPU (flip=None).
    x, kernels = batch(3, seed=1)
    for ks, flip in ((None, FLIP), (kernels, None), (None, None)):
        args = (x, ks, flip, MEAN, STD, torch.float32, torch.channels_last)
        torch.testing.assert_close(bt.blur_flip_normalize(*args), bt.reference(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_augment_runs_every_kernel(interpret, monkeypatch, dtype):
    # DeviceAugment(kernel="triton"): jitter + gray, then blur, flip, normalise, cast and layout in
    # the kernels (the torch blur is not called), the same views as the torch pass from one state.
    args = LoaderArgs(None, replace(MOCO_V2, image_size=32, blur_prob=0.5), 3, torch.device("cpu"), dtype)
    x = torch.rand(6, 3, 11, 10, generator=torch.Generator().manual_seed(5))
    torch_views = DeviceAugment(args, "sample")(x.clone(), torch.Generator().manual_seed(6))
    monkeypatch.setattr(ag, "gaussian_blur", None)  # augment_gpu's torch blur, which _apply calls
    views = DeviceAugment(args, "sample", kernel="triton")(x.clone(), torch.Generator().manual_seed(6))
    for a, b in zip(views, torch_views, strict=True):
        assert a.dtype == dtype and a.is_contiguous(memory_format=torch.channels_last)
        assert_close(a, b)


@pytest.mark.parametrize("order", ag.ORDERS)
def test_device_augment_from_uint8(interpret, order):
    # FFCV's uint8 batch (N x 2 x H x W x 3, permuted: a view): the triton pass reads it where it lies
    # and makes the views it makes of the floats FFCVLoader made before (to the bit: the same floats
    # into the same kernels); the torch pass makes those floats itself, and the same views as before.
    args = LoaderArgs(None, replace(MOCO_V2, image_size=32, blur_prob=0.5), 3, torch.device("cpu"), torch.bfloat16)
    u8 = torch.randint(0, 256, (3, 2, 9, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    views = u8.permute(1, 0, 4, 2, 3)
    floats = views.reshape(6, 3, 9, 7).float().div_(255.0)
    for kernel in ag.KERNELS:
        augment = DeviceAugment(args, order, flip=False, kernel=kernel)
        got = augment.from_uint8(views, torch.Generator().manual_seed(8))
        want = augment(floats.clone(), torch.Generator().manual_seed(8))
        for a, b in zip(got, want, strict=True):
            assert a.shape == (3, 3, 9, 7) and a.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(a, b)


def test_triton_refused_where_it_cannot_run(monkeypatch):
    # At construction, not at the loader's first batch: a CPU device without the interpreter.
    args = LoaderArgs(None, MOCO_V2, 3, torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"DeviceAugment\(kernel='triton'\) needs a CUDA batch .* got a cpu one"):
        DeviceAugment(args, "sample", kernel="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert DeviceAugment(args, "sample", kernel="triton").kernel == "triton"


def test_refuses_what_it_cannot_run(monkeypatch):
    x, kernels = batch(5, h=5, w=2)  # 2 px: two taps past the edge would reflect twice
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = (MEAN, STD, torch.float32)
    with pytest.raises(ValueError, match="larger than 2 px"):
        bt.blur_flip_normalize(x, kernels, FLIP, *args)
    with pytest.raises(ValueError, match="k odd"):
        bt.blur_flip_normalize(x, kernels[:, :4], FLIP, *args)
    with pytest.raises(ValueError, match="writes one of"):
        bt.blur_flip_normalize(x, None, FLIP, MEAN, STD, torch.int8)
    with pytest.raises(ValueError, match="float32"):
        bt.blur_flip_normalize(x.double(), None, FLIP, *args)
    with pytest.raises(ValueError, match="kernel must be one of"):
        DeviceAugment(LoaderArgs(None, MOCO_V2, 3, torch.device("cpu")), "sample", kernel="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA batch"):
            bt.blur_flip_normalize(x, None, FLIP, *args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_on_cuda(monkeypatch):
    # The compiled kernels at MoCo v2's size (224 px, 23 taps: 49 whole blocks; 225 px: a masked
    # last block), bf16 channels-last as the trainer takes them, and without a host sync.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for side in (224, 225):
        g = torch.Generator(device="cuda").manual_seed(side)
        x = torch.rand(16, 3, side, side, device="cuda", generator=g)
        p = ag.sample_params(16, MOCO_V2, "cuda", g)
        kernels = ag.gaussian_kernels(p.sigma, p.blur, p.kernel_size)
        args = (x, kernels, p.flip, MEAN.cuda(), STD.cuda(), torch.bfloat16, torch.channels_last)
        bt.blur_flip_normalize(*args)  # compiled outside the sync check
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = bt.blur_flip_normalize(*args)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.testing.assert_close(got, bt.reference(*args))


# The horizontal kernel's builds as the loaders launch it: (BLUR, FLIP, the output's type). MoCo v2
# on FFCV (blur, flipped on the CPU) into bf16, on the resident backend (both) into fp16, MoCo v1
# (no blur) flipped here into fp32 and on FFCV into bf16: each flag pair is a build of its own.
HORIZONTAL_BUILDS = [(True, False, "bf16"), (True, True, "fp16"), (False, True, "fp32"), (False, False, "bf16")]


def test_sm90_build(monkeypatch):
    # Both kernels compile for an H100/H200 (sm_90) without a GPU (Triton's own ptxas), for each
    # flag pair and output type above (the compiled frontend is stricter than the interpreter).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    vertical, horizontal = bt._kernels()
    sides = {"H": "i32", "W": "i32"}
    builds = [(vertical, {"x": "*fp32", "tmp": "*fp32", "taps": "*fp32"} | sides, {"K": 23, "BLOCK": bt.BLOCK})]
    ptrs = {"tmp": "*fp32", "taps": "*fp32", "flip": "*i8", "mean": "*fp32", "std": "*fp32"}
    strides = dict.fromkeys(("s_n", "s_c", "s_h", "s_w"), "i32")
    for blur, flip, out in HORIZONTAL_BUILDS:
        sig = ptrs | {"out": f"*{out}"} | sides | strides
        builds.append((horizontal, sig, {"K": 23, "BLUR": blur, "FLIP": flip, "BLOCK": bt.BLOCK}))
    for fn, sig, consts in builds:
        assert ".entry" in sm90_ptx(fn, sig, consts)
