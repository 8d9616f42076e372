import re
from pathlib import Path

from setuptools import setup

# One version, moco_fast.__version__ (what `moco-fast --version` prints), read here without importing
# the package (its dependencies may not be installed yet).
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "moco_fast/__init__.py").read_text(), re.M)[1]

setup(
    name="moco-fast",
    version=VERSION,
    description="Fast MoCo (Momentum Contrast) self-supervised pretraining: DALI/FFCV loaders, AMP, fused kernels",
    python_requires=">=3.10",
    # The repository keeps loaders/ and kernels/ at the top level (the product layout); they install
    # under the moco_fast namespace, never as bare `loaders`/`kernels`.
    packages=["moco_fast", "moco_fast.commands", "moco_fast.loaders", "moco_fast.kernels"],
    package_dir={
        "moco_fast": "moco_fast",
        "moco_fast.commands": "moco_fast/commands",
        "moco_fast.loaders": "loaders",
        "moco_fast.kernels": "kernels",
    },
    package_data={"moco_fast": ["demo_data/*/*/*.jpg", "demo_data/*.md"]},
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "numpy",
        "pillow",
        "tqdm",
        "tensorboard",
        "nvidia-ml-py",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130>=2.4"],
        "ffcv": ["ffcv", "numba", "opencv-python-headless"],
        "plot": ["matplotlib"],
        "dev": ["pytest", "ruff"],
    },
    entry_points={"console_scripts": ["moco-fast=moco_fast.cli:main"]},
)
