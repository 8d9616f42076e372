"""A run folder (`train --out`): what it holds, whether a new run may write there, and the lock
that keeps a second `train` out while one runs (and a second lincls or finetune out of its result),
on the flocks of folder_locks.

A folder holds the run's checkpoint, metrics.jsonl (a row per epoch), summary.json (the final
evaluation), config.json, TensorBoard logs in tb/, and what the evaluation commands and the sweep
write beside the checkpoint (RUN_RESULTS).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from moco_fast import checkpoint as ckpt
from moco_fast.config import ConfigError, TrainConfig, read_json_object
from moco_fast.data import DataError
from moco_fast.folder_locks import FolderHold, RunFolderBusy, folder_holder, handed, hold_folder, hold_lock_file
from moco_fast.metrics import METRICS_NAME, SUMMARY_NAME, owes_row, read_rows
from moco_fast.sweep_table import TABLE_JSON

log = logging.getLogger("moco_fast")

CONFIG_NAME = "config.json"  # the resolved TrainConfig of the run

# What the evaluation commands and the sweep write beside a run's checkpoint, each named once.
LINCLS_RESULT = "lincls.json"  # `moco-fast lincls`
SWEEP_RESULT = "result.json"  # the sweep's row for the run
SWEEP_LINCLS_RESULT = "sweep_lincls.json"  # the sweep's short linear classifier on cached features
FINETUNE_RESULTS = {"moco": "finetune.json", "scratch": "finetune_scratch.json"}  # by initialisation


def state_name(result: str) -> str:
    """The file where lincls or finetune keeps its state between epochs, beside its `result`
    (moco_fast.classifier_epochs): lincls.json -> lincls.state.pt."""
    return Path(result).stem + ".state.pt"


def result_beside(checkpoint: str | Path, name: str) -> Path:
    """Where an evaluation of `checkpoint` writes its result `name` by default: beside it, as `name`
    for a run's checkpoint.pt; for a file of another name (an official MoCo checkpoint, torchvision
    weights: several may share a download folder) after that name without its suffix:
    moco_v2_800ep_pretrain.pth.tar -> moco_v2_800ep_pretrain.lincls.json."""
    p = Path(checkpoint)
    if p.name == ckpt.CHECKPOINT_NAME:
        return p.parent / name
    base = p.name.removesuffix(".tar")
    if Path(base).suffix in (".pth", ".pt", ".ckpt", ".bin"):
        base = Path(base).stem
    return p.parent / f"{base}.{name}"


RUN_RESULTS = (
    LINCLS_RESULT,
    SWEEP_RESULT,
    SWEEP_LINCLS_RESULT,
    *FINETUNE_RESULTS.values(),
    *(Path(name).with_suffix(".pt").name for name in FINETUNE_RESULTS.values()),  # --save-model's default
    *(state_name(name) for name in (LINCLS_RESULT, SWEEP_LINCLS_RESULT, *FINETUNE_RESULTS.values())),
)


def run_file(p: Path) -> str | None:
    """check_output's `replaces` for an output that is no part of a run (an export): a file a run or
    its evaluations keep under its own name (checkpoint.pt, config.json, metrics.jsonl, summary.json,
    lincls.json, a state...) or a sweep's sweep.json is never replaced, not even with --force."""
    if p.name in (ckpt.CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, *RUN_RESULTS):
        return f"is a training run's {p.name}"
    if p.name == TABLE_JSON:  # the sweep's order of rows and a mark no run trains into its folder
        return f"is a sweep's table ({TABLE_JSON})"
    return None


