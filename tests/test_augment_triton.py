"""The fused Triton jitter + grayscale kernels against the torch "where" formulation.

On the CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set per test) on tiny
batches (the interpreter runs a program at a time in Python); the sm_90 build is checked without a
GPU by compiling with Triton's own ptxas.
"""

from dataclasses import replace

import pytest
import torch

triton = pytest.importorskip("triton")

from moco_fast.kernels import augment_gpu as ag  # noqa: E402
from moco_fast.kernels import augment_triton as at  # noqa: E402
from moco_fast.loaders.base import DeviceAugment, LoaderArgs  # noqa: E402
from triton_helpers import sm90_ptx  # noqa: E402

from moco_fast.augment import MOCO_V1, MOCO_V2  # noqa: E402

N = 6
# Contrast at each stage of an image's order, after and before every other op: its mean luma is
# taken of the image as the ops before it left it.
ORDERS = [(1, 0, 2, 3), (0, 1, 3, 2), (3, 2, 1, 0), (2, 3, 0, 1), (0, 3, 2, 1), (3, 0, 1, 2)]
JITTER = [True, True, True, False, True, False]
GRAY = [False, True, False, True, False, False]


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def batch_and_params(order: str, spec=MOCO_V2, seed=0, h=8, w=8):
    """Tiny images and parameters with some images not jittered and some grayed (the masks fixed,
    so that every case is in every batch); strong factors, so that clamps and hue move pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, 3, h, w, generator=g)
    spec = replace(spec, brightness=0.8, contrast=0.8, saturation=0.8)
    p = ag.sample_params(N, spec, "cpu", g, order=order, flip=False)
    p = replace(p, jitter=torch.tensor(JITTER), gray=torch.tensor(GRAY))
    if order == "sample":
        p = replace(p, order=torch.tensor(ORDERS))
    return x, p


@pytest.mark.parametrize("order", ag.ORDERS)
@pytest.mark.parametrize("hue", [0.0, 0.4])
def test_matches_the_torch_where_path(interpret, order, hue):
    x, p = batch_and_params(order, replace(MOCO_V2, hue=hue))
    assert p.use_hue == (hue > 0)
    out = at.jitter_gray(x, p)
    torch.testing.assert_close(out, ag._colour(x, p, index=False), rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, x)


@pytest.mark.parametrize("order", ag.ORDERS)
def test_images_of_several_blocks(interpret, monkeypatch, order):
    # The tiny images above are one block of 1,024 pixels each; at 16 pixels a block an image of
    # 9 x 7 is four, the last partly masked: the mean kernel sums across its loop's blocks and each
    # colour program takes its own block (as 224 px images do on the GPU, 49 blocks each).
    monkeypatch.setattr(at, "BLOCK", 16)
    x, p = batch_and_params(order, replace(MOCO_V2, hue=0.4), seed=4, h=9, w=7)
    torch.testing.assert_close(at.jitter_gray(x, p), ag._colour(x, p, index=False), rtol=1e-5, atol=1e-5)


def ffcv_uint8(n: int, h: int, w: int, seed=0) -> torch.Tensor:
    """An FFCV batch as its loader hands it on: uint8 N x 2 x H x W x 3, two views of N images."""
    return torch.randint(0, 256, (n, 2, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("order", ag.ORDERS)
@pytest.mark.parametrize("block", [1024, 16])
def test_uint8_views_read_where_they_lie(interpret, monkeypatch, order, block):
    # FFCV's batch read through its strides (view v of image i is row v * N + i) and divided by 255
    # in the kernels: the same floats as the float path on the copy FFCVLoader made before
    # (permute, reshape, float, div_), so the same result to the bit. 9 x 7: odd sides, and at 16
    # pixels a block several blocks an image, the last partly masked.
    monkeypatch.setattr(at, "BLOCK", block)
    _, p = batch_and_params(order, replace(MOCO_V2, hue=0.4), seed=5)
    u8 = ffcv_uint8(N // 2, 9, 7)
    views = u8.permute(1, 0, 4, 2, 3)  # 2 x N x 3 x H x W, a view: no copy
    floats = views.reshape(N, 3, 9, 7).float().div_(255.0)
    got = at.jitter_gray(views, p)
    assert torch.equal(got, at.jitter_gray(floats, p))
    # the views' order matters: with view 2 first the rows are other images' (the test can fail)
    assert not torch.equal(got, at.jitter_gray(views.flip(0), p))


def test_any_strides_of_a_batch(interpret):
    # A 4-D batch as uint8 or channels-last floats: read where it lies, no copy before the kernels.
    x, p = batch_and_params("sample", seed=6, h=7, w=9)
    u8 = (x * 255).round().to(torch.uint8)
    want = at.jitter_gray(u8.float().div_(255.0), p)
    assert torch.equal(at.jitter_gray(u8.contiguous(memory_format=torch.channels_last), p), want)
    assert torch.equal(at.jitter_gray(x.contiguous(memory_format=torch.channels_last), p), at.jitter_gray(x, p))


@pytest.mark.parametrize("order", ag.ORDERS)
def test_gray_before_the_jitter(interpret, order):
    # MoCo v1: grayscale first, and hue always on; contrast's mean is of the grayed image. Grayed
    # and jittered: images 0-2. Image 2 has hue before contrast, which moves the luma of a colour
    # image and not of a grey one; brightness alone (image 1) moves both alike (LUMA sums to 0.9999).
    x, p = batch_and_params(order, MOCO_V1, seed=1)
    p = replace(p, gray=torch.tensor([True, True, True, True, False, False]))
    assert p.gray_first and p.use_hue
    torch.testing.assert_close(at.jitter_gray(x, p), ag._colour(x, p, index=False), rtol=1e-5, atol=1e-5)


def test_only_grayscale_or_nothing(interpret):
    x, p = batch_and_params("sample")
    gray_only = replace(p, use_jitter=False, use_hue=False)
    torch.testing.assert_close(at.jitter_gray(x, gray_only), ag._colour(x, gray_only, index=False))
    nothing = replace(gray_only, use_gray=False)
    assert torch.equal(at.jitter_gray(x, nothing), x)


@pytest.mark.parametrize("order", ag.ORDERS)
def test_apply_with_the_triton_kernel_equals_where(interpret, order):
    # The whole pass: blur (some images) and flip run in torch after the fused kernels.
    x, p = batch_and_params(order, seed=2, h=9, w=7)  # odd sides: a partly masked block
    p = replace(p, blur=torch.tensor([True, False] * 3), flip=torch.tensor([False, True] * 3), kernel_size=5)
    got = ag.apply(x, p, kernel="triton")
    torch.testing.assert_close(got, ag.apply(x, p, select="where"), rtol=1e-5, atol=1e-5)


def test_device_augment_option(interpret):
    # The loaders' device pass with kernel="triton" on the CPU (the interpreter): the same views as
    # the default torch pass from the same generator state.
    args = LoaderArgs(None, replace(MOCO_V2, image_size=32), 3, torch.device("cpu"))
    x = torch.rand(N, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    views = {}
    for kernel in ag.KERNELS:
        views[kernel] = DeviceAugment(args, "sample", kernel=kernel)(x.clone(), torch.Generator().manual_seed(4))
    for a, b in zip(views["triton"], views["torch"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert views["triton"][0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("order", ag.ORDERS)
def test_compiled_kernels_on_cuda(monkeypatch, order):
    # The compiled kernels at MoCo's size (224 px: 49 whole blocks of 1,024 pixels; 225 px: a partly
    # masked last block) against the where path, and without a host sync (gpu_check's tests phase).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for side in (224, 225):
        g = torch.Generator(device="cuda").manual_seed(side)
        x = torch.rand(16, 3, side, side, device="cuda", generator=g)
        p = ag.sample_params(16, MOCO_V2, "cuda", g, order=order)
        at.jitter_gray(x, p)  # compiled outside the sync check
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = ag.apply(x, p, kernel="triton")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.testing.assert_close(got, ag.apply(x, p, select="where"), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_uint8_views_on_cuda(monkeypatch):
    # FFCV's uint8 batch at MoCo's size, compiled, without a host sync, against the float path on
    # the floats the kernels make, the rounded quotients, made on the host (torch's div_ there; on a
    # GPU it is u8 * float(1/255), one ulp off for about half the 256 values, which jitter, hue and
    # contrast carry to ~1e-6 in the views: past this tolerance, under the interpreter, at seeds of
    # this size).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.Generator(device="cuda").manual_seed(0)
    u8 = torch.randint(0, 256, (8, 2, 224, 224, 3), dtype=torch.uint8, device="cuda", generator=g)
    views = u8.permute(1, 0, 4, 2, 3)
    p = ag.sample_params(16, MOCO_V2, "cuda", g)
    at.jitter_gray(views, p)  # compiled outside the sync check
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = at.jitter_gray(views, p)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = at.jitter_gray(views.cpu().reshape(16, 3, 224, 224).float().div_(255.0).cuda(), p)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_refuses_what_it_cannot_run(monkeypatch):
    x, p = batch_and_params("batch")
    with pytest.raises(ValueError, match="kernel must be one of"):
        ag.apply(x, p, kernel="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="float32"):
        at.jitter_gray(x.half(), p)
    with pytest.raises(ValueError, match="float32 or uint8"):
        at.jitter_gray(x[:, :2], p)
    with pytest.raises(ValueError, match="6 images but parameters for 3"):
        at.jitter_gray(x.view(2, 3, 3, 8, 8), replace(p, **{f: getattr(p, f)[:3] for f in ("jitter", "gray")}))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA batch"):
            ag.apply(x, p, kernel="triton")


@pytest.mark.parametrize("spec", [MOCO_V2, MOCO_V1], ids=["v2", "v1"])
@pytest.mark.parametrize("source", ["fp32", "u8"])
def test_sm90_build(monkeypatch, spec, source):
    # Both kernels compile for an H100/H200 (sm_90) without a GPU (Triton's own ptxas): the compiled
    # frontend is stricter than the interpreter (globals only as constexprs, one type per branch).
    # With each recipe's flags as jitter_gray passes them: MoCo v1's gray first is its own build,
    # and so is each input type (FFCV's uint8, divided by 255 correctly rounded: div.rn). The layout
    # tuple as the JIT specialises it for that input at MoCo's size (each int an i32, a 1 a constant:
    # the channel stride of FFCV's views, the column stride of a contiguous float batch).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    mean, colour = at._kernels()
    shape, dtype = ((256, 2, 224, 224, 3), torch.uint8) if source == "u8" else ((512, 3, 224, 224), torch.float32)
    x = torch.empty(shape, dtype=dtype, device="meta")
    layout = at.layout_of(at.image_rows(x.permute(1, 0, 4, 2, 3) if source == "u8" else x))
    args = {"flags": "*i8", "order": "*i64", "factors": "*fp32"}
    args["layout"] = tuple("constexpr" if v == 1 else "i32" for v in layout)
    p = ag.sample_params(1, spec)
    flags = {"USE_HUE": p.use_hue, "USE_GRAY": p.use_gray, "GRAY_FIRST": p.gray_first, "BLOCK": at.BLOCK}
    flags["U8"] = source == "u8"
    for fn, ptrs, extra in ((mean, ("means",), {}), (colour, ("out", "means"), {"USE_JITTER": True})):
        sig = {"x": f"*{source}"} | dict.fromkeys(ptrs, "*fp32") | args
        ones = {(fn.arg_names.index("layout"), k): 1 for k, v in enumerate(layout) if v == 1}
        assert len(ones) == 1  # a stride of 1: FFCV's channels, a contiguous batch's columns
        ptx = sm90_ptx(fn, sig, flags | extra | ones)
        assert ".entry" in ptx
        assert ("div.rn.f32" in ptx) == (source == "u8")
