"""The MoCo training run: setup, the epochs (each one `epoch.run_epoch` around a small
`train_step`), the LR schedule, the summary; its checkpoints are run_checkpoint.RunCheckpoints."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from moco_fast import checkpoint as ckpt
from moco_fast import distributed as dist_utils
from moco_fast.agreement import HeldWarnings, agree
from moco_fast.backbone import check_arch
from moco_fast.bn_batch import bn_splits, warn_few_bn_images
from moco_fast.cli import interruption
from moco_fast.closed_stdout import closed_stderr_stops
from moco_fast.config import MAX_SEED, ConfigError, TrainConfig, as_run, check_at_least, check_image_size, save_json
from moco_fast.cores import available_cores, workers_refused
from moco_fast.data import DataError, DataSplits
from moco_fast.epoch import resumed_part
from moco_fast.epoch import run_epoch as _run_epoch
from moco_fast.join import init_from_env, parent_death_signal_kept
from moco_fast.launch import under_torchrun
from moco_fast.loaders import LoaderArgs, check_loader, create_loader, registered_by
from moco_fast.loaders.synthetic import DATA_UNREAD as SYNTHETIC_DATA_UNREAD
from moco_fast.metrics import SUMMARY_NAME, MetricsWriter, owes_row, read_rows
from moco_fast.model import MoCo, reads_k
from moco_fast.monitor import eval_split_use, knn_figures, knn_top1, monitor_splits
from moco_fast.resume import SavedRun, bn_splits_fix, queue_fix, resume, saved_run, sync_bn_stops
from moco_fast.run_checkpoint import RunCheckpoints
from moco_fast.run_folder import (
    CONFIG_NAME,
    check_output,
    check_writable,
    clear_run,
    continues_in,
    ensure_not_busy,
    forget_a_run_without_epochs,
    hold_run_folder,
    made_from_now,
    refuse_unwritable,
    remove_stale_temporaries,
    starts_over,
)
from moco_fast.step import (
    AMP_DTYPES,
    GraphedStep,
    StepState,
    amp_as_run,
    check_cuda_graph,
    make_optimizer,
    set_lr,
    train_step,
)
from moco_fast.stops import SaveClock, StopRequests
from moco_fast.text import plural

log = logging.getLogger("moco_fast")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = named_device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but no CUDA GPU is available")  # cuda:N as given
    if dev.type == "cuda" and dev.index is not None and dev.index >= (count := torch.cuda.device_count()):
        # train's torch.cuda.set_device raised CUDA's 'invalid device ordinal' traceback
        raise ConfigError(f"--device {name}: this machine has {plural(count, 'GPU')} (cuda:0..)")
    return dev


def say_if_on_the_cpu(asked: str, device: torch.device) -> None:
    """One INFO line where --device auto (the default) found no CUDA GPU: the README's commands train
    on GPUs, and on a machine without one they went on the CPU (DALI in its CPU-only mode) without a
    word. --device cpu asked for it and gets none."""
    if asked == "auto" and device.type == "cpu":
        log.info("no CUDA GPU here: training on the CPU (--device auto)")


def named_device(name: str) -> torch.device:
    """--device NAME (not auto) as a device, whether or not this machine has it."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: moco-fast runs on cpu or cuda (cuda:N), or auto")
    return dev


