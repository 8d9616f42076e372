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

import contextlib
import copy
import itertools
import logging
import shlex
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moco_fast import closed_stdout
from moco_fast.checkpoint import CHECKPOINT_NAME, file_stamp
from moco_fast.config import ConfigError, TrainConfig
from moco_fast.convert_dst import beton_samples
from moco_fast.data import DataError, DataSplits
from moco_fast.divergence import Diverged
from moco_fast.loaders.wds import is_wds_root, read_meta
from moco_fast.metrics import read_rows
from moco_fast.run_folder import CONFIG_NAME, SWEEP_RESULT, hold_sweep_folder, holds_run, refuse_unwritable_out
from moco_fast.signals import Terminated
from moco_fast.sweep_eval import evaluate_setting, refuse_others_files, setting_columns
from moco_fast.sweep_plan import GRID_KEYS, UNUSED, plan_setting, read_json, training_config
from moco_fast.sweep_table import TABLE_JSON, number_text, refuse_others_tables, write_json, write_table

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


# -- files ------------------------------------------------------------------------------------------
def _results_in(out: Path) -> dict[str, dict[str, Any]]:
    """Every setting folder's result in the sweep folder, by folder name; unreadable ones are left
    out with a warning (their setting counts as unfinished)."""

    if not out.is_dir():
        return {}
    found = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        res = read_json(folder / SWEEP_RESULT, dict)
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
    """Run, continue or reuse each setting; write the table of every result in `out`; return its rows.
    A setting whose run diverges is a row with its `error` (no result.json): the grid goes on. A diverged
    row stays in the table until a sweep tries its setting again (--redo drops this grid's)."""
    from moco_fast.launch import under_torchrun
    from moco_fast.loaders import check_loader
    from moco_fast.model import memory_bank_k
    from moco_fast.trainer import check_workers, resolve_device, say_if_on_the_cpu, validate

    if base.runtime.gpus > 1:
        raise ConfigError("moco-fast sweep runs each setting in this process: use --gpus 1")
    if under_torchrun():  # each setting would make and end a process group
        raise ConfigError(
            "moco-fast sweep runs each setting in this one process: start it without torchrun "
            "(to train a setting on several GPUs, run `moco-fast train` under torchrun with its flags)"
        )
    if not settings:
        raise ConfigError("the grid is empty")
    folders: dict[str, Setting] = {}
    for s in settings:
        other = folders.setdefault(s.name, s)
        if other != s:  # a guard: number_text keeps distinct values apart
            raise ConfigError(f"settings {other} and {s} would share the folder {out / s.name}")
    configs = [setting_config(base, s, out) for s in settings]
    errors: dict[str, str] = {}
    for cfg, s in zip(configs, settings):
        try:
            validate(cfg, 1)  # a bad setting fails now, not after hours of the others
        except ConfigError as e:
            errors[s.name] = str(e)
    if len(errors) == len(settings) and len(set(errors.values())) == 1:
        raise ConfigError(errors[settings[0].name])  # a flag after --, whatever the setting
    if errors:  # the first bad setting, in the grid's order
        name, why = next(iter(errors.items()))
        raise ConfigError(f"setting {name}: {why}")
    # train's checks, made in its first setting after the data was listed: the grid changes no loader
    # option, so each setting's loader reads these (their device: with the data's, below)
    check_workers(base.data.workers, None, check_loader(base.data.loader, base.data.loader_options))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: it must be the sweep folder")
    if holds_run(out) or (out / CONFIG_NAME).is_file():  # its files and the settings' folders would mix
        raise ConfigError(f"--out {out} holds a training run: give the sweep a folder of its own")
    refuse_others_tables(out)
    _refuse_out_within_data(out, base)
    refuse_unwritable_out(out)  # its table and the settings' folders go there
    with hold_sweep_folder(out):  # a second sweep there: one line, before any work
        found = {} if redo else _results_in(out)  # --redo: read once its folders are deleted
        # Every setting is checked against what its folder holds before the first one trains, and
        # before the data is listed (as any setting trains or none); --redo trains every one anew.
        evaluation = (lincls_epochs, lincls_lr)
        plans = [
            "train" if redo else plan_setting(cfg, s, found.get(s.name), evaluation)
            for cfg, s in zip(configs, settings)
        ]
        if lincls_epochs > 0 and not redo:  # --redo deletes the folders; a reused setting runs no classifier
            for cfg, plan in zip(configs, plans):
                if plan != "reuse":
                    refuse_others_files(Path(cfg.runtime.out))
        # a loader reads each image: a setting's training, or its linear classifier (one that is reused runs none)
        loads = any(plan in ("train", "resume") or (lincls_epochs > 0 and plan != "reuse") for plan in plans)
        listed, splits = _check_device_and_data(configs, lincls_epochs, loads)  # before --redo deletes anything
        if any(plan in ("train", "resume") for plan in plans):  # once, not in each setting's train()
            say_if_on_the_cpu(base.runtime.device, resolve_device(base.runtime.device))
        if redo:
            for s in settings:
                if (out / s.name).is_dir():
                    log.info("--redo: deleting %s", out / s.name)
                    shutil.rmtree(out / s.name)
            found = _results_in(out)  # other grids' settings, which the table keeps
        previous = read_json(out / TABLE_JSON, list) or []
        order = [r["name"] for r in previous if isinstance(r, dict) and isinstance(r.get("name"), str)]
        order += [s.name for s in settings]
        # diverged settings, a row each without a result (no result.json finds them): each keeps its row
        # until a sweep tries it again, this grid's below (a partial table, if this one stops before it);
        # --redo drops this grid's with the results it deleted, whose rows a partial table no longer has
        failed: dict[str, dict[str, Any]] = {
            r["name"]: r
            for r in previous
            if isinstance(r, dict) and r.get("error") is not None and r.get("name") in order
            if r["name"] not in found and not (redo and r["name"] in folders)
        }

        def unfinished(first: int) -> list[str]:
            """The settings from the `first` on that a sweep stopped there leaves to the next (all but
            those it reuses: finished earlier)."""
            return [x.name for x, plan in zip(settings[first:], plans[first:]) if plan != "reuse"]

        for i, (cfg, s, plan) in enumerate(zip(configs, settings, plans)):
            # stderr's reader gone where no training stopped on it (after a setting's last sync, in its
            # evaluation, before the first setting): the next setting started (its folder, its steps up
            # to its first sync) only to stop there. The sweep stops before it, as a stop signal stops
            # it (exit status 141), its table written with the settings it leaves (the line is lost)
            if plan != "reuse" and closed_stdout.stderr_lost():
                log.warning(
                    "sweep: stderr's reader went away; stopped before %s (not run: %s); the same sweep "
                    "command continues",
                    s.name,
                    ", ".join(unfinished(i)),
                )
                write_table(_rows({**found, **failed}, order), out, unfinished(i))
                raise Terminated(signal.SIGPIPE)
            done = False  # a stop in the table's write after the setting: the setting is finished
            try:
                head = f"[{i + 1}/{len(settings)}] {s.name}"
                error = _run_setting(cfg, s, plan, head, found, (listed, splits), evaluation)
                failed.pop(s.name, None)  # tried again: its result now, or its new error
                if error is not None:  # its columns as a finished row's: the K it ran with (no model to ask)
                    bank = _training_images(cfg, listed) if s.mechanism == "memory-bank" else None
                    k = None if bank is None else memory_bank_k(cfg.moco.k, bank)
                    failed[s.name] = {**setting_columns(cfg, s, k), "error": error}
                done = True
                write_table(_rows({**found, **failed}, order), out)  # a partial table survives an interruption
            except BaseException as e:
                from moco_fast.cli import interruption

                if interruption(e) is not None:
                    rest = unfinished(i + 1)
                    log.warning(
                        "sweep: stopped %s %s%s; the same sweep command continues (finished settings are reused)",
                        "after" if done else "in",
                        s.name,
                        f" (not run: {', '.join(rest)})" if rest else "",
                    )
                    with contextlib.suppress(Exception):  # the stop stands, and the table after the last setting
                        write_table(_rows({**found, **failed}, order), out, rest if done else unfinished(i))
                raise
        rows = _rows({**found, **failed}, order)
        write_table(rows, out)
        mixed = _mixed_settings([found[r["name"]] for r in rows if r["name"] in found])
        if mixed:
            log.warning("the table mixes runs whose settings differ beyond the grid: %s", "; ".join(mixed))
        return rows


