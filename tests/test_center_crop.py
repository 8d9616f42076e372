"""Evaluation's resize and center crop: torchvision's bytes for ordinary images, and a thin image
(1 x 5000) cut before its resize instead of resized to 256 x 1,280,000 (983 MB) first."""

import numpy as np
import pytest
import torch
from moco_fast.loaders.resident import _decode
from moco_fast.loaders.torch_loader import eval_transform
from PIL import Image
from torchvision import transforms as T


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def torchvision_eval(img: Image.Image, image_size: int) -> torch.Tensor:
    """What eval_transform gave before: T.Resize then T.CenterCrop, whatever the image."""
    size = image_size if image_size <= 64 else round(image_size / 0.875)
    return T.Compose([T.Resize(size), T.CenterCrop(image_size), T.PILToTensor()])(img)


@pytest.fixture
def resized_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The (width, height) of every image PIL's resize makes from here on."""
    sizes, resize = [], Image.Image.resize

    def recorded(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recorded)
    return sizes


@pytest.mark.parametrize("image_size", [32, 224])
@pytest.mark.parametrize("wh", [(500, 375), (375, 500), (640, 480), (224, 224), (300, 40), (33, 500)])
def test_ordinary_images_give_torchvisions_bytes(image_size, wh):
    img = noise(*wh)
    assert torch.equal(eval_transform(image_size)(img), torchvision_eval(img, image_size))


@pytest.mark.parametrize("wh", [(2, 1000), (1000, 3), (1, 5000), (7, 3001)])
def test_a_thin_image_is_cut_before_its_resize(wh, resized_sizes):
    img = noise(*wh)
    expected = torchvision_eval(img, 32).int()  # at 32: a 32 x 160,000 image at most, 15 MB
    resized_sizes.clear()
    got = eval_transform(32)(img)
    assert resized_sizes == [(32, 32)]  # the crop alone, not 32 x 16,000 and more
    assert got.shape == expected.shape and (got.int() - expected).abs().max() <= 1  # rounding of the box


def test_a_1x5000_image_at_224_stays_small(tmp_path, resized_sizes):
    # noise, but rows 2490-2509 of one colour: the crop reads the middle rows (2499.5 +- 0.44)
    a = np.asarray(noise(1, 5000)).copy()
    a[2490:2510] = (200, 30, 90)
    img = Image.fromarray(a)
    x = eval_transform(224)(img)
    assert x.shape == (3, 224, 224) and resized_sizes == [(224, 224)]  # not 256 x 1,280,000
    assert (x.int() - torch.tensor([200, 30, 90]).view(3, 1, 1)).abs().max() <= 1
    img.save(tmp_path / "thin.png")  # the resident loader's decode: the same cut
    resized_sizes.clear()
    y = _decode(str(tmp_path / "thin.png"), 256)
    assert y.shape == (256, 256, 3) and resized_sizes == [(256, 256)]
    assert np.abs(y.astype(int) - [200, 30, 90]).max() <= 1
