"""Batched colour jitter, grayscale, Gaussian blur and flip with per-image random parameters.

Why: decoding and cropping keep the CPU busy (FFCV's Numba pipeline, DALI's decoder); the colour
and blur work of MoCo v2 is cheap for a GPU when done for the whole batch at once, and too slow for
the CPU (16 cores ran a DALI CPU pipeline with blur at only 400 img/s). Both views of a batch go
through `apply` in one pass, on whatever device they are on (on a machine without a GPU: the CPU).

The API is split in two so that the fast version and the per-image reference consume the very same
random numbers (that is how the tests compare them):

    params = sample_params(n, spec, device, generator)   # draws every random choice, on `device`
    out = apply(x, params)                                # fast: vectorised over the batch
    out = apply_reference(x, params)                      # plain loop over torchvision.functional

`x` is float N x 3 x H x W in [0, 1]. Semantics follow torchvision's tensor functions (the torch
loader's recipe): `RandomApply(ColorJitter, p)`, `RandomGrayscale(p)` (before or after the jitter as
the spec says), `RandomApply(GaussianBlur(k, sigma), p)`, `RandomHorizontalFlip(p)`.

ColorJitter order: torchvision applies brightness, contrast, saturation and hue in a new random order
for every image. `order="sample"` (default) does the same. `order="batch"` draws one random order
per batch (host side, no device sync): every image's own distribution is unchanged, only the images
of one batch share the order, and on a GPU hue runs once instead of four times.

Two formulations, same results (`apply(..., select=)`):
- "where" (the GPU default, no host sync): every op is computed for the whole batch. With a per-image
  order, each of the four stages is one blend `clamp(f * x + (1 - f) * target)` whose target is 0,
  the mean luma or the luma (brightness, contrast, saturation), then hue where it is the image's
  stage. Images not jittered get identity factors, images not blurred a delta kernel.
- "index" (the CPU default: a sync is free there and compute is scarce): each op is computed only
  for the images that get it, and written back in place into a private copy.

With "where", no host-device sync anywhere: every random choice stays a device tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from moco_fast.augment import AugSpec

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # torchvision's ColorJitter fn_idx numbering
LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
ORDERS = ("sample", "batch")


@dataclass
class AugParams:
    """Every random choice for a batch of N images. Tensors live on the batch's device."""

    jitter: torch.Tensor  # N bool: colour jitter applied
    factors: torch.Tensor  # N x 4 float: brightness, contrast, saturation factors, hue shift
    order: torch.Tensor  # N x 4 long: the order of the four jitter ops for each image
    gray: torch.Tensor  # N bool
    blur: torch.Tensor  # N bool
    sigma: torch.Tensor  # N float: blur sigma (used where blur)
    flip: torch.Tensor | None  # N bool; None: this pass does not flip (FFCV flips on the CPU)
    # Host-side facts, fixed by the spec (so `apply` never has to look at device values):
    shared_order: tuple[int, ...] | None  # the batch's one jitter order, with order="batch"
    kernel_size: int  # blur kernel side (odd)
    gray_first: bool  # MoCo v1: grayscale before the jitter
    use_jitter: bool
    use_hue: bool
    use_gray: bool
    use_blur: bool

    def __len__(self) -> int:
        return self.jitter.shape[0]

    def rows(self, s: slice) -> AugParams:
        """The parameters of the images `s` of the batch (a slice: views, no copies)."""
        flip = None if self.flip is None else self.flip[s]
        per_image = ("jitter", "factors", "order", "gray", "blur", "sigma")
        return replace(self, flip=flip, **{name: getattr(self, name)[s] for name in per_image})


def _uniform(n: int, lo: float, hi: float, device, generator) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator) * (hi - lo) + lo