def asks_for_the_cpu(name: str) -> bool:
    """Whether --device NAME is the CPU, which is on every machine: the checks made before a run (check_flags)
    take auto and cuda as on a machine with a GPU, which the config may be for (a resume's check of its saved
    loader options takes auto as the CPU where no GPU is: commands.train._check_saved_loader_options)."""
    return name != "auto" and named_device(name).type == "cpu"


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32. auto: bf16 on CUDA (no loss scaling needed), fp32 on the CPU."""
    amp = amp_as_run(amp, device.type)
    if amp not in AMP_DTYPES:
        raise ConfigError(f"--amp must be one of bf16, fp16, off (got {amp!r})")
    if amp == "fp16" and device.type == "cpu":
        raise ConfigError("--amp fp16 needs a GPU; use --amp bf16 or --amp off on the CPU")
    return AMP_DTYPES[amp]


def base_lr(cfg: TrainConfig, world: int) -> float:
    """--lr for a global batch of 256, scaled linearly with the global batch (world processes)."""
    return cfg.optim.lr * cfg.optim.batch_size * world / 256


def lr_at(cfg: TrainConfig, epoch: int, base: float) -> float:
    """Learning rate for an epoch: half-cosine (v2) or x0.1 steps at fractions of the run (v1)."""
    o = cfg.optim
    if o.schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * epoch / o.epochs))
    if o.schedule == "step":
        return base * 0.1 ** sum(epoch >= round(f * o.epochs) for f in o.lr_steps)
    raise ConfigError(f"unknown schedule {o.schedule!r}: use cosine or step")


def resolve_workers(workers: int, device: torch.device) -> int:
    """-1 (auto): on a GPU up to 8 per process; on the CPU half the cores, since the step itself
    needs the rest."""
    if workers >= 0:
        return workers
    cores = max(1, available_cores() // dist_utils.local_world_size())
    return min(8, cores) if device.type == "cuda" else max(1, cores // 2)


def check_workers(workers: int, processes: int | None = None, options: Any = None) -> None:
    """A ConfigError, before the run folder or the data, for more --workers than WORKERS_PER_CORE a core
    of this machine can use (-1, auto, never is). A resumed run not given --workers again takes its
    saved count only as far as this machine's cores do (commands.train). `processes`: this machine's
    training processes (None: this one's group's, LOCAL_WORLD_SIZE). `options`: the loader's options as
    check_loader parsed them; DALI's: its threads too, which each process starts (their parse checks
    them for one process)."""
    from moco_fast.loaders.options import DaliOptions

    processes = processes or dist_utils.local_world_size()
    why = workers_refused(workers, processes, "-1: auto")
    if why is not None:
        raise ConfigError(why)
    if isinstance(options, DaliOptions):
        options.check_threads(processes)


def eval_workers(workers: int, device: torch.device) -> int:
    """Workers for the kNN and linear feature passes after training: the run's own (resolved: -1 is
    "auto", not a count), at most 4."""
    return min(resolve_workers(workers, device), 4)


def validate(cfg: TrainConfig, world: int, saved: SavedRun | Callable[[], SavedRun | None] | None = None) -> None:
    """Contradicting flags, as one ConfigError. saved: the checkpoint that --resume continues, whose model
    (--moco-k) cannot change: the errors then name a fix it allows. A callable is asked only where an
    error or a warning needs it (resume.saved_run reads the checkpoint, which a run that validates needs
    not read twice), and once at most: each error that asks it ends the checks."""
    o, m = cfg.optim, cfg.moco
    # with the flags: train read the data first, the bench ran rows (its reference: an AttributeError)
    check_arch(cfg.model.arch)
    global_batch = o.batch_size * world
    r, d = cfg.runtime, cfg.data
    for flag, value, least in (
        ("--epochs", o.epochs, 1),
        ("--batch-size", o.batch_size, 1),
        ("--bn-splits", m.bn_splits, 1),
        ("--log-every", r.log_every, 1),
        ("--dim", cfg.model.dim, 1),
        ("--knn-every", r.knn_every, 0),
        ("--knn-k", r.knn_k, 1),
        ("--workers", d.workers, -1),
        ("--synthetic-steps", d.synthetic_steps, 1),
    ):
        check_at_least(flag, value, least, " (-1: auto)" * (flag == "--workers"))
    check_image_size(d.aug.image_size)
    if not 0 <= r.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be in 0..{MAX_SEED} (got {r.seed})")
    if not 0 <= r.save_every < math.inf:  # NaN fails too
        raise ConfigError(
            f"--save-every must be 0 (epoch ends and stops only) or a number of minutes (got {r.save_every})"
        )
    if not 0 < r.knn_t < math.inf:
        raise ConfigError(f"--knn-t must be positive (got {r.knn_t})")
    if not (0 < o.lr < math.inf and 0 <= o.weight_decay < math.inf):  # NaN fails both
        raise ConfigError(f"--lr must be positive and --weight-decay not negative (got {o.lr}, {o.weight_decay})")
    if not 0.0 <= m.m <= 1.0:
        raise ConfigError(f"--moco-m must be in [0, 1] (got {m.m})")
    if not 0.0 <= m.bank_m <= 1.0:
        raise ConfigError(f"moco.bank_m (the memory bank's momentum) must be in [0, 1] (got {m.bank_m})")
    if not 0 < m.t < math.inf:
        raise ConfigError(f"--moco-t must be positive (got {m.t})")
    if reads_k(m.mechanism):
        # here, not at the model's build only: a sweep's memory-bank K 0 failed after its folder was made
        check_at_least("--moco-k", m.k, 1)
    keys_per_step = global_batch * (2 if m.symmetric else 1)  # --symmetric enqueues both views' keys
    if m.mechanism == "moco" and m.k < keys_per_step:
        fix = "raise --moco-k or lower --batch-size"
        if (run := _asked(saved)) is not None and run.checkpoint:
            fix = queue_fix(cfg, world, run.world, 2 if m.symmetric else 1)
        raise ConfigError(f"--moco-k {m.k} is smaller than the keys one step enqueues ({keys_per_step}): {fix}")
    splits = bn_splits(m, world)
    if o.batch_size < 2:  # one BN group (split BN off, or one split): no --bn-splits to lower
        raise ConfigError(f"--batch-size {o.batch_size} gives BN 1 image a batch: raise it to 2 or more")
    if o.batch_size % splits or o.batch_size // splits < 2:
        fix = "lower --bn-splits or raise --batch-size"
        if splits > 1 and (run := _asked(saved)) is not None and run.checkpoint and run.world > 1:
            fix = bn_splits_fix(cfg, run.world)
        raise ConfigError(
            f"--batch-size {o.batch_size} must be a multiple of --bn-splits {splits} with at least 2 images "
            f"per BN sub-batch: {fix}"
        )
    # a --sync-bn run of several processes resumed in one with shuffle BN on: train --resume's line
    # says what sync BN's absence means (resume.sync_bn_stops). A run without --sync-bn: this line
    if cfg.runtime.sync_bn and world == 1 and not (m.shuffle_bn and _sync_bn_stopped(cfg, saved)):
        log.warning("--sync-bn has no effect with one process")
    if m.shuffle_exchange not in dist_utils.SHUFFLE_MODES:
        raise ConfigError(f"--shuffle-exchange must be one of {', '.join(dist_utils.SHUFFLE_MODES)}")
    if m.symmetric and m.mechanism != "moco":
        log.warning("--symmetric applies to --mechanism moco only; the %s loss is used as it is", m.mechanism)


def _asked(saved: SavedRun | Callable[[], SavedRun | None] | None) -> SavedRun | None:
    return saved() if callable(saved) else saved


def _sync_bn_stopped(cfg: TrainConfig, saved: SavedRun | Callable[[], SavedRun | None] | None) -> bool:
    """A --sync-bn run of several processes resumed in one (resume.sync_bn_stops): asked only where this
    process runs with --sync-bn and shuffle BN."""
    run = _asked(saved)
    return run is not None and sync_bn_stops(run.sync_bn, run.world, cfg, 1)


def validate_device(cfg: TrainConfig, device: torch.device, world: int) -> None:
    """The flags that need a kind of device, checked before the data and the model are built."""
    if cfg.runtime.cuda_graph:
        check_cuda_graph(device, world)
    if cfg.runtime.sync_bn and world > 1 and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm runs on GPUs only)")


def check_flags(cfg: TrainConfig, world: int, saved: SavedRun | None = None) -> Any:
    """What train() refuses before it reads data or builds the model, as far as the flags alone decide
    it (`train --print-config`; world: the processes the run would start; saved: as train's). Left to the run: what
    depends on the machine it runs on (--device auto or cuda, an optional backend's library), the run
    folder (--out, --force) and the data. Returns the loader's options parsed (check_loader's)."""
    cpu = asks_for_the_cpu(cfg.runtime.device)
    check_flags_on(cfg, torch.device("cpu" if cpu else "cuda"), world, saved)
    return check_loader(cfg.data.loader, cfg.data.loader_options, cpu)


def check_flags_on(cfg: TrainConfig, device: torch.device, world: int, saved: SavedRun | None) -> torch.dtype | None:
    """The checks of the flags on `device` with `world` processes, the run's, check_flags' and those of
    train --resume's refusals that name a line to run (commands.train) alike; returns the AMP dtype."""
    amp_dtype = resolve_amp(cfg.runtime.amp, device)
    validate(cfg, world, saved or partial(saved_run, cfg))
    validate_device(cfg, device, world)
    return amp_dtype


def with_loader_module(cfg: TrainConfig) -> TrainConfig:
    """cfg with `data.loader_module`, the module that registered `data.loader` in this process
    (loaders.registered_by): a library user's loader's, which a resume from the CLI names (commands.train)
    and a `--gpus` worker imports (launch._train_worker); None for a built-in one (a resume that changed
    the loader keeps no other's module). train() records it, launch_local before its workers start, and
    train --print-config prints it."""
    if (module := registered_by(cfg.data.loader)) != cfg.data.loader_module:
        cfg = replace(cfg, data=replace(cfg.data, loader_module=module))
    return cfg


def train(
    cfg: TrainConfig, saved: SavedRun | None = None, splits: DataSplits | None = None, command: str = "train"
) -> dict[str, Any]:
    """Train as configured; returns the last metrics row (plus final kNN figures when computed), {}
    where a resumed run had trained all its epochs and owes nothing (its caller says so: one line).
    saved: the checkpoint that --resume continues, where the caller read it already (train --resume,
    with its config); None: read where a check needs it. splits: the image folder `--data` as the
    caller listed it (a sweep, once for all its settings), which the loader reads instead of listing
    it again (loaders.base.listed_splits says which listings it takes); None: the loader lists it.
    command: the one that runs this training, which the run folder's lock names to a train it
    refuses there (a sweep's setting: "sweep")."""
    # a launched worker's SIGTERM at its launcher's end (init_from_env) lasts while it trains: a script
    # under torchrun that went on after train() returned was stopped when torchrun ended, later
    with parent_death_signal_kept():
        return _train(cfg, saved, splits, command)


def _train(cfg: TrainConfig, saved: SavedRun | None, splits: DataSplits | None, command: str) -> dict[str, Any]:
    """train(), its arguments, once the parent-death signal is kept."""
    owns_group = init_from_env(cfg.runtime.device)
    world, rank = dist_utils.world_size(), dist_utils.rank()
    setup_warnings = None
    level = log.level  # the caller's, put back on the way out: a notebook's rank went on silenced
    if rank != 0:
        log.setLevel(logging.WARNING)  # only rank 0 logs progress; warnings and errors from every rank
        setup_warnings = HeldWarnings()  # until agree(): rank 0 says them, unless the ranks disagree
    try:
        device = dist_utils.local_device(resolve_device(cfg.runtime.device))
        amp_dtype = check_flags_on(cfg, device, world, saved)  # on the flags as given (their warnings name them)
        options = check_loader(cfg.data.loader, cfg.data.loader_options, device.type == "cpu")
        check_workers(cfg.data.workers, None, options)
        cfg = as_run(cfg, world)  # what runs is what config.json, the checkpoint and resume's comparison see
        cfg = with_loader_module(cfg)
        out = Path(cfg.runtime.out)
        with hold_run_folder(out, enabled=dist_utils.is_main(), command=command) as held, closed_stderr_stops():
            ensure_not_busy(dist_utils.all_gather_objects(held), out)  # every rank stops, not rank 0 alone
            return _train_held(cfg, out, device, amp_dtype, world, rank, owns_group, setup_warnings, splits, command)
    except BaseException:
        if setup_warnings is not None:
            setup_warnings.release(show=True)  # nothing if agree() had passed
        if owns_group and dist_utils.world_size() == 1:
            # the group this call made ends with it (one the caller made stays): a caller that went on
            # in this process (a notebook's next train) ran in the failed run's group and left it up.
            # One process only: with peers, NCCL's destroy may wait on a peer stuck in a collective,
            # and a failed rank's process ends anyway (torchrun and --gpus end the others)
            with contextlib.suppress(Exception):  # the run's error stands
                dist_utils.destroy()
        raise
    finally:
        log.setLevel(level)


def _train_held(
    cfg: TrainConfig,
    out: Path,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    world: int,
    rank: int,
    owns_group: bool,
    setup_warnings: HeldWarnings | None,
    listed: DataSplits | None,
    command: str,
) -> dict[str, Any]:
    """train() while this process holds the run folder (rank 0); `listed`, `command`: train's `splits`,
    `command`."""
    resume_path = check_output(cfg)
    if dist_utils.is_main():
        check_writable(cfg, resume_path)
    ckpt.seed_everything(cfg.runtime.seed + rank)

    if cfg.data.loader == "synthetic" and cfg.data.data is not None:
        log.warning(SYNTHETIC_DATA_UNREAD, cfg.data.data)
    loader = create_loader(
        cfg.data.loader,
        LoaderArgs(
            data=cfg.data.data,
            aug=cfg.data.aug,
            batch_size=cfg.optim.batch_size,
            device=device,
            dtype=amp_dtype or torch.float32,
            channels_last=cfg.runtime.channels_last,
            workers=resolve_workers(cfg.data.workers, device),
            seed=cfg.runtime.seed,
            rank=rank,
            world_size=world,
            synthetic_steps=cfg.data.synthetic_steps,
            epochs=cfg.optim.epochs,
            eval_split=eval_split_use(cfg),
            splits=listed,
            options=dict(cfg.data.loader_options),
        ),
    )
    if len(loader) < 1:
        raise DataError("the data gives no full batch: lower --batch-size")
    splits = monitor_splits(cfg, loader.splits)
    ev = "" if splits is None or splits.eval is None else f"; kNN on {len(splits.eval)} eval images"
    # synthetic's count and classes are made up (a step's batch over and over, 10 random labels): "8
    # images in 10 classes" read as a count of the data
    if cfg.data.loader == "synthetic":
        what = "random images"
    else:
        what = f"{plural(loader.num_images, 'image')} in {plural(len(loader.classes), 'class', 'classes')}"
    # with the data line, past the checks of the flags, --out and the data: a refusal there stays one
    # line (error: ...), not this one and then the error. A sweep says it once, not once a setting
    if command == "train":
        say_if_on_the_cpu(cfg.runtime.device, device)
    log.info(
        "data: %s (--loader %s), %s of %d a process per epoch%s",
        what,
        cfg.data.loader,
        plural(len(loader), "step"),
        cfg.optim.batch_size,
        ev,
    )

    model = MoCo(cfg.model, cfg.moco, cfg.data.aug.image_size, num_images=loader.num_images).to(device)
    if model.mechanism == "memory-bank" and model.k < cfg.moco.k:  # config.json keeps the K asked for
        log.warning(
            "--moco-k %d is more than the %s, one row each in the memory bank: each step draws %d negatives from it",
            *(cfg.moco.k, plural(loader.num_images, "training image"), model.k),
        )
    if cfg.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, saved_part, saved_row = 0, None, None
    if resume_path is not None:
        start_epoch, saved_part, saved_row = resume(
            resume_path, cfg, model, optimizer, scaler, world, rank, loader.num_images, device
        )
    done = None  # the part of the next epoch done (a checkpoint saved within it)
    if start_epoch < cfg.optim.epochs:
        done = resumed_part(saved_part, start_epoch, loader, cfg.optim.batch_size, world)
    if not loader.starts_mid_epoch:
        log.info(
            "--loader %s on this data starts an epoch at its first step only: checkpoints at epoch ends only "
            "(no --save-every; a stop drops the epoch in progress)",
            cfg.data.loader,
        )
    # Every rank must run the same settings, from the same epoch, on the same number of steps, or
    # a collective would wait for the collective timeout (an hour) or mix different queues.
    agree(cfg, device, amp_dtype, start_epoch, loader)
    if setup_warnings is not None:  # from here on, what a rank warns of is its own (an unreadable image)
        setup_warnings.release(show=False)
    if cfg.runtime.compile:
        model.encoder_q.compile()
        if model.encoder_k is not None:
            model.encoder_k.compile()
    step_model = dist_utils.wrap_ddp(model, device, cfg.runtime.sync_bn)
    s = StepState(step_model, optimizer, scaler, amp_dtype, device)

    finished = start_epoch >= cfg.optim.epochs  # nothing to train: the folder stays as it is
    if not finished and dist_utils.is_main():
        warn_few_bn_images(cfg, world, device)
    # resumed from the checkpoint in --out itself (clear_run below runs only where it is not)
    continuing = continues_in(out, resume_path)
    # ... unless the final evaluation of a finished run was interrupted: that part runs now
    summary_owed = (
        finished and continuing and splits is not None and cfg.runtime.final_knn and not (out / SUMMARY_NAME).is_file()
    )
    if summary_owed and dist_utils.is_main():
        refuse_unwritable(out)  # before the kNN: check_writable did, but --out may have changed since
    # what this run adds to the folder, for forget_a_run_without_epochs: taken before an old run's
    # files are cleared (a config.json that a run stopped before its first save left stays a config.json)
    made = made_from_now(out)
    if dist_utils.is_main() and not continuing:
        if cfg.runtime.force or starts_over(cfg, resume_path):
            clear_run(out)  # all but config.json: a kill from here to its save leaves a run to --resume
    if dist_utils.is_main():  # a finished run too: it may write its summary and its row (a kill left their temporaries)
        remove_stale_temporaries(out)
    # the checkpoint's row belongs in its own run's folder only: another run's epochs were logged there
    own_row = saved_row if continuing else None
    # a finished run killed in its last epoch's kNN monitor (--no-final-knn, a sweep) still owes that row
    row_owed = finished and owes_row(out, own_row)
    writer = MetricsWriter(out, enabled=dist_utils.is_main() and (not finished or summary_owed or row_owed))
    if resume_path is not None:
        writer.keep_epochs(start_epoch, own_row)
    if dist_utils.is_main() and not finished:
        out.mkdir(parents=True, exist_ok=True)
        save_json(cfg, str(out / CONFIG_NAME), world)
    # the caller's, put back when the training returns or raises: a program that trains and then does
    # more (a notebook, a script) kept cuDNN's benchmark mode, a process-wide setting, on
    benchmark = torch.backends.cudnn.benchmark
    try:
        base = base_lr(cfg, world)
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution algorithms once
        step = GraphedStep(s, cfg.moco.m) if cfg.runtime.cuda_graph else partial(train_step, s, m=cfg.moco.m)
        row: dict[str, Any] = {}
        saves = RunCheckpoints(out, cfg, model, optimizer, scaler, world, loader.num_images, amp_dtype, resume_path)
        stops = StopRequests(repeats_wait=under_torchrun())
        clock = SaveClock(cfg.runtime.save_every if loader.starts_mid_epoch else 0)
        for epoch in range(start_epoch, cfg.optim.epochs):
            lr = lr_at(cfg, epoch, base)
            set_lr(optimizer, lr)
            loader.set_epoch(epoch, done.step if done else 0)
            within = partial(saves.save, epoch) if loader.starts_mid_epoch else None
            row = _run_epoch(step, loader, cfg, epoch, lr, device, world, done, stops, clock, within)
            done = None
            # A stop that lands after the epoch's last agreement (a rank waiting here for a slower
            # one: the check, the save's gather) is recorded and acted on once the save is written,
            # rather than ending the run at once and losing the epoch's steps since the last save.
            # A stop agreed already is not deferred again: a second one during the save ends it at once.
            with stops.deferred(raise_on_leaving=False) if stops.signum is None else contextlib.nullcontext():
                saves.check(row["loss"], epoch + 1)
                # saved before the kNN, which can take minutes: a stop or a crash in it loses no step.
                # The checkpoint holds the row, which --resume writes if the run ended before it did.
                saves.save(epoch + 1, row=row)
            clock.saved()
            # agreed at the epoch's end (run_epoch) or recorded in its save: the epoch ends as saved,
            # its row written without the kNN (a stop does not wait for it), then the stop
            stopped = stops.signum is not None
            knn_due = cfg.runtime.knn_every and (epoch + 1) % cfg.runtime.knn_every == 0
            if splits is not None and knn_due and not stopped:
                row = _with_knn(row, writer, lambda: knn_top1(model.backbone(), splits, cfg, device))
            writer.write(row)
            if stopped:
                raise stops.error()
        if close := getattr(loader, "close", None):  # its kept workers, idle from here (the torch loader's)
            close()
        if summary_owed:
            log.info(
                "%s: trained for its %s already; computing the final kNN it lacks",
                out,
                plural(cfg.optim.epochs, "epoch"),
            )
            row = (read_rows(out) or [{"epoch": start_epoch}])[-1]
        if (summary_owed or not finished) and splits is not None and cfg.runtime.final_knn and dist_utils.is_main():
            row = _final_evaluation(row, model, splits, cfg, device)
            writer.write_summary(row)
    except BaseException as e:
        with contextlib.suppress(OSError):  # its logs on the same full disk: the first error stands
            writer.close()
        if dist_utils.is_main() and interruption(e) is None:  # a stop keeps config.json: --resume reads it
            forget_a_run_without_epochs(out, made())  # what it made before its first epoch ended
        raise
    finally:
        torch.backends.cudnn.benchmark = benchmark
    writer.close()
    dist_utils.barrier()
    if owns_group:
        dist_utils.destroy()
    return row


def nothing_to_train(cfg: TrainConfig) -> str:
    """What `train` returning {} means, for its caller's line."""
    return f"{cfg.runtime.out} trained for its {plural(cfg.optim.epochs, 'epoch')} already"


def _with_knn(row: dict[str, Any], writer: MetricsWriter, top1: Callable[[], float]) -> dict[str, Any]:
    """The epoch's row with its kNN monitor's figure (on rank 0 alone; the others wait at the
    barrier). A stop or an error in the kNN writes the row without it first: the checkpoint that
    covers the epoch is already saved."""
    try:
        if dist_utils.is_main():
            row = {**row, "knn_top1": top1()}
        dist_utils.barrier()
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk: the kNN's error stands
            writer.write(row)
        raise
    return row


def _final_evaluation(
    row: dict[str, Any], model: MoCo, splits, cfg: TrainConfig, device: torch.device
) -> dict[str, Any]:
    """The summary: the last row plus the final kNN figures (monitor.knn_figures)."""
    f = knn_figures(model, splits, cfg, device, backbone_top1=row.get("knn_top1"))
    row = {**row, "final_knn_top1": f.pop("knn_top1"), "final_knn_head_top1": f.pop("knn_head_top1")}
    return {**row, **f}  # and random_knn_top1 with --knn-baseline
