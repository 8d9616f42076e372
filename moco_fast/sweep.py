"""The paper's ablations at an affordable scale: a grid over K, m, mechanism and shuffle BN.

Each setting trains in-process with `trainer.train` into its own folder under the sweep's `out`,
then gets a kNN accuracy on the backbone (and on the head's output) and, optionally, a linear
classifier on cached features. A finished setting leaves `result.json` and is skipped when the
sweep runs again; an interrupted one continues from its checkpoint. The table is written as
markdown, JSON and (with matplotlib) a PNG.

Settings that would repeat one run are merged: end-to-end has no K (its negatives are the batch)
and no momentum; the memory bank has no key encoder, so no m.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moco_fast.config import ConfigError, TrainConfig
from moco_fast.loaders import IMAGE_FOLDER_LOADERS

log = logging.getLogger("moco_fast")

RESULT_NAME = "result.json"


@dataclass(frozen=True)
class Setting:
    mechanism: str
    k: int | None  # None: end-to-end (K is the batch)
    m: float | None  # None: no key encoder (end-to-end, memory bank)
    shuffle_bn: bool

    @property
    def name(self) -> str:
        parts = [self.mechanism, "Kbatch" if self.k is None else f"K{self.k}"]
        if self.m is not None:
            parts.append(f"m{self.m:g}")
        parts.append("sbn-on" if self.shuffle_bn else "sbn-off")
        return "_".join(parts)


def expand(ks: list[int], ms: list[float], mechanisms: list[str], shuffle_bns: list[bool]) -> list[Setting]:
    """The grid in a stable order, without settings that would repeat one run."""
    out: list[Setting] = []
    for mech, k, m, sbn in itertools.product(mechanisms, ks, ms, shuffle_bns):
        s = Setting(mech, None if mech == "end-to-end" else k, m if mech == "moco" else None, sbn)
        if s not in out:
            out.append(s)
    return out


def setting_config(base: TrainConfig, s: Setting, root: Path) -> TrainConfig:
    cfg = copy.deepcopy(base)
    cfg.moco.mechanism = s.mechanism
    if s.k is not None:
        cfg.moco.k = s.k
    if s.m is not None:
        cfg.moco.m = s.m
    cfg.moco.shuffle_bn = s.shuffle_bn
    cfg.runtime.out = str(root / s.name)
    cfg.runtime.final_knn = True
    return cfg


def _finished(folder: Path, epochs: int) -> dict[str, Any] | None:
    p = folder / RESULT_NAME
    if not p.is_file():
        return None
    res = json.loads(p.read_text())
    return res if res.get("epochs") == epochs else None


def run_setting(cfg: TrainConfig, s: Setting, lincls_epochs: int) -> dict[str, Any]:
    from moco_fast.checkpoint import CHECKPOINT_NAME
    from moco_fast.trainer import train

    folder = Path(cfg.runtime.out)
    cfg.runtime.resume = "auto" if (folder / CHECKPOINT_NAME).is_file() else None
    t0 = time.perf_counter()
    row = train(cfg)
    # When the checkpoint had already finished every epoch (a crash after training), train() returns
    # only the final kNN figures: the loss and pretext accuracy come from the last metrics row.
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    row = {**last, **row}
    res: dict[str, Any] = {
        "name": s.name,
        "mechanism": s.mechanism,
        "k": s.k if s.k is not None else cfg.optim.batch_size,
        "m": s.m,
        "shuffle_bn": s.shuffle_bn,
        "epochs": cfg.optim.epochs,
        "loss": row.get("loss"),
        "pretext_acc": row.get("pretext_acc"),
        "knn_top1": row.get("final_knn_top1"),
        "random_knn_top1": row.get("random_knn_top1"),  # with --knn-baseline
        "img_per_s": row.get("img_per_s"),
    }
    res.update(_head_knn(cfg, folder / CHECKPOINT_NAME))
    if lincls_epochs > 0:
        res["linear_top1"] = _linear(cfg, folder, lincls_epochs)
    res["wall_s"] = time.perf_counter() - t0
    return res


def _head_knn(cfg: TrainConfig, checkpoint: Path) -> dict[str, Any]:
    """kNN on the head's 128-d output (the figure the official CIFAR demo reports)."""
    if cfg.data.loader not in IMAGE_FOLDER_LOADERS:
        return {}
    from moco_fast.checkpoint import load_model
    from moco_fast.data import load_splits
    from moco_fast.knn import knn_accuracy
    from moco_fast.trainer import eval_workers, resolve_device

    splits = load_splits(cfg.data.data, check=False)
    if splits.eval is None:
        return {}
    device = resolve_device(cfg.runtime.device)
    model, _ = load_model(checkpoint, device)
    acc = knn_accuracy(
        model.encoder_q,
        splits.train,
        splits.eval,
        cfg.data.aug,
        device,
        cfg.runtime.knn_k,
        cfg.runtime.knn_t,
        workers=eval_workers(cfg.data.workers, device),
    )
    return {"knn_head_top1": acc}


