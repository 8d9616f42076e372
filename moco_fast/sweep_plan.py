"""What a sweep does with each setting's folder: reuse its result, evaluate its finished checkpoint
again, resume its interrupted run, or train it; and when the folder holds a run trained otherwise, a
ConfigError before anything trains (moco_fast.sweep's rules: the full resolved training
configuration must match, the evaluation settings may differ)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moco_fast.config import ConfigError, TrainConfig, plain
from moco_fast.run_folder import CONFIG_NAME, holds_run

if TYPE_CHECKING:
    from moco_fast.sweep import Setting

log = logging.getLogger("moco_fast")

# Fields of the resolved TrainConfig that do not change what a run learns or how it is evaluated.
RUNTIME_ONLY = frozenset(
    {
        "preset",  # a source of values; the values themselves are compared
        "data.workers",
        "data.loader_module",  # a record of the module that registered data.loader (train() writes it)
        "runtime.out",
        "runtime.resume",
        "runtime.force",
        "runtime.device",
        "runtime.log_every",
        "runtime.save_every",  # when checkpoints are written, not what is trained
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


def read_json(path: Path, kind: type) -> Any:
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


def plan_setting(cfg: TrainConfig, s: Setting, res: dict[str, Any] | None, evaluation: tuple[int, float]) -> str:
    """What a setting needs: "reuse" its result, "evaluate" its finished checkpoint again, "resume"
    its interrupted run, or "train" from scratch. A ConfigError when its folder holds a run
    trained with other settings."""
    from moco_fast import checkpoint as ckpt
    from moco_fast.data import DataError

    folder = Path(cfg.runtime.out)
    want = training_config(cfg)
    checkpoint = folder / ckpt.CHECKPOINT_NAME
    if (
        res is not None
        and checkpoint.is_file()
        and res.get("checkpoint_stamp") not in (None, ckpt.file_stamp(checkpoint))
    ):
        # trained further since it was evaluated (`train --resume` in the setting's folder): the
        # result describes an older checkpoint; the checkpoint's own config decides below
        log.info("%s: its checkpoint changed since its result was written", folder)
        res = None
    if res is not None:
        old = res.get("config")
        if not isinstance(old, dict):  # written by an older moco-fast: the run's own config.json
            saved = read_json(folder / CONFIG_NAME, dict)
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