def check_output(cfg: TrainConfig, say: bool = True) -> Path | None:
    """The checkpoint to resume from (None: a fresh run), or a ConfigError when --out holds a run
    (its checkpoint, or rows or a summary) that this one does not continue and --force does not
    replace. Called before any data or worker starts. say False: the launcher of `train --gpus N`,
    whose rank 0 checks the folder again and says that the run starts over (once, not twice)."""
    out = Path(cfg.runtime.out)
    check_run_folder(out)
    resume_path = ckpt.find_resume(cfg.runtime.resume, out)
    if starts_over(cfg, resume_path):
        if say:  # quiet or not, a run that starts over is no refusal (the launcher's check is quiet)
            log.warning(
                "--resume: no checkpoint in %s yet; starting from scratch%s",
                out,
                " (the rows its run logged before its first checkpoint go)" if holds_run(out) else "",
            )
    elif holds_run(out) and not continues_in(out, resume_path) and not cfg.runtime.force:
        if cfg.runtime.resume == "auto" and resume_path is None:  # "--resume continues it" would be no help
            raise ConfigError(
                f"--resume: {out} holds a run that got past its first checkpoint, but no {ckpt.CHECKPOINT_NAME} "
                "(moved or deleted?): put it back to continue the run, --force starts over there, or choose "
                "another --out"
            )
        what = "another run" if resume_path is not None else "a run already"
        raise ConfigError(
            f"{out} holds {what}: --resume continues the run there, --force replaces it (its checkpoint "
            "and logs are deleted), or choose another --out"
        )
    return resume_path


def check_writable(cfg: TrainConfig, resume_path: Path | None) -> None:
    """ConfigError naming --out and the cause when the run may not write there (mode bits, a read-only
    mount): said before the data is read, not at the run's first file after the data scan and the
    model build. A run that resumes its own finished checkpoint writes nothing but the final kNN's
    summary.json it may owe and the last epoch's row that a kill in its kNN monitor left unwritten
    (the checkpoint holds it; metrics.owes_row). The summary is checked here where the data's
    folders show an eval split (monitor.may_have_eval_split), and where a finished run writes
    nothing (no final kNN, a summary.json there, data without an eval split, no row owed) a folder
    that may not be written is fine. An eval split that the folders show but that turns out
    unreadable (the final kNN is then skipped, nothing written) is refused all the same: the price
    of saying it before the data scan, and --no-final-knn, which the line names, gets past it. Call
    it where the run writes (rank 0), once the folder exists (hold_run_folder)."""
    from moco_fast.monitor import may_have_eval_split

    out = Path(cfg.runtime.out)
    saved = _saved(resume_path) if continues_in(out, resume_path) else {}
    if _epochs(saved) >= cfg.optim.epochs:
        if cfg.runtime.final_knn and not (out / SUMMARY_NAME).is_file() and may_have_eval_split(cfg):
            refuse_unwritable(
                out, f": the finished run's final kNN writes {SUMMARY_NAME} there (--no-final-knn skips it)"
            )
        if owes_row(out, saved.get("row")):  # killed in its last epoch's kNN monitor
            refuse_unwritable(
                out, f": the finished run's last epoch lacks its row, which --resume writes in {METRICS_NAME}"
            )
        return
    refuse_unwritable(out)


def refuse_unwritable(out: Path, then: str = "") -> None:
    """ConfigError naming --out and the cause when no file can be made in it (`then`: what the run
    would write there, where that is not plain)."""
    from moco_fast.commands import write_refused

    why = write_refused(out)
    if why is not None:
        raise ConfigError(f"--out {out}: cannot write in {out} ({why}){then}")


def refuse_unwritable_out(out: Path) -> None:
    """ConfigError naming --out where no file can be made in it or, where it is missing, in the folder
    that would take it, or where it is a symbolic link to nothing (refuse_dead_link): one line before any
    work, instead of mkdir's bare "Permission denied: PATH" or "File exists: PATH" when the command
    first makes the folder."""
    from moco_fast.commands import check_writable_beside, refuse_dead_link

    refuse_dead_link(out, "--out")
    if out.is_dir():
        refuse_unwritable(out)
    else:
        check_writable_beside(out, "--out")


def _saved(path: Path | None) -> dict:
    """The checkpoint at `path`, its tensors unread ({} where there is none or it cannot be read:
    resume says why later)."""
    if path is None:
        return {}
    try:
        return ckpt.load(path, map_location="cpu", mmap=True)
    except (FileNotFoundError, DataError):
        return {}


def _epochs(state: dict) -> int:
    """The epochs a checkpoint (`_saved`) holds: 0 for none."""
    epoch = state.get("epoch")
    return epoch if isinstance(epoch, int) else 0


