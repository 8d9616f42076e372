"""What the distributed test files share (not a test module: pytest does not collect it): the
`moco-fast train` command lines of a tiny run on images and of a synthetic one, and torchrun's (its
command, the environment it sets)."""

from __future__ import annotations

import sys


def cli_args(root, out, epochs: int, batch: int = 8) -> list[str]:
    return [
        "train", "--data", str(root), "--device", "cpu", "--preset", "cifar", "--arch", "resnet18",
        "--stem", "imagenet", "--moco-k", "32", "--bn-splits", "2", "--batch-size", str(batch),
        "--epochs", str(epochs), "--workers", "0", "--out", str(out),
    ]  # fmt: skip


def synthetic_args(out, *extra: str) -> list[str]:
    return [
        "train", "--loader", "synthetic", "--synthetic-steps", "2", "--device", "cpu", "--arch", "resnet18",
        "--image-size", "16", "--dim", "16", "--batch-size", "8", "--moco-k", "32", "--epochs", "1",
        "--workers", "0", "--no-final-knn", "--out", str(out), *extra,
    ]  # fmt: skip


# trained in one process, synthetic_args with --bn-splits 2 splits each batch of 8 in two (bn_batch's warning)
FEW_SPLIT_IMAGES = (
    "--batch-size 8 split by --bn-splits 2 gives each BN sub-batch 4 images: their statistics are noisy and MoCo "
    "may not learn (docs/experiments.md): raise --batch-size or lower --bn-splits"
)


def torchrun_env(monkeypatch, **env: str) -> None:
    """Sets `env` (RANK, WORLD_SIZE) and what torchrun sets besides, which the run checks before it
    joins (join.check_group_env): MASTER_ADDR and MASTER_PORT."""
    for name, value in {"MASTER_ADDR": "localhost", "MASTER_PORT": "29500", **env}.items():
        monkeypatch.setenv(name, value)


def torchrun(tmp_path, *flags: str) -> list[str]:
    """torchrun for 2 local processes, its log folder in tmp_path: by default a torchelastic_* folder
    in /tmp, left there."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "--log-dir", str(tmp_path / "torchrun"), *flags,
    ]  # fmt: skip