def sample_params(
    n: int,
    spec: AugSpec,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    order: str = "sample",
    flip: bool = True,
) -> AugParams:
    """Draw the random parameters of `n` images as the spec describes (torchvision's ranges).

    `generator` must live on `device` (None: the global RNG). With `order="batch"` the shared order
    comes from `generator` when it is a CPU generator, else from the global CPU RNG (no device sync).
    `flip=False` leaves flipping to someone else (FFCV's Numba pipeline does it on the CPU).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    device = torch.device(device)

    def rand():
        return torch.rand(n, device=device, generator=generator)

    b, c, s, h = spec.brightness, spec.contrast, spec.saturation, spec.hue
    factors = torch.stack(
        [
            _uniform(n, max(0.0, 1 - b), 1 + b, device, generator),
            _uniform(n, max(0.0, 1 - c), 1 + c, device, generator),
            _uniform(n, max(0.0, 1 - s), 1 + s, device, generator),
            _uniform(n, -h, h, device, generator),
        ],
        dim=1,
    )  # N x 4
    shared = None
    if order == "sample":
        perm = torch.rand(n, 4, device=device, generator=generator).argsort(dim=1)  # N x 4, a permutation per row
    else:
        host_gen = generator if generator is not None and generator.device.type == "cpu" else None
        shared = tuple(torch.randperm(4, generator=host_gen).tolist())  # host tensor: no device sync
        # Filled on the device (torch.tensor(list, device=cuda) would be a blocking host copy).
        perm = torch.stack([torch.full((n,), op, device=device, dtype=torch.long) for op in shared], dim=1)
    return AugParams(
        jitter=rand() < spec.jitter_prob,
        factors=factors,
        order=perm,
        gray=rand() < spec.gray_prob,
        blur=rand() < spec.blur_prob,
        sigma=_uniform(n, spec.blur_sigma[0], spec.blur_sigma[1], device, generator),
        flip=(rand() < spec.flip_prob) if flip else None,
        shared_order=shared,
        kernel_size=spec.blur_kernel_size,
        gray_first=spec.gray_before_jitter,
        use_jitter=spec.jitter_prob > 0 and max(b, c, s, h) > 0,
        use_hue=spec.jitter_prob > 0 and h > 0,
        use_gray=spec.gray_prob > 0,
        use_blur=spec.blur_prob > 0,
    )


# ---- the fast, batched version ---------------------------------------------------------------


def _col(t: torch.Tensor) -> torch.Tensor:
    """N -> N x 1 x 1 x 1, to broadcast a per-image value over an image batch."""
    return t.view(-1, 1, 1, 1)


def luma(x: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W -> N x 1 x H x W, torchvision's rgb_to_grayscale arithmetic."""
    r, g, b = x.unbind(dim=1)
    # Accumulated in place: 3 passes and one new tensor, where `w0 * r + w1 * g + w2 * b` made 5 of each.
    return (LUMA[0] * r).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


