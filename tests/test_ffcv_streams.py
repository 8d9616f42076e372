"""The FFCV backend's per-image random streams (loaders/ffcv_ops.py), without a compiled pipeline:
the crop box is FFCV's (torchvision's) RandomResizedCrop sampling fed from the stream, and the
streams of the views, uses and epochs of one image are distinct."""

import pytest

pytest.importorskip("ffcv")  # every test here needs FFCV: skipped where it is not installed

import numba
import numpy as np
from ffcv.fields import rgb_image
from moco_fast.loaders.ffcv_ops import CROP, FLIP, EpochKey, crop_box, draw, view_stream

SCALE, RATIO = np.array([0.2, 1.0]), np.array([3 / 4, 4 / 3])


@numba.njit
def units(state, n):
    """The stream's first n numbers in [0, 1), drawn in compiled code (as the ops draw them: a state
    handed back to Python would come back an int, which Numba types int64)."""
    out = np.empty(n)
    for k in range(n):
        state, out[k] = draw(state, 0.0, 1.0)
    return out


@pytest.mark.parametrize("scale", [SCALE, np.array([0.9, 1.0])])
def test_crop_box_is_ffcvs_random_crop_fed_from_the_stream(monkeypatch, scale):
    # FFCV's plain-Python get_random_crop draws with np.random.uniform; replayed from the same stream
    # it must give the same box (the 10 tries, the ratio in log space, the central fallback)
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 400, size=(300, 2))] + [(10, 300), (300, 10), (1, 1)]
    for n, (h, w) in enumerate(sizes):
        state = np.uint64(view_stream(np.uint64(12345), n, 0, CROP))  # as the ops hold it (Python ints type int64)
        numbers = iter(units(state, 22))  # at most 10 tries of 2 draws, then 2

        def uniform(lo, hi, numbers=numbers):
            return lo + (hi - lo) * next(numbers)

        monkeypatch.setattr(rgb_image.np.random, "uniform", uniform)
        expected = rgb_image.get_random_crop(h, w, scale, RATIO)
        monkeypatch.undo()
        got = crop_box(h, w, scale, RATIO, state)
        assert tuple(int(x) for x in got) == expected, (h, w)


def test_a_box_that_no_try_fits_is_the_central_crop_of_the_ratios_bound():
    # 10 x 300 with 90-100% of its area: no box of ratio <= 4/3 fits 10 rows, every try fails; the
    # fallback is the whole height and 10 * 4/3 -> 13 columns, centred: (300 - 13) // 2 = 143
    state = np.uint64(view_stream(np.uint64(5), 0, 0, CROP))
    assert tuple(int(x) for x in crop_box(10, 300, np.array([0.9, 1.0]), RATIO, state)) == (0, 143, 10, 13)
    assert tuple(int(x) for x in crop_box(300, 10, np.array([0.9, 1.0]), RATIO, state)) == (143, 0, 13, 10)


def test_draws_are_uniform_in_their_range():
    out = 2.0 + 3.0 * units(np.uint64(view_stream(np.uint64(1), 0, 0, CROP)), 20000)
    assert out.min() >= 2.0 and out.max() < 5.0
    assert np.abs(np.histogram(out, bins=10, range=(2, 5))[0] / 2000 - 1).max() < 0.1  # sd ~0.02


def test_each_view_use_image_and_epoch_has_its_own_stream():
    a, b = EpochKey(3), EpochKey(3)
    a.set(0)
    b.set(1)
    starts = {
        view_stream(k.value[0], i, v, use) for k in (a, b) for i in range(50) for v in range(2) for use in (CROP, FLIP)
    }
    assert len(starts) == 2 * 50 * 2 * 2
    c = EpochKey(3)
    c.set(1)
    assert c.value[0] == b.value[0] != a.value[0]  # the key depends on (seed, epoch) only
    d = EpochKey(4)
    d.set(1)
    assert d.value[0] != b.value[0]