def check_run_folder(out: Path) -> None:
    """ConfigError for an --out that is a file, a folder whose config.json is not a run's (another
    tool's folder: a run would overwrite that file), or a missing one that the folder above it may not
    take (refuse_unwritable_out)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: it must be a run folder")
    above = next((p for p in out.parents if p.exists()), None)  # the folder that mkdir would start from
    if above is not None and not above.is_dir():
        raise ConfigError(f"--out {out} lies under {above}, which is a file: it must be a run folder")
    if (out / TABLE_JSON).is_file():  # the settings' folders and the sweep's table would mix with the run's
        raise ConfigError(f"--out {out} is a sweep's folder: a run needs a folder of its own (a setting's is in it)")
    if (out / CONFIG_NAME).is_file():
        read_run_config(out / CONFIG_NAME)
    if not out.exists():  # an existing one: check_writable, which knows what a finished run still writes
        refuse_unwritable_out(out)


# The sections of a saved TrainConfig (config.json, a checkpoint's "config").
CONFIG_SECTIONS = ("data", "model", "moco", "optim", "runtime")


def read_run_config(path: Path) -> dict:
    """The TrainConfig dict saved at `path` (a run's config.json), or a ConfigError naming the file
    when it holds something else: a run never overwrites it, nor starts from it."""
    obj = read_json_object(path)
    if obj is None or not all(isinstance(obj.get(k), dict) for k in CONFIG_SECTIONS):
        raise ConfigError(
            f"{path} is not the config.json of a moco-fast run (another tool's?): a run there would overwrite "
            "it; choose another --out, or move it away"
        )
    return obj


def starts_over(cfg: TrainConfig, resume_path: Path | None) -> bool:
    """`--resume` in a run folder whose run stopped before its first checkpoint (or never began): it
    starts from scratch there. Only then: no checkpoint, no row past epoch 1 (a row is written just
    before its epoch's checkpoint), no summary and no evaluation beside it. A folder whose checkpoint
    was moved away still holds a run, and --resume there is refused as before."""
    if cfg.runtime.resume != "auto" or resume_path is not None:
        return False
    return stopped_before_its_first_checkpoint(Path(cfg.runtime.out))


def stopped_before_its_first_checkpoint(out: Path) -> bool:
    """starts_over's look at a folder without a checkpoint: nothing there shows a run that saved one."""
    if any((out / name).is_file() for name in (SUMMARY_NAME, *RUN_RESULTS)):
        return False
    rows = read_rows(out)
    return not rows or rows[-1].get("epoch", 0) <= 1


def ensure_not_busy(held: list[bool], out: Path) -> None:
    """RunFolderBusy unless every process that tried to hold the run folder (`hold_run_folder`) did."""
    if not all(held):
        raise folder_busy(out, "writing")


def folder_busy(out: Path, doing: str) -> RunFolderBusy:
    """The line of a train or sweep refused by the holder of `out`, which it names (folder_holder):
    a train or a sweep, both where it names none (a moco-fast before holders named themselves)."""
    holder = folder_holder(out) or "train or sweep"
    return RunFolderBusy(
        f"{out}: another moco-fast {holder} is {doing} there now; wait for it to end or choose another --out"
    )


@contextlib.contextmanager
def hold_run_folder(out: Path, enabled: bool = True, command: str = "train") -> Iterator[bool]:
    """Holds an exclusive lock on the run folder while a run uses it (rank 0 only), so that a second
    `train` into the same --out fails at once instead of mixing its rows and checkpoints with the
    first's; yields False when another process holds it (and True otherwise, or when not `enabled`).
    The lock names `command`, the one whose run it is (a sweep's setting: "sweep"), to one it refuses."""
    if not enabled or handed(out):
        yield True
        return
    check_run_folder(out)
    with hold_folder(out, command) as fd:
        yield fd is not None


@contextlib.contextmanager
def hold_for_workers(out: Path) -> Iterator[FolderHold]:
    """hold_run_folder for the launcher of `train --gpus N`: RunFolderBusy at once when another process
    holds `out`; else the hold to hand to the workers (FolderHold), kept until they end."""
    check_run_folder(out)
    with hold_folder(out, "train") as fd:
        ensure_not_busy([fd is not None], out)
        yield FolderHold(fd)


@contextlib.contextmanager
def hold_sweep_folder(out: Path) -> Iterator[None]:
    """Holds an exclusive lock on a sweep's --out while the sweep runs: a second sweep there stops at
    once (RunFolderBusy) instead of training or evaluating the same settings beside the first."""
    with hold_folder(out, "sweep") as fd:
        if fd is None:
            raise folder_busy(out, "running")
        yield


@contextlib.contextmanager
def hold_output(out: Path, command: str, unknown: str = "") -> Iterator[None]:
    """An exclusive lock on the result `out` of lincls or finetune while it runs, so that a second run
    writing the same result (and the same state between epochs) stops at once (RunFolderBusy). The
    lock file is named after the state, `.NAME.state.pt.lock`, and names its holder, `command`
    (hold_lock_file); a lock that names none (from an earlier moco-fast) is said to be `unknown`'s,
    by default `command`'s."""

    def busy(holder: str | None) -> str:
        return (
            f"{out}: another moco-fast {holder or unknown or command} is writing it now; wait for it to end"
            " or choose another --out"
        )

    with hold_lock_file(out.with_name(f".{state_name(out.name)}.lock"), command, busy):
        yield


def holds_run(out: Path) -> bool:
    return any((out / name).is_file() for name in (ckpt.CHECKPOINT_NAME, METRICS_NAME, SUMMARY_NAME))


def continues_in(out: Path, resume_path: Path | None) -> bool:
    """True when the run resumes from the checkpoint in `out` itself (not from another run's)."""
    here = out / ckpt.CHECKPOINT_NAME
    return resume_path is not None and here.is_file() and os.path.samefile(here, resume_path)


def clear_run(out: str | Path) -> None:
    """Start over in an old run's folder (`train --force`, a --resume restart): its rows, summary,
    evaluations, TensorBoard logs and checkpoint go, so that nothing of the old run mixes with the new
    one. A kill at any point leaves a folder that --resume continues: the checkpoint goes last (rows
    past epoch 1 without it would be refused), and config.json stays until the new run writes its
    own over it (atomically)."""
    out = Path(out)
    for name in (METRICS_NAME, SUMMARY_NAME, *RUN_RESULTS):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "tb", ignore_errors=True)
    (out / ckpt.CHECKPOINT_NAME).unlink(missing_ok=True)


def made_from_now(out: Path) -> Callable[[], list[Path]]:
    """A function that lists what a run adds to `out` from now on: its config.json and tb/, or the
    files in a tb/ that was there already."""
    config, tb = out / CONFIG_NAME, out / "tb"
    had_config = config.exists()
    had_tb = set(os.listdir(tb)) if tb.is_dir() else None

    def made() -> list[Path]:
        new = [] if had_config else [config]
        if had_tb is None:
            return [*new, tb]
        return new + [tb / name for name in os.listdir(tb) if name not in had_tb] if tb.is_dir() else new

    return made


def forget_a_run_without_epochs(out: Path, made: list[Path]) -> None:
    """A run that failed (bad data, a divergence) before its first row or checkpoint (one saved
    within its first epoch counts) takes back what it `made` there (config.json, tb/), so that the
    folder is as it was (hold_run_folder then removes a folder that the run created). A folder
    holding rows or a checkpoint is left as it is."""
    if holds_run(out):
        return
    for p in made:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def remove_stale_temporaries(out: Path) -> None:
    """The temporary files of the atomic writes of a killed run: its checkpoint's, and those of the files that
    only the run writes (metrics.jsonl, which --resume rewrites; summary.json; config.json). Call it while
    holding the folder: no writer of them is running."""
    for name in (ckpt.CHECKPOINT_NAME, METRICS_NAME, SUMMARY_NAME, CONFIG_NAME):
        for tmp in ckpt.temporaries_of(out / name):
            tmp.unlink(missing_ok=True)
