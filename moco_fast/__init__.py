"""moco-fast: fast MoCo self-supervised pretraining."""

__version__ = "0.1.0"