def _run_setting(
    cfg: TrainConfig,
    s: Setting,
    plan: str,
    head: str,
    found: dict[str, dict],
    data: tuple[DataSplits | None, DataSplits | None],
    evaluation: tuple[int, float],
) -> str | None:
    """Trains (or continues) and evaluates one setting as `plan` says, on `data`, the sweep's listing
    (_check_device_and_data's): its training reads the first, its kNN the second; its result goes
    into `found`. A training that diverges (the paper's "fail" of a setting) returns its error, and
    the others still train; a linear classifier that diverges stops the sweep (--lincls-lr is wrong
    for every setting, the training was fine)."""
    listed, splits = data
    if plan == "reuse":
        log.info("%s: finished earlier with the same settings, reused", head)
        return None
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
        try:
            _train(cfg, listed)
        except Diverged as e:
            log.warning("%s: %s; the sweep goes on without it", s.name, e)
            return str(e)
    t0 = time.perf_counter()
    res = evaluate_setting(cfg, s, splits, *evaluation)
    # training (every epoch, from its rows, also those of an earlier interrupted part) + evaluation
    res["wall_s"] = _train_seconds(Path(cfg.runtime.out)) + time.perf_counter() - t0
    res["config"] = training_config(cfg)
    res["checkpoint_stamp"] = file_stamp(Path(cfg.runtime.out) / CHECKPOINT_NAME)  # what was evaluated
    write_json(Path(cfg.runtime.out) / SWEEP_RESULT, res)
    found[s.name] = res
    return None


