"""The paper's ablations at an affordable scale: a grid over K, m, mechanism and shuffle BN.

Each setting trains in-process with `trainer.train` into its own folder under the sweep's `out`,
then its checkpoint is evaluated: kNN on the backbone and on the head's output (and of a random
init with --knn-baseline) and, optionally, a linear classifier on cached features. The table of
every result in the sweep folder is written as markdown, JSON and (with matplotlib) a PNG, so
several grids can share one folder.

A setting's earlier result is reused only when the full resolved training configuration it was
trained with (`training_config`: everything but the purely runtime fields in RUNTIME_ONLY) equals
the one asked for; other kNN or linear-classifier settings evaluate the finished checkpoint again.
A finished or interrupted run trained otherwise is never continued or overwritten silently: the
sweep stops before anything trains, and `--redo` (or another --out) is the way on.

Settings that would repeat one run are merged: end-to-end has no K (its negatives are the batch)
and no momentum; the memory bank has no key encoder, so no m.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moco_fast.checkpoint import CHECKPOINT_NAME
from moco_fast.config import ConfigError, TrainConfig, plain
from moco_fast.metrics import read_rows
from moco_fast.run_folder import CONFIG_NAME, SWEEP_RESULT, holds_run
from moco_fast.sweep_eval import evaluate_setting
from moco_fast.sweep_table import number_text, write_json, write_table

log = logging.getLogger("moco_fast")


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
            parts.append(f"m{number_text(self.m)}")
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


# Fields of the resolved TrainConfig that do not change what a run learns or how it is evaluated.
RUNTIME_ONLY = frozenset(
    {
        "preset",  # a source of values; the values themselves are compared
        "data.workers",
        "runtime.out",
        "runtime.resume",
        "runtime.force",
        "runtime.device",
        "runtime.log_every",
        "runtime.gpus",
        "runtime.sync_bn",  # no effect with one process, the only kind a sweep runs
        "moco.shuffle_exchange",  # with one process, no exchange at all
        "runtime.channels_last",
        "runtime.compile",
        "runtime.cuda_graph",
        "runtime.knn_every",
        "runtime.final_knn",  # always on in a sweep
    }
)
# How a finished checkpoint is evaluated: a change evaluates it again, it does not train again.
EVAL_KEYS = ("runtime.knn_k", "runtime.knn_t", "runtime.knn_baseline")
# Fields a mechanism does not read: a finished run is reused whatever they were.
UNUSED = {
    "moco": frozenset({"moco.bank_m"}),
    "memory-bank": frozenset({"moco.m", "moco.symmetric"}),
    "end-to-end": frozenset({"moco.k", "moco.m", "moco.symmetric", "moco.bank_m"}),
}
GRID_KEYS = frozenset({"moco.mechanism", "moco.k", "moco.m", "moco.shuffle_bn"})


# -- what makes two runs the same -----------------------------------------------------------------
def _comparable(nested: dict[str, Any]) -> dict[str, Any]:
    """A config dict (`to_dict`, config.json, a checkpoint's) as {"section.field": value}, without
    RUNTIME_ONLY and with the data path made absolute."""
    flat: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            key = prefix + str(k)
            if isinstance(v, dict) and key != "data.loader_options":
                walk(v, key + ".")
            elif key not in RUNTIME_ONLY:
                flat[key] = plain(v)

    walk(nested, "")
    data = flat.get("data.data")
    if isinstance(data, str) and "://" not in data:
        flat["data.data"] = os.path.abspath(os.path.expanduser(data))
    return flat


def training_config(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved configuration a setting's result stands for (stored in its result.json)."""
    from moco_fast.config import to_dict

    return _comparable(to_dict(cfg))


def _defaults() -> dict[str, Any]:
    """Each field's default: the value a config saved before that field existed was trained with."""
    from moco_fast.config import TrainConfig, to_dict

    return _comparable(to_dict(TrainConfig()))


def _differences(old: dict[str, Any], new: dict[str, Any], ignore: frozenset[str] | set[str]) -> list[str]:
    defaults = _defaults()
    return [
        f"{k} {old.get(k, defaults.get(k))!r} -> {v!r}"
        for k, v in new.items()
        if k not in ignore and old.get(k, defaults.get(k)) != v
    ]


def _evaluation(config: dict[str, Any], lincls_epochs: int | None, lincls_lr: float | None) -> dict[str, Any]:
    defaults = _defaults()
    ev: dict[str, Any] = {k: config.get(k, defaults.get(k)) for k in EVAL_KEYS}
    ev["lincls_epochs"] = lincls_epochs
    ev["lincls_lr"] = lincls_lr if lincls_epochs else None
    return ev


def _conflict(folder: Path, what: str, diffs: list[str]) -> ConfigError:
    listed = ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    return ConfigError(
        f"{folder} holds {what} trained with other settings ({listed}): pass --redo to delete it and "
        "train again, or choose another --out"
    )


# -- files ------------------------------------------------------------------------------------------
def _read_json(path: Path, kind: type) -> Any:
    """The JSON in `path` when it is a `kind`; None when missing; None and a warning when unreadable
    (a file cut short by a crash of an older version, say)."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("ignoring %s: it cannot be read (%s)", path, e)
        return None
    if not isinstance(value, kind):
        log.warning("ignoring %s: it holds a %s, not a %s", path, type(value).__name__, kind.__name__)
        return None
    return value


def _results_in(out: Path) -> dict[str, dict[str, Any]]:
    """Every setting folder's result in the sweep folder, by folder name; unreadable ones are left
    out with a warning (their setting counts as unfinished)."""

    if not out.is_dir():
        return {}
    found = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        res = _read_json(folder / SWEEP_RESULT, dict)
        if res is not None and not isinstance(res.get("mechanism"), str):
            log.warning("ignoring %s: it is not a sweep result", folder / SWEEP_RESULT)
        elif res is not None:
            found[folder.name] = res
    return found


# -- the sweep ------------------------------------------------------------------------------------
def run_sweep(
    base: TrainConfig,
    settings: list[Setting],
    out: Path,
    *,
    lincls_epochs: int = 0,
    lincls_lr: float = 30.0,
    redo: bool = False,
) -> list[dict[str, Any]]:
    """Run, continue or reuse each setting; write the table of every result in `out`; return its rows."""
    from moco_fast.trainer import validate

    if base.runtime.gpus > 1:
        raise ConfigError("moco-fast sweep runs each setting in this process: use --gpus 1")
    if not settings:
        raise ConfigError("the grid is empty")
    folders: dict[str, Setting] = {}
    for s in settings:
        other = folders.setdefault(s.name, s)
        if other != s:  # a guard: number_text keeps distinct values apart
            raise ConfigError(f"settings {other} and {s} would share the folder {out / s.name}")
    configs = [setting_config(base, s, out) for s in settings]
    for cfg, s in zip(configs, settings):
        try:
            validate(cfg, 1)  # a bad setting fails now, not after hours of the others
        except ConfigError as e:
            raise ConfigError(f"setting {s.name}: {e}") from None
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: it must be the sweep folder")
    _check_device_and_data(configs, lincls_epochs)  # before --redo deletes anything
    if redo:
        for s in settings:
            if (out / s.name).is_dir():
                log.info("--redo: deleting %s", out / s.name)
                shutil.rmtree(out / s.name)
    previous = _read_json(out / "sweep.json", list) or []
    order = [r["name"] for r in previous if isinstance(r, dict) and isinstance(r.get("name"), str)]
    order += [s.name for s in settings]
    found = _results_in(out)
    # Every setting is checked against what its folder holds before the first one trains.
    evaluation = (lincls_epochs, lincls_lr)
    plans = [_plan(cfg, s, found.get(s.name), evaluation) for cfg, s in zip(configs, settings)]
    out.mkdir(parents=True, exist_ok=True)
    for i, (cfg, s, plan) in enumerate(zip(configs, settings, plans)):
        head = f"[{i + 1}/{len(settings)}] {s.name}"
        if plan == "reuse":
            log.info("%s: finished earlier with the same settings, reused", head)
            continue
        log.info(
            "%s%s",
            head,
            {
                "train": "",
                "resume": ": continues from its checkpoint",
                "evaluate": ": trained earlier with the same settings; evaluating its checkpoint again",
            }[plan],
        )
        if plan in ("train", "resume"):
            _train(cfg)
        t0 = time.perf_counter()
        res = evaluate_setting(cfg, s, lincls_epochs, lincls_lr)
        # training (every epoch, from its rows, also those of an earlier interrupted part) + evaluation
        res["wall_s"] = _train_seconds(Path(cfg.runtime.out)) + time.perf_counter() - t0
        res["config"] = training_config(cfg)
        res["checkpoint_stamp"] = _stamp(Path(cfg.runtime.out) / CHECKPOINT_NAME)  # what was evaluated
        write_json(Path(cfg.runtime.out) / SWEEP_RESULT, res)
        found[s.name] = res
        write_table(_rows(found, order), out)  # a partial table survives an interruption
    rows = _rows(found, order)
    write_table(rows, out)
    mixed = _mixed_settings([found[r["name"]] for r in rows if r["name"] in found])
    if mixed:
        log.warning("the table mixes runs whose settings differ beyond the grid: %s", "; ".join(mixed))
    return rows


def _plan(cfg: TrainConfig, s: Setting, res: dict[str, Any] | None, evaluation: tuple[int, float]) -> str:
    """What a setting needs: "reuse" its result, "evaluate" its finished checkpoint again, "resume"
    its interrupted run, or "train" from scratch. A ConfigError when its folder holds a run
    trained with other settings."""
    from moco_fast import checkpoint as ckpt
    from moco_fast.data import DataError

    folder = Path(cfg.runtime.out)
    want = training_config(cfg)
    checkpoint = folder / ckpt.CHECKPOINT_NAME
    if res is not None and checkpoint.is_file() and res.get("checkpoint_stamp") not in (None, _stamp(checkpoint)):
        # trained further since it was evaluated (`train --resume` in the setting's folder): the
        # result describes an older checkpoint; the checkpoint's own config decides below
        log.info("%s: its checkpoint changed since its result was written", folder)
        res = None
    if res is not None:
        old = res.get("config")
        if not isinstance(old, dict):  # written by an older moco-fast: the run's own config.json
            saved = _read_json(folder / CONFIG_NAME, dict)
            if saved is None:
                raise ConfigError(
                    f"{folder} holds a finished run without a record of its settings (config.json): pass "
                    "--redo to delete it and train again, or choose another --out"
                )
            old = _comparable(saved)
        diffs = _differences(old, want, UNUSED.get(s.mechanism, frozenset()) | set(EVAL_KEYS))
        if diffs:
            raise _conflict(folder, "a finished run", diffs)
        if "config" in res and _evaluation(old, res.get("lincls_epochs"), res.get("lincls_lr")) == _evaluation(
            want, *evaluation
        ):
            return "reuse"
        if not checkpoint.is_file():
            if "config" not in res:
                return "reuse"  # an older result whose checkpoint is gone: shown as it was
            raise ConfigError(
                f"{folder}: its checkpoint is gone, so it cannot be evaluated with other kNN or linear "
                "classifier settings: use the earlier ones, --redo to train it again, or another --out"
            )
        return "evaluate"
    if checkpoint.is_file():
        try:
            saved = ckpt.load(checkpoint)
        except DataError as e:
            raise DataError(f"{e}: pass --redo to delete it and train again, or choose another --out") from None
        if not isinstance(saved.get("config"), dict):
            raise DataError(f"{checkpoint} is not a moco-fast training checkpoint: pass --redo or another --out")
        diffs = _differences(_comparable(saved["config"]), want, frozenset(EVAL_KEYS))
        if diffs:
            raise _conflict(folder, "a run", diffs)
        return "resume"  # an interrupted run continues; a finished one trains no more and is evaluated
    if holds_run(folder):
        raise ConfigError(
            f"{folder} holds the logs of a run without its checkpoint (it stopped before its first one?): "
            "pass --redo to delete it and train again, or choose another --out"
        )
    return "train"


def _stamp(path: Path) -> list[int] | None:
    """(mtime in ns, size) of a checkpoint: a result records the one it evaluated."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def _train_seconds(folder: Path) -> float:
    """The training time of a setting: the sum of its epochs' times in metrics.jsonl."""

    total = 0.0
    for row in read_rows(folder):
        try:
            total += float(row.get("epoch_time_s", 0.0))
        except (ValueError, TypeError):
            continue
    return total


def _check_device_and_data(configs: list[TrainConfig], lincls_epochs: int) -> None:
    """What `validate` does not see and would otherwise fail after the first setting trained (or
    after --redo deleted the old runs): the device, the training data, and an eval split for the
    linear classifier."""
    from moco_fast.knn import warn_if_single_class
    from moco_fast.monitor import eval_splits
    from moco_fast.trainer import resolve_device, validate_device

    cfg = configs[0]  # the grid changes K, m, mechanism and shuffle BN only
    validate_device(cfg, resolve_device(cfg.runtime.device), 1)
    splits, _ = eval_splits(cfg)  # DataError when the folder is missing or empty
    if lincls_epochs > 0 and splits is None:
        raise ConfigError(
            "--lincls-epochs needs an image folder with train/ and val/ or test/ (the linear classifier's "
            f"data); --loader {cfg.data.loader} with --data {cfg.data.data} has none"
        )
    if splits is not None:
        if lincls_epochs > 0 and len(splits.train.classes) == 1:
            raise ConfigError(
                f"--lincls-epochs: {splits.train.root} holds a single class ({splits.train.classes[0]}), "
                "where a linear classifier scores 100% whatever the backbone"
            )
        warn_if_single_class(splits.train)


def _train(cfg: TrainConfig) -> None:
    """Train (or continue) one setting. kNN and the linear classifier run on the checkpoint after."""
    from moco_fast.checkpoint import CHECKPOINT_NAME
    from moco_fast.trainer import train

    cfg = copy.deepcopy(cfg)
    cfg.runtime.final_knn = False
    cfg.runtime.knn_baseline = False
    cfg.runtime.resume = "auto" if (Path(cfg.runtime.out) / CHECKPOINT_NAME).is_file() else None
    train(cfg)


# -- the table ------------------------------------------------------------------------------------
def _rows(found: dict[str, dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """One row per result in the sweep folder: first in the order of the last table, then this
    grid's, then any others by name; without the stored configs."""
    rows = []
    for name in dict.fromkeys([*order, *sorted(found)]):
        if name in found:
            row = {k: v for k, v in found[name].items() if k != "config"}
            row["name"] = name
            rows.append(row)
    return rows


def _mixed_settings(results: list[dict[str, Any]]) -> list[str]:
    """The fields, other than the grid's, whose values differ between the table's runs."""
    values: dict[str, list[Any]] = {}
    for res in results:
        config = res.get("config")
        if not isinstance(config, dict):
            continue
        skip = GRID_KEYS | UNUSED.get(str(res.get("mechanism")), frozenset())
        for k, v in config.items():
            seen = values.setdefault(k, [])
            if k not in skip and v not in seen:
                seen.append(v)
    return [f"{k} ({', '.join(repr(v) for v in vs)})" for k, vs in values.items() if len(vs) > 1]
