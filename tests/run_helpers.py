"""What the run-folder test files share (not a test module: pytest does not collect it): the
tiny `moco-fast train` command line and the rows of a run's metrics.jsonl."""

import json


def tiny_args(data, out, epochs=1):
    return [
        "train", "--data", str(data), "--preset", "cifar", "--arch", "resnet18", "--stem", "imagenet",
        "--epochs", str(epochs), "--batch-size", "8", "--moco-k", "16", "--bn-splits", "2",
        "--device", "cpu", "--workers", "0", "--out", str(out), "--no-final-knn",
    ]  # fmt: skip


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