def _train_seconds(folder: Path) -> float:
    """The training time of a setting: the sum of its epochs' times in metrics.jsonl."""

    total = 0.0
    for row in read_rows(folder):
        try:
            total += float(row.get("epoch_time_s", 0.0))
        except (ValueError, TypeError):
            continue
    return total


def _refuse_out_within_data(out: Path, base: TrainConfig) -> None:
    """ConfigError for a sweep folder within a folder whose images the settings train or are scored
    on (--data's train or eval split, or --data itself without splits): the table's sweep.png is an
    image, and the sweep's folder a class folder, of the next setting's data (it trained and was
    scored on other images than the one before it, with warnings of the folder's other files)."""
    from moco_fast.data import split_dirs

    if base.data.data is None or not Path(base.data.data).is_dir():  # the demo set, a .beton
        return
    where = out.resolve()
    for folder in split_dirs(Path(base.data.data)):
        if folder is not None and where.is_relative_to(folder.resolve()):
            raise ConfigError(
                f"--out {out} lies within {folder}, whose images the sweep reads: its files (sweep.png) would "
                "be read as training images; give a folder outside it"
            )


def _training_images(cfg: TrainConfig, listed: DataSplits | None) -> int | None:
    """The images a setting's training read, as its memory bank counts them (a diverged row's K,
    sweep_eval.k_columns): the image folder's listing, else a .beton's header (what FFCV's Reader
    counts, --loader ffcv), or a shard set's meta.json (--loader dali: the shards hold as many; where
    one was cut short they hold fewer, which the loader warned of and trained on, and the row shows
    meta.json's count); None for other data, or a count that cannot be read."""
    if listed is not None:
        return len(listed.train)
    if cfg.data.loader == "dali" and is_wds_root(cfg.data.data):
        try:  # one small file: the DALI loader's own count reads every shard's index
            return read_meta(cfg.data.data).num_images
        except DataError:
            return None
    data = Path(cfg.data.data) if cfg.data.loader == "ffcv" and cfg.data.data else None
    samples = beton_samples(data) if data is not None and data.is_file() else None  # a pipe's read would wait
    return samples if isinstance(samples, int) else None