# Output channel c of the HSV -> RGB map is max - chroma * clamp(min(k, 4 - k), 0, 1) with
# k = (n_c + 6 h) mod 6: the six-sector table of torchvision's `_hsv2rgb` in closed form. With
# min(k, 4 - k) = 2 - |k - 2| and min = max - chroma it is min + chroma * clamp(|k - 2| - 1, 0, 1).
_SECTOR_OFFSET = (5.0, 3.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by its own shift (N, in [-0.5, 0.5]); value and saturation kept.

    Equals torchvision's RGB -> HSV -> RGB round trip up to float rounding (~1e-6). Fewer passes
    than its arithmetic, on every device: no HSV tensor, no sector one-hot; the hue is kept in
    sixths of a turn (no /6, fmod, % 1), one division instead of three, and the N x 3 x H x W
    steps are in place on one new tensor (on the CPU each new tensor of a batch costs page faults)."""
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)  # N x H x W
    cr = maxc - minc
    # torchvision's 6h = bc - gc, 2 + rc - bc or 4 + gc - rc (xc = (max - x) / cr) over a common cr.
    h6 = torch.where(
        maxc == r, g - b, torch.where(maxc == g, torch.add(b - r, cr, alpha=2.0), torch.add(r - g, cr, alpha=4.0))
    )
    # Grey pixels (cr = 0) have a numerator of 0 and any hue: the clamp only avoids 0 / 0.
    h6.div_(cr.clamp(min=torch.finfo(x.dtype).tiny)).add_(6.0 * shift.view(-1, 1, 1))
    # (5, 3, 1) made on the device: a torch.tensor of a list would be a blocking host->device copy.
    n = (_SECTOR_OFFSET[0] - 2.0 * torch.arange(3, device=x.device, dtype=x.dtype)).view(1, 3, 1, 1)
    k = (n + h6.unsqueeze(1)).remainder_(6.0)  # N x 3 x H x W
    ramp = k.sub_(2.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
    return torch.addcmul(minc.unsqueeze(1), cr.unsqueeze(1), ramp)


def _masked(index: bool, mask: torch.Tensor, fn, x: torch.Tensor, *per_image: torch.Tensor) -> torch.Tensor:
    """fn(x, *per_image) for the images where mask is set, x elsewhere.

    `index=False` (GPU): computed for every image and selected with `where` (no host sync).
    `index=True` (CPU, where a sync costs nothing and compute is scarce): only the selected images
    are computed, and written back in place (`apply` works on its own copy then)."""
    if not index:
        return torch.where(_col(mask), fn(x, *per_image), x)
    idx = mask.nonzero().view(-1)
    if idx.numel() == 0:
        return x
    # x[idx] rather than index_select: the latter takes ~10x longer on the CPU for image batches.
    return x.index_copy_(0, idx, fn(x[idx], *(t[idx] for t in per_image)))


def _blend(x: torch.Tensor, f: torch.Tensor, target) -> torch.Tensor:
    # (1 - f) * target + f * x as one pass over x (addcmul), clamped in place: on every device one
    # pass and one new N x 3 x H x W tensor fewer than the three-term expression.
    return torch.addcmul((1.0 - _col(f)) * target, _col(f), x).clamp_(0.0, 1.0)


# One jitter op with a per-image factor (N): torchvision's adjust_* arithmetic, batched.
JITTER_OPS = {
    BRIGHTNESS: lambda x, f: (_col(f) * x).clamp_(0.0, 1.0),  # in place on the product: no second tensor
    CONTRAST: lambda x, f: _blend(x, f, luma(x).mean(dim=(1, 2, 3), keepdim=True)),
    SATURATION: lambda x, f: _blend(x, f, luma(x)),
    HUE: adjust_hue,
}


def _jitter(x: torch.Tensor, p: AugParams, index: bool) -> torch.Tensor:
    ops = (BRIGHTNESS, CONTRAST, SATURATION, HUE) if p.use_hue else (BRIGHTNESS, CONTRAST, SATURATION)
    if index:
        # Each image gets each of its ops exactly once, computed for that image only (see _masked).
        for k in range(4):
            stage = p.order[:, k] if p.shared_order is None else None
            for op in ops:
                if p.shared_order is not None and p.shared_order[k] != op:
                    continue
                mask = p.jitter if stage is None else p.jitter & (stage == op)
                x = _masked(True, mask, JITTER_OPS[op], x, p.factors[:, op])
        return x
    identity = (torch.arange(4, device=x.device) < HUE).to(p.factors.dtype)  # 1, 1, 1, 0 (no host copy)
    factors = torch.where(p.jitter[:, None], p.factors, identity)  # N x 4: not jittered -> identity
    if p.shared_order is not None:  # one op per stage for the whole batch
        for op in p.shared_order:
            if op == HUE:
                if p.use_hue:
                    x = _masked(False, p.jitter, adjust_hue, x, factors[:, HUE])
            else:
                x = JITTER_OPS[op](x, factors[:, op])
        return x
    for k in range(4):
        # Per-image order on a GPU, without a sync: at each stage brightness, contrast and
        # saturation are one blend towards 0, the mean luma or the luma; images whose op here is
        # hue blend with f = 1 (unchanged) and then get their hue rotated.
        op = p.order[:, k]  # N
        is_hue = op == HUE
        f = torch.where(is_hue, 1.0, factors.gather(1, op.clamp(max=2)[:, None])[:, 0])
        y = luma(x)  # N x 1 x H x W
        target = torch.where(
            _col(op == SATURATION), y, torch.where(_col(op == CONTRAST), y.mean(dim=(1, 2, 3), keepdim=True), 0.0)
        )
        x = _blend(x, f, target)
        if p.use_hue:
            x = _masked(False, is_hue & p.jitter, adjust_hue, x, factors[:, HUE])
    return x


def _gray(x: torch.Tensor, p: AugParams, index: bool) -> torch.Tensor:
    return _masked(index, p.gray, lambda xs: luma(xs).expand_as(xs), x)


def gaussian_kernels(sigma: torch.Tensor, blur: torch.Tensor | None, k: int) -> torch.Tensor:
    """N x k normalised 1-D Gaussians (torchvision's formula); a delta where `blur` is False.

    Weights under 1e-12 are zeroed (all of them together move no pixel by 1e-10): at small sigmas
    the tails are denormal floats, which x86 multiplies slowly, and they made the CPU blur ~6x slower."""
    half = (k - 1) * 0.5
    t = torch.linspace(-half, half, steps=k, device=sigma.device, dtype=sigma.dtype)
    pdf = torch.exp(-0.5 * (t[None, :] / sigma[:, None]).pow(2))
    kern = pdf / pdf.sum(dim=1, keepdim=True)
    kern = kern.masked_fill(kern < 1e-12, 0.0)
    if blur is None:
        return kern
    delta = (t == 0).to(kern.dtype).expand_as(kern)
    return torch.where(blur[:, None], kern, delta)


def gaussian_blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-image separable blur with reflect padding: N x C x H x W, kernels N x k.

    The images become the channels of one depthwise convolution (groups = N * C); a vertical then a
    horizontal pass equal torchvision's single 2-D pass over the same reflect-padded image.
    """
    n, c, h, w = x.shape
    k = kernels.shape[1]
    wk = kernels.to(x.dtype).repeat_interleave(c, dim=0)  # (N*C) x k
    xp = F.pad(x.contiguous().view(1, n * c, h, w), [k // 2] * 4, mode="reflect")
    xp = F.conv2d(xp, wk.view(n * c, 1, k, 1), groups=n * c)  # vertical: 1 x NC x H x (W + k - 1)
    xp = F.conv2d(xp, wk.view(n * c, 1, 1, k), groups=n * c)  # horizontal: 1 x NC x H x W
    return xp.view(n, c, h, w)


# Pixels (images x H x W) per pass of the CPU formulation: 64 views of 224 px. A whole batch's
# temporaries (77 MB each for 2 x 64 views) came as fresh pages from the kernel (above glibc's mmap
# threshold): page faults took as much CPU time as the arithmetic, and nothing stayed in cache.
# Measured with one thread, 2 x 64 views: 32 and 64 views a pass about equal, 128 (no chunks) 1.1-1.7x
# slower; with two threads on the shared 2-core machine 64 beat 32 (half the parallel regions, each
# of which waits for both threads). By pixels, so that small images (CIFAR) stay one pass.
CPU_CHUNK_PIXELS = 64 * 224 * 224


def cpu_chunks(x: torch.Tensor) -> list[slice]:
    """The slices along N of a batch N x C x H x W that the CPU formulation augments one at a time."""
    n, _, h, w = x.shape
    step = max(1, CPU_CHUNK_PIXELS // (h * w))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


KERNELS = ("torch", "triton")


@torch.no_grad()
def apply(x: torch.Tensor, params: AugParams, select: str = "auto", kernel: str = "torch") -> torch.Tensor:
    """Augment a batch: float N x 3 x H x W in [0, 1] -> the same shape, in one vectorised pass.

    `select`: how an op reaches only some images. "where" computes it for all and selects (no host
    sync; the GPU default), "index" computes it for the selected images only, CPU_CHUNK_PIXELS at a
    time (the CPU default, `augment_into`), "auto" picks by device. Both give the same result. With
    "index" the result is always a new tensor (the caller may change it in place).

    `kernel="triton"`: jitter and grayscale in the fused kernels of `augment_triton` (float32, a
    CUDA batch or TRITON_INTERPRET=1; blur and flip as "where"). Opt-in: its GPU speed is unmeasured."""
    if select not in ("auto", "where", "index"):
        raise ValueError(f"select must be auto, where or index, got {select!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "triton":
        from .augment_triton import jitter_gray

        _check_batch(x, params)
        return _apply(x, params, index=False, colour=lambda x, p, _: jitter_gray(x, p))
    if select == "index" or (select == "auto" and x.device.type == "cpu"):
        return augment_into(torch.empty_like(x), x, params)
    _check_batch(x, params)
    return _apply(x, params, index=False)


@torch.no_grad()
def augment_into(
    out: torch.Tensor, x: torch.Tensor, params: AugParams, finish: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """The CPU formulation ("index"): x's images augmented into `out` (x's shape, any dtype and
    memory format), CPU_CHUNK_PIXELS at a time, so that no temporary is a whole batch's. `finish`
    (say, the loaders' normalisation) runs on each augmented chunk, a tensor of its own that it may
    change in place, before the chunk is written. Returns `out`."""
    _check_batch(x, params)
    if out.shape != x.shape:
        raise ValueError(f"out is {tuple(out.shape)} for a batch of {tuple(x.shape)}")
    for s in cpu_chunks(x):
        y = _apply(x[s].clone(), params.rows(s), index=True)  # the masked ops write in place
        out[s] = y if finish is None else finish(y)
    return out


def _check_batch(x: torch.Tensor, params: AugParams) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected N x 3 x H x W, got {tuple(x.shape)}")
    check_count(x.shape[0], params)


def check_count(n: int, params: AugParams) -> None:
    if n != len(params):
        raise ValueError(f"{n} images but parameters for {len(params)}")


def _colour(x: torch.Tensor, p: AugParams, index: bool) -> torch.Tensor:
    """Jitter and grayscale, in the spec's order."""
    if p.use_gray and p.gray_first:
        x = _gray(x, p, index)
    if p.use_jitter:
        x = _jitter(x, p, index)
    if p.use_gray and not p.gray_first:
        x = _gray(x, p, index)
    return x


def _apply(x: torch.Tensor, p: AugParams, index: bool, colour=_colour) -> torch.Tensor:
    """`colour` (x, p, index) -> x: jitter and grayscale (torch's, or the fused Triton kernels)."""
    x = colour(x, p, index)
    if p.use_blur:
        if index:
            x = _masked(
                True, p.blur, lambda xs, sig: gaussian_blur(xs, gaussian_kernels(sig, None, p.kernel_size)), x, p.sigma
            )
        else:  # a delta kernel leaves the images that are not blurred exactly as they are
            x = gaussian_blur(x, gaussian_kernels(p.sigma, p.blur, p.kernel_size))
    if p.flip is not None:
        x = torch.where(_col(p.flip), x.flip(-1), x)
    return x


# ---- the plain reference: one image at a time through torchvision.transforms.functional ---------


@torch.no_grad()
def apply_reference(x: torch.Tensor, params: AugParams) -> torch.Tensor:
    """The same augmentation, image by image with torchvision's functions (slow; for the tests)."""
    from torchvision.transforms import functional as TF

    p = params
    jitter_fns = {
        BRIGHTNESS: TF.adjust_brightness,
        CONTRAST: TF.adjust_contrast,
        SATURATION: TF.adjust_saturation,
        HUE: TF.adjust_hue,
    }
    out = []
    for i in range(x.shape[0]):
        img = x[i]
        gray = p.use_gray and bool(p.gray[i])
        if gray and p.gray_first:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if p.use_jitter and bool(p.jitter[i]):
            for op in p.order[i].tolist():
                if op == HUE and not p.use_hue:
                    continue  # ColorJitter(hue=0) skips hue
                img = jitter_fns[op](img, float(p.factors[i, op]))
        if gray and not p.gray_first:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if p.use_blur and bool(p.blur[i]):
            s = float(p.sigma[i])
            img = TF.gaussian_blur(img, [p.kernel_size, p.kernel_size], [s, s])
        if p.flip is not None and bool(p.flip[i]):
            img = TF.hflip(img)
        out.append(img)
    return torch.stack(out)