def _linear(cfg: TrainConfig, folder: Path, epochs: int) -> float | None:
    from moco_fast.lincls import LinclsConfig, run_lincls
    from moco_fast.trainer import eval_workers, resolve_device

    steps = ",".join(str(max(1, round(epochs * f))) for f in (0.6, 0.8))
    res = run_lincls(
        LinclsConfig(
            checkpoint=str(folder / "checkpoint.pt"),
            data=cfg.data.data,
            epochs=epochs,
            schedule=steps,
            cached_features=True,
            workers=eval_workers(cfg.data.workers, resolve_device(cfg.runtime.device)),
            device=cfg.runtime.device,
            seed=cfg.runtime.seed,
            out=str(folder / "lincls.json"),
        )
    )
    return res["top1"]


def run_sweep(base: TrainConfig, settings: list[Setting], out: Path, lincls_epochs: int = 0) -> list[dict[str, Any]]:
    """Run (or skip, when finished) each setting; write the table; return one row per setting."""
    from moco_fast.trainer import validate

    if base.runtime.gpus > 1:
        raise ConfigError("moco-fast sweep runs each setting in this process: use --gpus 1")
    if not settings:
        raise ConfigError("the grid is empty")
    configs = [setting_config(base, s, out) for s in settings]
    for cfg, s in zip(configs, settings):
        try:
            validate(cfg, 1)  # a bad setting fails now, not after hours of the others
        except ConfigError as e:
            raise ConfigError(f"setting {s.name}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, (cfg, s) in enumerate(zip(configs, settings)):
        done = _finished(Path(cfg.runtime.out), cfg.optim.epochs)
        if done is not None:
            log.info("[%d/%d] %s: finished earlier, skipped", i + 1, len(settings), s.name)
            results.append(done)
            continue
        log.info("[%d/%d] %s", i + 1, len(settings), s.name)
        res = run_setting(cfg, s, lincls_epochs)
        (Path(cfg.runtime.out) / RESULT_NAME).write_text(json.dumps(res, indent=2))
        results.append(res)
        write_table(results, out)  # a partial table survives an interruption
    write_table(results, out)
    return results


COLUMNS = [
    ("mechanism", "mechanism", "{}"),
    ("k", "K", "{}"),
    ("m", "m", "{:g}"),
    ("shuffle_bn", "shuffle BN", "{}"),
    ("epochs", "epochs", "{}"),
    ("loss", "final loss", "{:.3f}"),
    ("pretext_acc", "pretext acc %", "{:.1f}"),
    ("knn_top1", "kNN top-1 % (backbone)", "{:.2f}"),
    ("knn_head_top1", "kNN top-1 % (head)", "{:.2f}"),
    ("random_knn_top1", "kNN % random init", "{:.2f}"),
    ("linear_top1", "linear top-1 %", "{:.2f}"),
    ("wall_s", "time s", "{:.0f}"),
]


def markdown_table(results: list[dict[str, Any]]) -> str:
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in results)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            if isinstance(v, bool):
                v = "on" if v else "off"
            cells.append("-" if v is None else fmt.format(v) if not isinstance(v, str) else v)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(results: list[dict[str, Any]], out: Path) -> None:
    (out / "sweep.md").write_text(markdown_table(results))
    (out / "sweep.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "sweep.png")


def plot(results: list[dict[str, Any]], path: Path) -> bool:
    """A bar chart of kNN (and linear) accuracy and pretext accuracy per setting; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    names = [r["name"] for r in results]
    x = range(len(results))
    series = [
        (k, label)
        for k, label in (("knn_top1", "kNN (backbone)"), ("knn_head_top1", "kNN (head)"), ("linear_top1", "linear"))
        if any(r.get(k) is not None for r in results)
    ]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 1.2 * len(results) + 2), 7), sharex=True)
    width = 0.8 / max(len(series), 1)
    for j, (key, label) in enumerate(series):
        offset = (j - (len(series) - 1) / 2) * width  # the group stays centred on its tick
        ax1.bar([i + offset for i in x], [r.get(key) or 0 for r in results], width, label=label)
    ax1.set_ylabel("top-1 %")
    ax1.set_title("downstream accuracy per setting")
    if series:
        ax1.legend()
    ax2.bar(list(x), [r.get("pretext_acc") or 0 for r in results], 0.6, color="gray")
    ax2.set_ylabel("pretext acc % (last epoch)")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