def _check_device_and_data(
    configs: list[TrainConfig], lincls_epochs: int, loads: bool
) -> tuple[DataSplits | None, DataSplits | None]:
    """What `validate` does not see and would otherwise fail after the first setting trained (or
    after --redo deleted the old runs): the device, the training data, and an eval split for the
    linear classifier. Returns the image folder's listing (None: the data is not one), which every
    setting's training reads (trainer.train's `splits`), and it again where it holds an eval split
    (monitor.eval_splits; else None), which every setting's kNN reads. Listed once, header-checked
    with its eval split as a setting's loader takes it (loaders.base.listed_splits), not once more
    per setting (minutes each on ImageNet); its warnings (eval images that are copies of training
    images) are said once per sweep, and every setting is scored on the same images. Where no setting
    `loads` it (trains, or runs its linear classifier: each reused, or its checkpoint scored again by
    kNN alone) the headers are not checked, as a kNN alone lists it (monitor.eval_splits: its feature
    passes leave out what fails to decode), not every image opened (minutes on ImageNet) for no
    loader. With --lincls-epochs it is listed as the linear classifier lists it (headers checked where
    one runs, class folders as labels: two that are one folder are an error,
    lincls.load_splits_with_eval), and every setting's classifier reads it too."""
    from moco_fast.data import load_splits
    from moco_fast.knn import warn_if_single_class
    from moco_fast.monitor import NO_EVAL_IMAGES, eval_splits, knn_data, reads_image_folder
    from moco_fast.trainer import resolve_device, validate_device

    cfg = configs[0]  # the grid changes K, m, mechanism and shuffle BN only
    validate_device(cfg, resolve_device(cfg.runtime.device), 1)
    # DataError: missing, empty, ...
    listed = load_splits(cfg.data.data, loads, labelled=lincls_epochs > 0) if reads_image_folder(cfg) else None
    splits, _ = eval_splits(cfg, listed)
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
    else:  # a table of losses alone, which a grid compared by its kNN does not expect
        data, what = knn_data(cfg)
        log.warning(
            "no kNN in the table: %s; it shows each setting's loss and pretext accuracy. For a setting's "
            "figure run `moco-fast knn --checkpoint %s --data %s`%s",
            NO_EVAL_IMAGES,
            shlex.quote(str(Path(cfg.runtime.out).parent)) + "/SETTING/" + CHECKPOINT_NAME,
            data,
            what,
        )
    return listed, splits


def _train(cfg: TrainConfig, listed: DataSplits | None) -> None:
    """Train (or continue) one setting on `listed`, the sweep's listing of the data (trainer.train's
    `splits`). kNN and the linear classifier run on the checkpoint after."""
    from moco_fast.checkpoint import CHECKPOINT_NAME
    from moco_fast.trainer import nothing_to_train, train

    cfg = copy.deepcopy(cfg)
    cfg.runtime.final_knn = False
    cfg.runtime.knn_baseline = False
    cfg.runtime.resume = "auto" if (Path(cfg.runtime.out) / CHECKPOINT_NAME).is_file() else None
    trained = train(cfg, splits=listed, command="sweep")  # a train refused by the setting's folder names the sweep
    if not trained:  # a run stopped after its training, before its evaluation
        log.info("%s; nothing to train", nothing_to_train(cfg))


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


# what a row's linear top-1 was measured with (run_sweep's evaluation flags)
LINEAR_KEYS = ("lincls_epochs", "lincls_lr")


def _mixed_settings(results: list[dict[str, Any]]) -> list[str]:
    """The fields, other than the grid's, whose values differ between the table's runs: of their
    training config, and of the linear classifier behind the linear column's figures (the sweep's
    --lincls-epochs and --lincls-lr, which no config holds: another grid's figure in the folder may
    come from another lr). A result of an older moco-fast records neither: its classifier is unknown
    (the line named it None) and left out, as a result without a config is left out of the rest."""
    values: dict[str, list[Any]] = {}
    for res in results:
        for k in LINEAR_KEYS if res.get("linear_top1") is not None else ():
            seen = values.setdefault(k, [])
            if k in res and res[k] not in seen:
                seen.append(res[k])
        config = res.get("config")
        if not isinstance(config, dict):
            continue
        skip = GRID_KEYS | UNUSED.get(str(res.get("mechanism")), frozenset())
        for k, v in config.items():
            seen = values.setdefault(k, [])
            if k not in skip and v not in seen:
                seen.append(v)
    return [f"{k} ({', '.join(repr(v) for v in vs)})" for k, vs in values.items() if len(vs) > 1]
