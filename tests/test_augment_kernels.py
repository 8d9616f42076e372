"""The batched augmentation kernels against their per-image torchvision reference, and their rates."""

from dataclasses import replace

import pytest
import torch
from moco_fast.kernels import augment_gpu
from moco_fast.kernels.augment_gpu import (
    adjust_hue,
    apply,
    apply_reference,
    gaussian_blur,
    gaussian_kernels,
    sample_params,
)
from moco_fast.loaders import LoaderArgs
from moco_fast.loaders.base import DeviceAugment

from moco_fast.augment import MOCO_CIFAR, MOCO_V1, MOCO_V2

# Only what one op does: everything else off.
NOTHING = replace(MOCO_V2, jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0, flip_prob=0.0)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Colourful images with structure (a blur changes them) and exact 0/1 values (clamps matter)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[:, :, : size // 4] = (x[:, :, : size // 4] > 0.5).float()
    x[:, :, :, -2:] = x[:, :, :, -2:].mean(dim=1, keepdim=True)  # some grey pixels: hue's special case
    return x


@pytest.mark.parametrize("select", ["where", "index"])  # the GPU and the CPU formulation, both on the CPU
@pytest.mark.parametrize("order", ["sample", "batch"])
@pytest.mark.parametrize(
    "spec,size",
    [(MOCO_V2, 64), (MOCO_V1, 40), (MOCO_CIFAR, 32), (replace(MOCO_V2, jitter_prob=1.0, blur_prob=1.0), 48)],
    ids=["v2-k23", "v1-gray-first", "cifar", "all-on"],
)
def test_fast_matches_reference(spec, size, order, select):
    n = 16
    g = torch.Generator().manual_seed(1)
    params = sample_params(n, spec, "cpu", g, order=order)
    x = images(n, size)
    before = x.clone()
    fast, ref = apply(x, params, select=select), apply_reference(x, params)
    torch.testing.assert_close(fast, ref, rtol=0, atol=2e-5)
    assert not torch.equal(fast, x)  # the recipe did something
    assert torch.equal(x, before)  # and left its input alone


ALL_ON = replace(MOCO_V2, jitter_prob=1.0, gray_prob=1.0, blur_prob=1.0)


@pytest.mark.parametrize("order", ["sample", "batch"])
def test_cpu_pass_goes_a_chunk_at_a_time(monkeypatch, order):
    """On the CPU no op sees more than CPU_CHUNK_PIXELS (whole-batch temporaries cost page faults),
    and the chunks, their last one short, make the reference's result."""
    monkeypatch.setattr(augment_gpu, "CPU_CHUNK_PIXELS", 6 * 24 * 24)
    seen = []
    blur = augment_gpu.gaussian_blur
    monkeypatch.setattr(augment_gpu, "gaussian_blur", lambda x, k: seen.append(x.shape[0]) or blur(x, k))
    params = sample_params(16, ALL_ON, "cpu", torch.Generator().manual_seed(2), order=order)
    x = images(16, 24)
    out = apply(x, params)
    assert seen == [6, 6, 4]
    torch.testing.assert_close(out, apply_reference(x, params), rtol=0, atol=2e-5)


def test_cpu_chunks_are_by_pixels():
    """2 x 64 views of 224 px go in two passes; a CIFAR batch, small images, stays one pass."""
    assert augment_gpu.cpu_chunks(torch.empty(128, 3, 224, 224)) == [slice(0, 64), slice(64, 128)]
    assert augment_gpu.cpu_chunks(torch.empty(1024, 3, 32, 32)) == [slice(0, 1024)]


@pytest.mark.parametrize(
    "dtype,channels_last,atol", [(torch.float32, True, 1e-4), (torch.bfloat16, False, 0.02)], ids=["fp32-cl", "bf16"]
)
def test_device_augment_on_the_cpu_goes_a_chunk_at_a_time(monkeypatch, dtype, channels_last, atol):
    """The loaders' CPU pass, normalisation included, chunk by chunk into one output tensor: the
    same views as the whole batch's pass and normalisation, in the trainer's dtype and format."""
    monkeypatch.setattr(augment_gpu, "CPU_CHUNK_PIXELS", 6 * 24 * 24)
    seen = []
    blur = augment_gpu.gaussian_blur
    monkeypatch.setattr(augment_gpu, "gaussian_blur", lambda x, k: seen.append(x.shape[0]) or blur(x, k))
    args = LoaderArgs(None, ALL_ON, 8, torch.device("cpu"), dtype, channels_last=channels_last)
    x = images(16, 24)
    q, k = DeviceAugment(args, "sample")(x, torch.Generator().manual_seed(3))
    assert seen == [6, 6, 4]
    params = sample_params(16, ALL_ON, "cpu", torch.Generator().manual_seed(3))
    mean, std = torch.tensor(ALL_ON.mean).view(1, 3, 1, 1), torch.tensor(ALL_ON.std).view(1, 3, 1, 1)
    want = (apply_reference(x, params) - mean) / std
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for got, ref in ((q, want[:8]), (k, want[8:])):
        assert got.dtype == dtype and got.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(got.float(), ref, rtol=0, atol=atol)  # bf16: its rounding of ~2.5


def test_hue_rotation_matches_torchvision_over_the_whole_range():
    """Every shift from -0.5 to 0.5 and every sector, with grey, black, white and pure colours."""
    from torchvision.transforms import functional as TF

    x = images(11, 20, seed=7)
    x[:, :, 0, :6] = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0], [1, 1, 1]]).T
    shift = torch.linspace(-0.5, 0.5, 11)
    ref = torch.stack([TF.adjust_hue(img, float(s)) for img, s in zip(x, shift)])
    torch.testing.assert_close(adjust_hue(x, shift), ref, rtol=0, atol=2e-5)


