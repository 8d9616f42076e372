import re
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# One version, moco_fast.__version__ (what `moco-fast --version` prints), read here without importing
# the package (its dependencies may not be installed yet).
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "moco_fast/__init__.py").read_text(), re.M)[1]


class FreshBuildPy(build_py):
    """Empties build/lib before copying the package there: setuptools only adds to it, and a wheel takes
    all of it, so a module or demo image removed or renamed in this checkout was still in the next
    `pip install .` or wheel built from it (pypa/setuptools#1871). An editable install builds elsewhere."""

    def run(self):
        if not getattr(self, "editable_mode", False):
            shutil.rmtree(self.build_lib, ignore_errors=True)
        super().run()


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
        "dev": ["pytest", "pytest-xdist", "ruff"],
    },
    entry_points={"console_scripts": ["moco-fast=moco_fast.cli:main"]},
    cmdclass={"build_py": FreshBuildPy},
)
