"""torchvision's ColorJitter on PIL images, with the hue step from lookup tables: the same bytes.

torchvision shifts hue through PIL: `img.convert("HSV")`, add to H, convert back. Each of the two
conversions spends a float division (and an fmod) on every pixel; at 224 px the hue step cost about
4.1 of the 5.8 ms the jitter took a view, the largest cost of a view. PIL's per-pixel arithmetic
depends on few enough inputs that tables hold it:

- RGB -> HSV: H depends only on (g - r, b - r) (a 511 x 511 table), S on (max, max - min), V is the
  max. Both tables are read off PIL's own `convert("HSV")` at first use, not re-derived.
- HSV -> RGB: each output channel is V, or round(V x k) for a k that depends on (S, H) only
  (Pillow's hsv2rgb: p = v(1 - s), q = v(1 - s f), t = v(1 - s(1 - f)), placed by H's sector). k is
  kept as 24-bit fixed point: (V x K + 2^23) >> 24 equals PIL's float rounding for every (H, S, V)
  (tests/test_torch_loader.py checks all 2^24 of them against PIL, and all 2^24 RGB colours).

About 1.0 instead of 2.8 ms a 224 px view inside the loader, one core (docs/ffcv.md); PIL's bytes.
"""

from __future__ import annotations

import functools

import numpy as np
import torchvision.transforms.functional as F
from PIL import Image
from torchvision import transforms as T


class ColorJitter(T.ColorJitter):
    """T.ColorJitter whose hue step is `adjust_hue`: the same draws from torch's generator (the
    order, then the brightness, contrast, saturation and hue factors: torchvision's get_params) and
    the same PIL brightness, contrast and saturation steps, so a seed gives the views it gave."""

    def forward(self, img: Image.Image) -> Image.Image:
        order, b, c, s, h = self.get_params(self.brightness, self.contrast, self.saturation, self.hue)
        for fn_id in order.tolist():
            if fn_id == 0 and b is not None:
                img = F.adjust_brightness(img, b)
            elif fn_id == 1 and c is not None:
                img = F.adjust_contrast(img, c)
            elif fn_id == 2 and s is not None:
                img = F.adjust_saturation(img, s)
            elif fn_id == 3 and h is not None:
                img = adjust_hue(img, h)
        return img


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision's F.adjust_hue on a PIL image, the same bytes; RGB from the tables, other modes
    (grey: unchanged) by torchvision itself."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5].")
    if img.mode != "RGB":
        return F.adjust_hue(img, hue_factor)
    # torchvision's shift: int(factor * 255) added to PIL's 8-bit H, wrapping
    shift = int(np.int32(hue_factor * 255).astype(np.uint8))
    x = np.frombuffer(img.tobytes("raw", "RGBX"), np.uint32)  # one word a pixel: r | g << 8 | b << 16
    h, s, v = rgb_to_hsv(x)
    h += shift
    h &= 255
    return Image.frombytes("RGB", img.size, hsv_to_rgb(h, s, v))


def rgb_to_hsv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PIL's convert("HSV") of pixels packed as r | g << 8 | b << 16 (uint32, N): H, S, V (int64, N)."""
    hue_table, sat_table = _tables()[:2]
    r = (x & 255).astype(np.int32)
    key = ((x >> 8) & 255).astype(np.int32) * 511
    key += ((x >> 16) & 255).astype(np.int32)
    key -= r * 512
    key += 255 * 511 + 255  # (g - r + 255) * 511 + (b - r + 255)
    hx = hue_table.take(key)  # H | (max - r) << 16 | (max - min) << 8
    h = hx & 255
    hx >>= 8
    v = hx >> 8
    v += r
    hx += r * 256  # max * 256 + (max - min)
    return h, sat_table.take(hx), v


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """PIL's convert("RGB") of HSV pixels (int64 N each, values 0-255): N x 3 uint8."""
    rg_table, b_table = _tables()[2:]
    key = s << 8
    key += h
    vu = v.view(np.uint64)
    # Two 32-bit lanes in one uint64: V x K < 2^32 in each, so one multiply scales R and G without
    # a carry between them; after + 2^23 the rounded value is the lane's top byte (bytes 3 and 7)
    rg = rg_table.take(key)
    rg *= vu
    rg += np.uint64((1 << 23) | (1 << 55))
    b = b_table.take(key)
    b *= vu
    b += np.uint64(1 << 23)
    out = np.empty((len(h), 3), np.uint8)
    out[:, 0] = rg.view(np.uint8)[3::8]
    out[:, 1] = rg.view(np.uint8)[7::8]
    out[:, 2] = b.view(np.uint8)[3::8]
    return out


@functools.cache
def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(hue_table, sat_table, rg_table, b_table), built once per process (a few ms)."""
    # H of every (g - r, b - r), read off PIL: the colour with those differences and min(r, g, b) = 0
    d = np.arange(-255, 256)
    dg, db = np.meshgrid(d, d, indexing="ij")
    r = np.maximum(0, np.maximum(-dg, -db))
    top = np.maximum(0, np.maximum(dg, db))  # max - r
    spread = top - np.minimum(0, np.minimum(dg, db))  # max - min; > 255 for no colour
    rgb = np.stack([r, r + dg, r + db], -1)
    rgb[spread > 255] = 0
    hue = np.asarray(Image.fromarray(rgb.astype(np.uint8), "RGB").convert("HSV"))[..., 0]
    hue_table = (hue | (top << 16) | (spread << 8)).astype(np.int64).ravel()

    # S of every (max, max - min), read off PIL: the colour (max, min, min)
    mx, sp = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    mn = np.clip(mx - sp, 0, 255)
    grey = np.stack([mx, mn, mn], -1).astype(np.uint8)
    sat_table = np.asarray(Image.fromarray(grey, "RGB").convert("HSV"))[..., 1].astype(np.int64).ravel()

    # HSV -> RGB as Pillow's hsv2rgb computes it (Convert.c): float32 f and s, double products
    h = np.arange(256, dtype=np.float64)
    sector = np.floor(h * 6.0 / 255.0)
    f = (h * 6.0 / 255.0 - sector).astype(np.float32)[None, :]  # per H, one row per S below
    fs = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)[:, None]
    one = np.ones((256, 256))
    p = one - fs.astype(np.float64)
    q = 1.0 - (fs * f).astype(np.float64)  # fs * f is a float32 product in C
    t = 1.0 - fs.astype(np.float64) * (1.0 - f.astype(np.float64))
    by_sector = [(one, t, p), (q, one, p), (p, one, t), (p, q, one), (t, p, one), (one, p, q)]
    k = np.empty((256, 256, 3))  # [S, H, channel]
    for i, factors in enumerate(by_sector):
        cols = sector.astype(np.int64) % 6 == i  # H = 255 gives sector 6, which is 0
        for c in range(3):
            k[:, cols, c] = factors[c][:, cols]
    fixed = np.round(k.reshape(-1, 3) * (1 << 24)).astype(np.uint64)  # <= 2^24: V x K < 2^32
    rg_table = fixed[:, 0] | (fixed[:, 1] << np.uint64(32))
    return hue_table, sat_table, rg_table, np.ascontiguousarray(fixed[:, 2])