def test_flip_can_be_left_out():
    params = sample_params(8, replace(NOTHING, flip_prob=1.0), flip=False)
    assert params.flip is None
    x = images(8, 16)
    assert torch.equal(apply(x, params), x)


@pytest.mark.parametrize("select", ["where", "index"])
def test_nothing_on_is_identity(select):
    x = images(16, 20)
    assert torch.equal(apply(x, sample_params(16, NOTHING), select=select), x)


def test_unblurred_images_are_exact():
    g = torch.Generator().manual_seed(0)
    x = images(6, 30)
    blur = torch.tensor([True, False, True, False, False, True])
    sigma = torch.rand(6, generator=g) * 1.9 + 0.1
    k = gaussian_kernels(sigma, blur, 9)
    torch.testing.assert_close(k.sum(dim=1), torch.ones(6))
    out = gaussian_blur(x, k)
    assert torch.equal(out[~blur], x[~blur])
    assert (out[blur] - x[blur]).abs().amax() > 0.05


def test_kernels_hold_no_denormal_weights():
    # x86 multiplies denormal floats in microcode: such tails made the CPU blur ~6x slower. Zeroing
    # what is under 1e-12 leaves the kernels torchvision's to 1e-11.
    sigma = torch.linspace(0.1, 2.0, 400)
    k = gaussian_kernels(sigma, None, 23)
    assert not ((k > 0) & (k < torch.finfo(k.dtype).tiny)).any()
    t = torch.arange(-11.0, 12.0)
    exact = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    torch.testing.assert_close(k, exact / exact.sum(dim=1, keepdim=True), rtol=0, atol=1e-11)


def test_same_generator_same_params():
    a = sample_params(32, MOCO_V2, "cpu", torch.Generator().manual_seed(5))
    b = sample_params(32, MOCO_V2, "cpu", torch.Generator().manual_seed(5))
    c = sample_params(32, MOCO_V2, "cpu", torch.Generator().manual_seed(6))
    assert torch.equal(a.factors, b.factors) and torch.equal(a.order, b.order) and torch.equal(a.blur, b.blur)
    assert not torch.equal(a.factors, c.factors)


