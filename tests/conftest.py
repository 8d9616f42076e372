"""Shared fixtures: small real-image folders cut from the demo set, and the shared data sets when present."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moco_fast.data import DEMO_ROOT

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_image_root(dst: Path, per_class: int = 8, classes: int = 2, test_per_class: int = 4) -> Path:
    """A data root with train/ and test/ holding real CIFAR JPEGs from the demo set."""
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in sorted(p.name for p in (DEMO_ROOT / split).iterdir())[:classes]:
            (dst / split / c).mkdir(parents=True, exist_ok=True)
            for f in sorted((DEMO_ROOT / split / c).iterdir())[:n]:
                shutil.copy(f, dst / split / c / f.name)
    return dst


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """2 classes x 16 train / 4 test images: read-only, shared by the session."""
    return make_image_root(tmp_path_factory.mktemp("tiny"), per_class=16, classes=2, test_per_class=4)


@pytest.fixture
def fresh_root(tmp_path) -> Path:
    """A writable copy that a test may damage."""
    return make_image_root(tmp_path / "data", per_class=8, classes=2, test_per_class=4)


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    p = SHARED_DATA / "imagenet-sample"
    if not p.is_dir():
        pytest.skip("../shared/data/imagenet-sample is not present")
    return p