def test_parameter_rates_and_ranges_match_spec():
    n = 20000
    spec = MOCO_V2
    p = sample_params(n, spec, "cpu", torch.Generator().manual_seed(0))
    for got, want in ((p.jitter, spec.jitter_prob), (p.gray, spec.gray_prob), (p.blur, spec.blur_prob)):
        assert abs(got.float().mean().item() - want) < 0.015
    assert abs(p.flip.float().mean().item() - spec.flip_prob) < 0.015
    lo = torch.tensor([1 - spec.brightness, 1 - spec.contrast, 1 - spec.saturation, -spec.hue])
    hi = torch.tensor([1 + spec.brightness, 1 + spec.contrast, 1 + spec.saturation, spec.hue])
    assert ((p.factors >= lo) & (p.factors <= hi)).all()
    # Uniform over the range: the mean sits in the middle.
    torch.testing.assert_close(p.factors.mean(dim=0), (lo + hi) / 2, atol=0.01, rtol=0)
    assert (p.sigma >= spec.blur_sigma[0]).all() and (p.sigma <= spec.blur_sigma[1]).all()
    # Every row a permutation of the four ops; each op first in about a quarter of the images.
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    first = torch.bincount(p.order[:, 0], minlength=4).float() / n
    torch.testing.assert_close(first, torch.full((4,), 0.25), atol=0.015, rtol=0)


def test_batch_order_is_shared_and_varies_across_batches():
    g = torch.Generator().manual_seed(0)
    orders = set()
    for _ in range(40):
        p = sample_params(8, MOCO_V2, "cpu", g, order="batch")
        assert p.shared_order is not None and (p.order == torch.tensor(p.shared_order)).all()
        orders.add(p.shared_order)
    assert len(orders) > 10  # 24 possible


@pytest.mark.parametrize("select", ["where", "index"])
@pytest.mark.parametrize("op", ["jitter", "gray", "blur", "flip"])
def test_applied_rates_match_spec(op, select):
    """Measured on the outputs: the share of images each op changed is its probability."""
    n, size = 3000, 12
    prob = {"jitter": 0.8, "gray": 0.2, "blur": 0.5, "flip": 0.5}[op]
    spec = replace(NOTHING, image_size=size, **{f"{op}_prob": prob})
    x = images(n, size, seed=3)
    out = apply(x, sample_params(n, spec, "cpu", torch.Generator().manual_seed(4)), select=select)
    if op == "gray":
        hit = (out[:, 0] == out[:, 1]).flatten(1).all(dim=1) & (out[:, 1] == out[:, 2]).flatten(1).all(dim=1)
    elif op == "flip":
        hit = (out == x.flip(-1)).flatten(1).all(dim=1)
    else:
        hit = (out - x).abs().flatten(1).amax(dim=1) > 1e-4
    assert abs(hit.float().mean().item() - prob) < 0.03


def test_bad_input_is_refused():
    p = sample_params(4, MOCO_V2)
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        apply(torch.rand(4, 1, 8, 8), p)
    with pytest.raises(ValueError, match="parameters for 4"):
        apply(torch.rand(5, 3, 8, 8), p)
    with pytest.raises(ValueError, match="order"):
        sample_params(4, MOCO_V2, order="random")
    with pytest.raises(ValueError, match="select"):
        apply(torch.rand(4, 3, 8, 8), p, select="some")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    dev = torch.device("cuda")
    params = sample_params(16, MOCO_V2, dev, torch.Generator(device=dev).manual_seed(0))
    x = images(16, 64).to(dev)
    fast = apply(x, params)
    assert fast.device.type == "cuda"
    cpu_params = replace(
        params, **{k: getattr(params, k).cpu() for k in ("jitter", "factors", "order", "gray", "blur", "sigma", "flip")}
    )
    torch.testing.assert_close(fast.cpu(), apply_reference(x.cpu(), cpu_params), rtol=0, atol=1e-4)


def test_augment_into_refuses_an_output_of_another_shape():
    params = sample_params(4, ALL_ON, "cpu", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="out is"):
        augment_gpu.augment_into(torch.empty(4, 3, 20, 24), images(4, 24), params)
