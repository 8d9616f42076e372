"""`moco-fast train`: MoCo pretraining."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shlex
from dataclasses import replace
from pathlib import Path

from moco_fast import launched_by_torchrun
from moco_fast.augment import AUG_PRESETS
from moco_fast.commands import AMP_CHOICES, HelpFormatter
from moco_fast.commands.unused_flags import warn_unused
from moco_fast.config import MAX_IMAGE_SIZE, MAX_SEED, PRESETS, ConfigError, build_config, set_dotted, to_dict
from moco_fast.cores import WORKERS_PER_CORE

log = logging.getLogger("moco_fast")

# flag dest -> dotted config field. Flags default to None: the preset (then the dataclass) decides.
FLAG_FIELDS = {
    "data": "data.data",
    "loader": "data.loader",
    "workers": "data.workers",
    "synthetic_steps": "data.synthetic_steps",
    "arch": "model.arch",
    "stem": "model.stem",
    "dim": "model.dim",
    "mlp": "model.mlp",
    "mechanism": "moco.mechanism",
    "moco_k": "moco.k",
    "moco_m": "moco.m",
    "moco_t": "moco.t",
    "symmetric": "moco.symmetric",
    "shuffle_bn": "moco.shuffle_bn",
    "bn_splits": "moco.bn_splits",
    "shuffle_exchange": "moco.shuffle_exchange",
    "epochs": "optim.epochs",
    "batch_size": "optim.batch_size",
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "schedule": "optim.schedule",
    "device": "runtime.device",
    "amp": "runtime.amp",
    "channels_last": "runtime.channels_last",
    "compile": "runtime.compile",
    "cuda_graph": "runtime.cuda_graph",
    "seed": "runtime.seed",
    "out": "runtime.out",
    "resume": "runtime.resume",
    "force": "runtime.force",
    "knn_every": "runtime.knn_every",
    "final_knn": "runtime.final_knn",
    "knn_baseline": "runtime.knn_baseline",
    "knn_k": "runtime.knn_k",
    "knn_t": "runtime.knn_t",
    "log_every": "runtime.log_every",
    "save_every": "runtime.save_every",
    "gpus": "runtime.gpus",
    "sync_bn": "runtime.sync_bn",
}

# The fields that say what a run trains, as opposed to where and how it runs (runtime.*, the worker count).
RUN_FIELDS = {f for f in FLAG_FIELDS.values() if not f.startswith("runtime.") and f != "data.workers"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="MoCo pretraining",
        description="MoCo pretraining. Without --data it trains on the small demo set shipped in the "
        "package. Flags left out take the preset's value; the resolved config is written to OUT/config.json.",
        formatter_class=HelpFormatter,
    )
    B = argparse.BooleanOptionalAction
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        help="image folder with class subfolders, or a root with train/ and val/ or test/ "
        "(FFCV: a .beton file); default: the demo set",
    )
    g.add_argument(
        "--loader",
        help="torch | resident | dali | ffcv | synthetic (default: resident for the demo preset, torch for the "
        "others); resident keeps the whole set on the device",
    )
    g.add_argument(
        "--workers",
        type=int,
        help="data loading workers per process (default auto: up to 8 per GPU; half the cores on a CPU); at most "
        f"{WORKERS_PER_CORE} a core of the machine, its processes' together (--resume without it: the run's, lowered to that)",
    )
    g.add_argument(
        "--image-size",
        type=int,
        help=f"training crop size, 8..{MAX_IMAGE_SIZE} (default: the preset's, 224; cifar and demo 32; 32 with any preset "
        "on the demo set, normalised with its own statistics at any size)",
    )
    g.add_argument(
        "--loader-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend-specific loader setting, repeatable, each KEY once (e.g. dali: hw_decoder_load=0.9) (default: the "
        "backend's own, listed in docs/dali.md, docs/ffcv.md and docs/resident.md; torch and synthetic take none)",
    )
    g.add_argument("--synthetic-steps", type=int, help="steps per epoch with --loader synthetic (default 100)")
    g = p.add_argument_group("model")
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="v1: linear head, T=0.07, step schedule, v1 augmentations; v2: MLP head, T=0.2, cosine, "
        "blur; cifar: the official CIFAR-10 demo (ResNet-18, CIFAR stem, K=4096, m=0.99, T=0.1); "
        "demo: a few minutes on a CPU on the shipped demo set (default: demo without --data, v2 with it or with "
        "--loader dali, ffcv or synthetic)",
    )
    g.add_argument(
        "--arch",
        help="any torchvision ResNet (resnet18, resnet50, wide_resnet50_2, ...) or the paper's wider ResNet-50s "
        "resnet50w2 and resnet50w4 (every layer 2x or 4x wider) (default resnet50; cifar and demo resnet18)",
    )
    g.add_argument(
        "--stem",
        choices=["auto", "imagenet", "cifar"],
        help="cifar: 3x3 conv, no max-pool (default auto: cifar for <= 64 px; the cifar preset cifar, demo imagenet)",
    )
    g.add_argument("--dim", type=int, help="feature dimension (default 128)")
    g.add_argument(
        "--mlp",
        action=B,
        default=None,
        help="MLP projection head instead of a linear one (default on; off for v1, cifar and demo)",
    )
    g = p.add_argument_group("MoCo")
    g.add_argument(
        "--mechanism",
        choices=["moco", "memory-bank", "end-to-end"],
        help="the paper's Figure 3 mechanisms (default moco)",
    )
    g.add_argument(
        "--moco-k",
        type=int,
        help="queue length K: number of negatives; the memory bank draws K of its rows (one an image; at most all), "
        "end-to-end ignores it (its negatives are the batch) (default 65536; cifar 4096, demo 1024)",
    )
    g.add_argument(
        "--moco-m",
        type=float,
        help="key encoder momentum; 0 copies the query encoder; moco only: the memory bank and end-to-end have "
        "no key encoder (default 0.999; cifar and demo 0.99)",
    )
    g.add_argument("--moco-t", type=float, help="softmax temperature (default 0.2; v1 0.07, cifar and demo 0.1)")
    g.add_argument("--symmetric", action=B, default=None, help="symmetric loss (both views as queries) (default off)")
    g.add_argument(
        "--shuffle-bn",
        action=B,
        default=None,
        help="shuffle BN: keys never share BN statistics with their queries (default on)",
    )
    g.add_argument("--bn-splits", type=int, help="on one device, sub-batches with their own BN statistics (default 8)")
    g.add_argument(
        "--sync-bn",
        action=B,
        default=None,
        help="SyncBatchNorm across processes instead of shuffle BN, on CUDA GPUs (several CPU processes: refused; "
        "default off)",
    )
    g.add_argument(
        "--shuffle-exchange",
        choices=["alltoall", "allgather"],
        help="how shuffle BN moves images between processes: alltoall sends each rank the images it needs, "
        "allgather gathers all of them everywhere (the official code's exchange); the same balanced "
        "permutation and keys either way (default alltoall; docs/distributed.md models the traffic)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="default 200; demo 8")
    g.add_argument(
        "--batch-size",
        type=int,
        help="per process (per GPU); the global batch is this times the number of processes (default 256; cifar 512, demo 128)",
    )
    g.add_argument("--lr", type=float, help="learning rate for a global batch of 256, scaled linearly (default 0.03)")
    g.add_argument("--weight-decay", type=float, help="default 0.0001; cifar and demo 0.0005")
    g.add_argument(
        "--schedule", choices=["cosine", "step"], help="default cosine; v1 step (x0.1 at 60%% and 80%% of the epochs)"
    )
    g = p.add_argument_group("runtime")
    g.add_argument("--device", help="cpu | cuda | cuda:N | auto (default auto)")
    g.add_argument(
        "--gpus",
        type=int,
        help="start one worker per GPU on this machine (default 1: this process alone; --resume: the run's own "
        "count where those GPUs are there)",
    )
    g.add_argument("--amp", choices=AMP_CHOICES, help="mixed precision (default auto: bf16 on CUDA, off on CPU)")
    g.add_argument(
        "--channels-last",
        action=B,
        default=None,
        help="channels-last memory format (default on; demo off, faster on a CPU)",
    )
    g.add_argument("--compile", action=B, default=None, help="torch.compile the encoders (default off)")
    g.add_argument(
        "--cuda-graph",
        action=B,
        default=None,
        help="capture the whole step as a CUDA graph after 3 warm-up steps (one GPU, fixed batch; "
        "see docs/performance.md) (default off)",
    )
    g.add_argument("--seed", type=int, help=f"0..{MAX_SEED} (default 0)")
    g.add_argument(
        "--out",
        help="run folder: checkpoint.pt, metrics.jsonl, config.json, tb/ (default runs/demo for the demo "
        "preset, runs/moco for the others)",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        help="continue from the checkpoint in --out, or from the given checkpoint path, with the settings "
        "it was trained with (data, optimisation and run flags given now override them; of the model and MoCo "
        "settings only --moco-m, --moco-t, --symmetric, --bn-splits, --shuffle-bn and --shuffle-exchange may "
        "change, and --moco-k but for --mechanism moco, whose queue the checkpoint holds; more --epochs "
        "extends the run)",
    )
    g.add_argument(
        "--force",
        action="store_true",
        default=None,
        help="start a fresh run in an --out that holds another run (its checkpoint and logs are deleted); with "
        "--resume PATH: continue another run's checkpoint there (--resume of --out's own run and --force contradict)",
    )
    g.add_argument(
        "--knn-every", type=int, help="kNN accuracy every N epochs (needs an eval split; 0: off) (default 0)"
    )
    g.add_argument(
        "--final-knn",
        action=B,
        default=None,
        help="kNN accuracy after the last epoch, when there is an eval split (default on)",
    )
    g.add_argument(
        "--knn-baseline",
        action=B,
        default=None,
        help="also report the kNN of a randomly initialised backbone (default off; demo on)",
    )
    g.add_argument("--knn-k", type=int, help="neighbours of the kNN monitor (default 200)")
    g.add_argument("--knn-t", type=float, help="temperature of the kNN monitor's weights (default 0.1)")
    g.add_argument(
        "--log-every",
        type=int,
        help="steps between progress-bar updates (each one is a host sync, where a stop signal, Ctrl-C or a "
        "stderr whose reader went away (`2>&1 | head`: exit status 141) is acted on: a checkpoint of that step, "
        "then the run ends) (default 10)",
    )
    g.add_argument(
        "--save-every",
        type=float,
        metavar="MINUTES",
        help="also save checkpoint.pt within an epoch when this many minutes passed since the last save, so that "
        "a kill or crash loses at most that much; --resume continues at the next step (0: at epoch ends and "
        "stops only; default 30)",
    )
    g.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config and exit, after the checks of the flags (and of RANK, WORLD_SIZE, ...) "
        "that the run makes before it starts (loader options, --arch, --moco-k against the batch...); the data "
        "and --out are not checked, and GPUs this machine lacks for --gpus (--workers past its cores) are a warning: "
        "the config may be for another machine",
    )
    p.set_defaults(func=run, io_paths=(("--data", "data"), ("--out", "out")))  # cli.command_paths


def config_from_args(args: argparse.Namespace):
    """Preset, then flags. With --resume and a checkpoint to resume from, the checkpoint's own
    config instead of the preset: `train --resume --out RUN` continues RUN as it was configured,
    and only the flags given on this command line change it."""
    return configured(args)[0]


def configured(args: argparse.Namespace):
    """(config_from_args, the resume.SavedRun of the run it continues, or None): read with its config
    (a checkpoint's or config.json's), the SavedRun goes to the run's checks (trainer.train), which need
    not read it again."""
    from moco_fast.loaders.options import option_flags

    saved, saved_run = _resumed_config(args)
    if saved is not None:
        weights = to_dict(saved)  # the settings its checkpoint's weights were built with, before the flags
        cfg, saved_size, saved_runtime = saved, saved.data.aug.image_size, replace(saved.runtime)
        for dest, field in FLAG_FIELDS.items():
            if getattr(args, dest, None) is not None:
                set_dotted(cfg, field, getattr(args, dest))
        if args.loader is not None and args.loader != weights["data"]["loader"]:
            # the saved options are the saved backend's, which another one refused ("the torch loader
            # takes no --loader-option (got batches_ahead=8)"), and no flag takes a saved one away
            cfg.data.loader_options = {}
        if args.preset is not None and args.preset != cfg.preset:
            log.warning(
                "--resume: the run was configured with preset %s; --preset %s is ignored", cfg.preset, args.preset
            )
        if args.gpus is None and cfg.runtime.gpus > 1:
            cfg.runtime.gpus = _gpus_to_resume_with(cfg)
        if args.workers is None:
            cfg.data.workers = _workers_to_resume_with(cfg, args.print_config)
        if saved_runtime.sync_bn and args.shuffle_bn is not False:
            _shuffle_bn_where_sync_bn_stops(cfg, saved_run.world)
        if saved_run.checkpoint and cfg.model.stem == "auto" and args.stem is None and args.image_size is not None:
            from moco_fast.backbone import resolve_stem

            # the weights' stem: an --image-size across 64 px would turn "auto" into the other one
            if resolve_stem("auto", args.image_size) != resolve_stem("auto", saved_size):
                cfg.model.stem = resolve_stem("auto", saved_size)
    else:
        preset = args.preset or _default_preset(args)
        cfg = build_config(preset, {field: getattr(args, dest, None) for dest, field in FLAG_FIELDS.items()})
    given_options = option_flags(args.loader_option)
    cfg.data.loader_options.update(given_options)
    if args.data is not None:  # saved in config.json and the checkpoint: a --resume from elsewhere finds it
        cfg.data.data = os.path.abspath(args.data)
    if saved is None and args.data is None and cfg.data.loader != "synthetic":
        # The demo set is CIFAR-sized: its own statistics, at its native size unless --image-size says
        # otherwise (the statistics are the data's: --image-size 32 gave ImageNet's to `--preset v2`)
        demo = AUG_PRESETS["demo"]
        size = demo.image_size if args.image_size is None else args.image_size
        cfg.data.aug = replace(cfg.data.aug, image_size=size, mean=demo.mean, std=demo.std)
    elif args.image_size is not None:
        cfg.data.aug = cfg.data.aug.with_size(args.image_size)
    if saved is not None and saved_run.checkpoint:
        from moco_fast.resume import check_epochs, check_same_model

        # here, with the flags: the run read its data (minutes on a large folder) and built the model
        # before resume.resume refused another --arch (or fewer --epochs than it finished), and
        # --print-config did not refuse it
        check_same_model(weights, cfg)
        check_epochs(saved_run.epochs, cfg)
    if saved is not None:
        # after the flags' own refusals: the line these name repeats every flag given, and run as printed
        # it met the refusal of one (another --arch) next
        _check_users_loader(cfg, weights["data"]["loader"], args, saved_run)
        _check_saved_loader_options(cfg, given_options, args, saved_run)
    return cfg, saved_run


def _check_users_loader(cfg, saved_loader: str, args: argparse.Namespace, saved_run) -> None:
    """A ConfigError where the resumed run was trained from Python with a loader of the user's
    (register_loader), which the CLI does not know (it runs no code of the user's): the loader, the
    module that registered it (data.loader_module, as the run recorded it) and how to resume it, from
    Python (one registered in __main__, resumed with --gpus: registered again at a script's top level or
    in an importable module, which the spawned workers run: loaders.import_loader_module). It said
    "unknown loader" alone; so it still does, with how to resume from Python (with --gpus: by an import,
    or registered again at a script's top level), for a loader the run did not record the module of (a
    run saved before data.loader_module). A --loader given now that is not the run's (`saved_loader`) is
    that flag's: check_loader's "unknown loader" alone. saved_run: the run's resume.SavedRun."""
    from moco_fast.loaders import available_loaders, unknown_loader

    loader, module = cfg.data.loader, cfg.data.loader_module
    if loader in available_loaders() or loader != saved_loader:
        return  # (a --loader given now that no loader has: check_loader's "unknown loader" alone)
    _flags_refused_first(cfg, args, saved_run)
    argv = ["train", *_resume_argv(args, cfg.runtime.device)]
    if not module:
        said = f"{unknown_loader(loader)}. A loader registered from Python (@register_loader) is one"
        how = "import the module that registers it (or run its @register_loader again)"
        if cfg.runtime.gpus > 1:
            # as for __main__ below: run again in a notebook or python -c, it fails in every --gpus worker
            how = (
                "import the module that registers it (or register it again at a script's top level: "
                "--gpus's workers run it)"
            )
    else:
        said = f"the run was trained with loader {loader!r}, registered by module {module} (@register_loader),"
        if module != "__main__":
            how = f"`import {module}` (which registers it)"
        elif cfg.runtime.gpus > 1:
            # its --gpus workers, spawned, cannot import __main__ (loaders.import_loader_module)
            how = "register it again at a script's top level or in an importable module (--gpus's workers import it)"
        else:
            how = "run its @register_loader again there (it was in a script or notebook: __main__)"
    said = f"--resume: {said} which this command cannot know: it runs no code of yours"
    run = f"`moco_fast.cli.main({argv!r})`"
    if launched_by_torchrun():  # the job's processes, each running it: rank 0 says how
        if (job := _torchrun_line("SCRIPT.py")) is None:
            raise ConfigError(said)
        run += f" in a SCRIPT.py that torchrun starts as it did this command: `{job}`"
    raise ConfigError(f"{said}. Resume it from Python: {how}, then {run}")


def _check_saved_loader_options(cfg, given: dict[str, str], args: argparse.Namespace, saved_run) -> None:
    """A ConfigError where a resumed run's saved --loader-option is one that today's checks refuse (a
    `batches_ahead=64` saved before its bound of 32), or that the device it resumes on does (DALI's
    decoder=mixed resumed with --device cpu, or with auto on a machine without a GPU): the error of each
    such option, and the --resume that replaces them all, which a --loader-option given now does (it said
    the refusal alone, as if the user had typed the value), with the --loader-option flags given now.
    --print-config checks auto as on a machine with a GPU, as check_flags. saved_run: the run's
    resume.SavedRun."""
    from moco_fast.loaders.options import check_loader_options, replaced_options

    cpu = _resumes_on_the_cpu(cfg, args)
    try:
        check_loader_options(cfg.data.loader, cfg.data.loader_options, cpu)
    except ConfigError:
        _flags_refused_first(cfg, args, saved_run)
        check_loader_options(cfg.data.loader, given, cpu)  # one given now that is refused: its own error
        refused = replaced_options(cfg.data.loader, cfg.data.loader_options, given, cpu)
        if not refused:
            raise
        # every refused one at once: naming the first alone, the next try met the second
        why = "; ".join(why for _, _, _, why in refused)
        saved = ", ".join(f"--loader-option {key}={saved}" for key, saved, _, _ in refused)
        # with those given now, which replace a saved one (the line without them met it again)
        options = [*given.items(), *((key, value) for key, _, value, _ in refused)]
        fixes = [arg for key, value in options for arg in ("--loader-option", f"{key}={value}")]
        line = _as_launched([*_resume_argv(args, cfg.runtime.device, loader_options=False), *fixes])
        said = f"{why}; the run was saved with {saved}"
        raise ConfigError(said if line is None else f"{said}: continue it with `{line}`") from None


def _resumes_on_the_cpu(cfg, args: argparse.Namespace) -> bool:
    """Whether the resumed run trains on the CPU: --device cpu, or auto on a machine without a GPU;
    --print-config takes auto as on a machine with one, as check_flags."""
    import torch

    from moco_fast.trainer import asks_for_the_cpu

    auto_on_the_cpu = cfg.runtime.device == "auto" and not args.print_config and not torch.cuda.is_available()
    return asks_for_the_cpu(cfg.runtime.device) or auto_on_the_cpu


def _flags_refused_first(cfg, args: argparse.Namespace, saved_run) -> None:
    """The refusals of the flags given (--lr=-1, --amp fp16 on the CPU...: trainer.check_flags_on, which
    the run makes before it checks the loader; a --gpus N that this machine's GPUs cannot start, a --device
    cuda, given or saved, on a machine without one), before a refusal of the resumed run's saved loader that
    names a line to continue it: that line repeats every flag given, and run as printed it met the refusal
    of one of them next. --print-config leaves the GPUs alone: its config may be for another machine."""
    import torch

    from moco_fast.launch import check_local_gpus
    from moco_fast.trainer import check_flags_on, resolve_device

    where = _where_to_resume(args.device, args.gpus, cfg.runtime.device)
    if not args.print_config:
        # the line's --device (a contradiction with the run's saved one made right) and --gpus, as run()
        # checks them next: `--resume --gpus 2` or --device cuda on a machine without a GPU named a line
        # that met "this machine has 0 CUDA GPUs" or "no CUDA GPU is available"
        device = where[where.index("--device") + 1] if "--device" in where else cfg.runtime.device
        if "--gpus" in where:  # the launcher's check, as run() makes it first (its workers resolve the device)
            check_local_gpus(replace(cfg, runtime=replace(cfg.runtime, device=device, gpus=int(where[-1]))))
        else:
            resolve_device(device)
    device = torch.device("cpu" if _resumes_on_the_cpu(cfg, args) else "cuda")
    check_flags_on(cfg, device, launch_world(cfg), saved_run)


def _as_launched(argv: list[str]) -> str | None:
    """The shell line that runs `moco-fast train ARGV` as this command runs: under torchrun, the torchrun
    command (_torchrun_line), which continues the run as it ran (`moco-fast train` alone was one
    process); None on its ranks but 0, which leave the line to rank 0 (every rank ends with the error:
    N copies of it). A group started by hand (RANK, WORLD_SIZE...) runs the line as it is in each of
    its processes."""
    line = shlex.join(argv)
    if not launched_by_torchrun():
        return f"moco-fast train {line}"
    return _torchrun_line(f"-m moco_fast train {line}")


def _torchrun_line(program: str) -> str | None:
    """This torchrun job's command for `program`, with its processes a machine (--nproc_per_node) and
    machines (--nnodes), on rank 0; None on the other ranks."""
    from moco_fast.distributed import local_world_size
    from moco_fast.launch import torchrun_command

    if os.environ.get("RANK", "0") != "0":
        return None
    nodes = os.environ.get("GROUP_WORLD_SIZE", "1")  # torchrun's count of machines (its agents)
    return torchrun_command(local_world_size(), program, int(nodes) if nodes.isdigit() else 1)


def _resume_argv(args: argparse.Namespace, device: str, loader_options: bool = True) -> list[str]:
    """The --resume (and --out, --device, --gpus, --force, then every other flag given) of this command
    line, as arguments: what a line that says how to go on names (shlex.join'ed for a shell; as they are
    for moco_fast.cli.main: _check_users_loader). --device and --gpus too: run as written, it resumes where
    and as this one would (a saved cuda, on a machine without one, stopped it; a saved --gpus 8 came
    back), less what the CLI would refuse of them (_where_to_resume). The other flags given (_given_flags;
    the --loader-option ones where `loader_options`): the line left them out, and run as written it
    resumed without them (`--epochs 2` given to extend a run of 1: "nothing to do"). `device`: the run's,
    given or saved."""
    options = (args.loader_option or []) if loader_options else []
    return [
        *(_flag("--resume", args.resume) if args.resume != "auto" else ["--resume"]),
        *(_flag("--out", args.out) if args.out else []),
        *_where_to_resume(args.device, args.gpus, device),
        # with --resume PATH, --force continues PATH's run in an --out that holds another one (the line
        # without it was refused there); with --resume of --out's own run, --force is refused already
        *(["--force"] if args.force and args.resume != "auto" else []),
        *_given_flags(args),
        *(arg for option in options for arg in ("--loader-option", option)),
    ]


# the flags that _given_flags leaves out: _resume_argv's own (--force a store_true, repeated with a
# --resume PATH alone), and --print-config, of a command that does not go on (it only prints the config)
_NOT_REPEATED = {"help", "resume", "out", "device", "gpus", "loader_option", "force", "print_config"}


@functools.cache
def _flags() -> tuple[argparse.Action, ...]:
    """train's flags, as its parser has them (register)."""
    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    return tuple(sub.choices["train"]._actions)


def _given_flags(args: argparse.Namespace) -> list[str]:
    """The flags of `args` given on its command line (each defaults to None) as arguments, in the
    parser's order, less _NOT_REPEATED."""
    given = []
    for action in _flags():
        value = getattr(args, action.dest, None)
        if value is None or action.dest in _NOT_REPEATED:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):  # (--mlp, --no-mlp)
            given.append(action.option_strings[0 if value else 1])
        else:
            given += _flag(action.option_strings[0], str(value))
    return given


def _flag(option: str, value: str) -> list[str]:
    """`option value` as arguments; one `option=value` where the value starts with "-" (a --data
    -odd/ folder): argparse takes it for a flag of its own, and the line as printed was refused."""
    return [f"{option}={value}"] if value.startswith("-") else [option, value]


def _where_to_resume(given_device: str | None, gpus: int | None, device: str) -> list[str]:
    """The --device and --gpus given (`given_device`, `gpus`; None where not given), for a line that
    continues the run on `device` (the one given, else the run's saved one), with a contradiction that
    launch.check_gpus_flag refuses made right as it says: the line, run as written, met that error
    next (`--device cpu --gpus 1`). A --gpus given is repeated whatever its count, as one process at
    least: left out, the line resumed with the run's saved count; but not --gpus 0 on a machine without
    a GPU (device auto), where --gpus 1 met "this machine has 0 CUDA GPUs" and one process is what runs."""
    import torch

    from moco_fast.launch import under_torchrun

    where = ["--device", given_device] if given_device else []
    if gpus is None or under_torchrun():  # under torchrun --nproc_per_node sets the count: no --gpus
        return where
    if device == "cpu" and (given_device or gpus < 1):
        return where  # --gpus 1 on the CPU: "drop --gpus" (more CPU processes are torchrun's, not a flag)
    if gpus < 1 and device == "auto" and not torch.cuda.device_count():
        # left out, a saved --gpus N this machine cannot start continues in one process too (_gpus_to_resume_with)
        return where
    if device not in ("auto", "cuda"):  # a saved cpu or a cuda:1 given: --gpus N chooses its own GPUs
        where = ["--device", "cuda"]
    return [*where, "--gpus", str(max(gpus, 1))]


def _default_preset(args: argparse.Namespace) -> str:
    return "demo" if args.data is None and args.loader in (None, "torch", "resident") else "v2"


def _resumed_config(args: argparse.Namespace):
    """(the config saved in the checkpoint that --resume will continue, its resume.SavedRun), (that of
    the run's config.json before its first checkpoint, its SavedRun), or (None, None): no --resume, or
    nothing to resume yet."""
    if args.resume is None:
        return None, None
    from moco_fast import checkpoint as ckpt
    from moco_fast.config import RuntimeConfig
    from moco_fast.data import DataError
    from moco_fast.resume import SavedRun
    from moco_fast.run_folder import continues_in

    # without --out: the folder a fresh run with these flags would write (the demo preset's is runs/demo)
    preset = args.preset or _default_preset(args)
    out = args.out or PRESETS[preset].get("runtime.out", RuntimeConfig.out)
    path = ckpt.find_resume(args.resume, out)
    if path is None:
        return _config_before_a_checkpoint(args, Path(out))
    run_out = args.out or str(path.parent)
    if args.force and continues_in(Path(run_out), path):
        # --force was dropped: the run went on (or, finished, did nothing) where a fresh one was asked for
        raise ConfigError(
            f"--resume continues the run in {run_out} and --force would replace it: drop --force to continue "
            "it, or --resume to start a fresh run there"
        )
    state = ckpt.load(path, map_location="cpu", mmap=True)  # its config: the weights are read by resume
    if not isinstance(state.get("config"), dict):
        raise DataError(f"--resume: {path} is not a moco-fast training checkpoint")
    return _continued(ckpt.saved_config(state, path), run_out, args), SavedRun.of(state)


def _continued(cfg, out: str, args: argparse.Namespace):
    """A saved config (a checkpoint's, a config.json) as the run that --resume continues in `out`."""
    cfg.runtime.out = out
    cfg.runtime.resume = args.resume
    cfg.runtime.force = False
    return cfg


def _config_before_a_checkpoint(args: argparse.Namespace, out: Path):
    """`--resume` where there is no checkpoint yet: the run there starts over with the settings of its
    config.json (a run stopped or killed before its first save: in its setup, before the first
    --log-every sync, within the first epoch of a loader that saves at epoch ends only), the flags
    given changing them as they would a checkpoint's, and its resume.SavedRun. (None, None) where there
    is no config.json but the command line describes a run (a job script that passes --resume and its
    flags at every launch); a ConfigError where it gives nothing to train (`--resume --out` with a
    mistyped folder trained the default recipe)."""
    from moco_fast.checkpoint import CHECKPOINT_NAME
    from moco_fast.config import from_dict
    from moco_fast.data import DataError
    from moco_fast.resume import SavedRun
    from moco_fast.run_folder import CONFIG_NAME, read_run_config, stopped_before_its_first_checkpoint

    saved = out / CONFIG_NAME
    if not saved.is_file():
        # what a run trains (its data, model, MoCo and optimisation flags) describes it; where and how it
        # runs (--device, --gpus, --workers, --amp, the kNN monitor...) does not: `--resume --device cpu`
        # on a mistyped --out trained the default recipe there
        given = [d for d, f in FLAG_FIELDS.items() if f in RUN_FIELDS and getattr(args, d, None) is not None]
        if not given and args.preset is None and args.image_size is None and not args.loader_option:
            raise ConfigError(
                f"--resume: {out} holds no run to resume (no {CHECKPOINT_NAME}, no {CONFIG_NAME}): check --out, "
                "or give the run's flags (--data, --preset, --epochs...) to start it there"
            )
        return None, None
    try:
        obj = read_run_config(saved)
        cfg, run = from_dict(obj), SavedRun.of_config(obj)
    except ConfigError:  # a ValueError that says what is wrong already (not a run's config.json)
        raise
    except (TypeError, AttributeError, ValueError) as e:  # not a run's config.json, or one edited by hand
        raise DataError(
            f"--resume: {saved} cannot be read ({e}): correct it, move it away, or choose another --out"
        ) from None
    if stopped_before_its_first_checkpoint(out):  # else check_output refuses it: the checkpoint is gone
        log.info("--resume: %s has no checkpoint yet; its run starts over with the settings of %s", out, saved)
    return _continued(cfg, str(out), args), run


def _gpus_to_resume_with(cfg) -> int:
    """The worker count of a resumed run trained with --gpus N and resumed without --gpus: N again
    where this launch can start N workers, else one process (under torchrun, --nproc_per_node sets
    the count). A checkpoint resumes with any number of workers; the saved N is not a requirement."""
    from moco_fast.launch import check_local_gpus, under_torchrun

    n = cfg.runtime.gpus
    if under_torchrun():
        log.info("--resume: the run was trained with --gpus %d; under torchrun --nproc_per_node sets the count", n)
        return 1
    try:
        return check_local_gpus(cfg)
    except ConfigError as e:
        log.warning(
            "--resume: the run was trained with --gpus %d, which this launch cannot start (%s); "
            "it continues in one process (--gpus M or torchrun for more)",
            *(n, e),
        )
        return 1


def _workers_to_resume_with(cfg, printed: bool) -> int:
    """The --workers of a resumed run not given the flag again: its saved count, or where this machine's
    cores take fewer (trainer.check_workers refuses more), the most they take, with one line. The count
    is where the run ran (a larger machine), not what it trains: it goes on, as with a saved --gpus N
    that this machine cannot start, where a refusal named a --workers nobody had typed. What runs is
    what config.json and the checkpoint record, so a later resume on the larger machine continues with
    the lowered count: the line says so, and how to have the run's own back (`printed`: --print-config,
    which writes nothing, so that it is recorded when the run goes on)."""
    from moco_fast.cores import available_cores, in_each, most_workers
    from moco_fast.text import plural

    processes = local_processes(cfg)
    most = most_workers(processes)
    if cfg.data.workers <= most:
        return cfg.data.workers
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank runs the command: rank 0 says it
        log.warning(
            "--resume: the run was configured with --workers %d, more than this machine's %s take: it continues "
            "with %d%s, the most they take, which its config.json and checkpoint record %s (--workers N "
            "to choose, here or where it resumes next)",
            *(cfg.data.workers, plural(available_cores(), "CPU core"), most),
            in_each(processes),
            "when it goes on" if printed else "from now on",
        )
    return most


def _shuffle_bn_where_sync_bn_stops(cfg, saved_world: int) -> None:
    """A run of several processes trained with --sync-bn, which replaced shuffle BN (config.as_run), and
    its config records shuffle BN off. Resumed where sync BN does nothing (one process) or is turned
    off, it kept that and trained with neither: the keys could cheat through their batch's statistics.
    Shuffle BN is on again, with one line for it all (resume.sync_bn_stops: the changed settings and
    the line of --sync-bn in one process leave it to this one), also where --shuffle-bn asks for it;
    the caller leaves an explicit --no-shuffle-bn alone. A run written by one process asked for no
    shuffle BN. saved_world: resume.SavedRun's."""
    from moco_fast.resume import sync_bn_stops

    if not sync_bn_stops(True, saved_world, cfg, launch_world(cfg)):
        return
    cfg.moco.shuffle_bn = True
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank runs the command: rank 0 says it
        why = "in one process sync BN does nothing" if cfg.runtime.sync_bn else "--no-sync-bn turns it off"
        log.warning(
            "--resume: the run's --sync-bn across %d processes replaced shuffle BN; %s, so shuffle BN is on "
            "again (--no-shuffle-bn keeps it off)",
            *(saved_world, why),
        )


def launch_world(cfg) -> int:
    """The processes the run starts: --gpus N's workers, else the group the environment describes (a
    WORLD_SIZE without RANK: one process, as train runs)."""
    from moco_fast.join import env_world_size

    return cfg.runtime.gpus if cfg.runtime.gpus > 1 else env_world_size()


def local_processes(cfg) -> int:
    """This machine's training processes, which share its cores: --gpus N's workers, else torchrun's
    (LOCAL_WORLD_SIZE), else one."""
    from moco_fast.distributed import local_world_size

    return cfg.runtime.gpus if cfg.runtime.gpus > 1 else local_world_size()


def _said_if_refused_here(check) -> None:
    """--print-config: what the run would refuse on this machine (its GPUs, its cores) but the config may be
    for another machine: one warning line, the config printed all the same."""
    from moco_fast.config import ConfigError

    try:
        check()
    except ConfigError as e:
        log.warning("a run on this machine would stop here: %s", e)


def run(args: argparse.Namespace) -> int:
    cfg, saved_run = configured(args)
    warn_unused(args, cfg.moco.mechanism, cfg.moco.shuffle_bn)
    if args.print_config:
        from moco_fast.config import as_run
        from moco_fast.join import check_group_env, describes_group
        from moco_fast.launch import check_gpus_flag, check_local_gpus
        from moco_fast.trainer import check_flags, check_workers, with_loader_module

        # what the run would refuse before its first step, as far as the flags and the environment that
        # describes its group decide it: not the data or the GPUs, which may be those of another machine
        # (GPUs this one lacks for --gpus, --workers past its cores: one line each). Its processes: --gpus
        # N's workers, else the group the environment describes (launch_world). In the run's order: --gpus
        # first (under a group it is refused, before any join), then the group, the flags, the workers
        if args.gpus is not None:
            check_gpus_flag(cfg)
            _said_if_refused_here(lambda: check_local_gpus(cfg))
        if describes_group():
            check_group_env()
        world = launch_world(cfg)
        options = check_flags(cfg, world, saved_run)
        _said_if_refused_here(lambda: check_workers(cfg.data.workers, local_processes(cfg), options))

        # under torchrun every rank checks, rank 0 alone prints; a RANK without WORLD_SIZE joins no group
        # (join.describes_group): the one process prints, where it printed nothing and returned 0
        if not describes_group() or os.environ["RANK"] == "0":
            # a user's loader's module too (run from Python), which config.json records (train, launch_local)
            print(json.dumps(to_dict(with_loader_module(as_run(cfg, world))), indent=2))
        return 0
    if args.gpus is not None:  # asked for: checked (count, device, torchrun) even for one
        from moco_fast.launch import check_local_gpus

        check_local_gpus(cfg)
    if cfg.runtime.gpus > 1:
        from moco_fast.cli import command_paths
        from moco_fast.launch import launch_local

        with _saved_data_named(args, cfg, saved_run):
            rc, row = launch_local(cfg, command_paths(args), saved_run)  # named by a worker's EIO without a file
        if rc == 0:
            _report(row, cfg)
        return rc
    from moco_fast.trainer import train

    with _saved_data_named(args, cfg, saved_run):
        row = train(cfg, saved_run)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone reports
        _report(row, cfg)
    return 0


@contextlib.contextmanager
def _saved_data_named(args: argparse.Namespace, cfg, saved_run):
    """A resumed run's saved --data that is gone (its folder moved): the data's error says that it is
    the run's --data and how to continue the run on the new path; it named an old path the user never
    typed. Said where the data is opened, not checked before: --print-config reads no data."""
    from moco_fast.data import DataError
    from moco_fast.launch import WorkerUserError

    try:
        yield
    except (DataError, WorkerUserError) as e:
        data = cfg.data.data
        if saved_run is None or args.data is not None or not data or data not in str(e) or Path(data).exists():
            raise
        # the message replaced in place, not the error rebuilt as type(e)(text): its class and fields
        # stay, and a class whose constructor takes other arguments (checkpoint.Damaged's path and
        # record) ended as a TypeError
        again = _resume_argv(args, cfg.runtime.device)
        if args.out is None and args.resume == "auto":
            # the run's folder named: --data NEW_PATH picks another default preset, and with it another
            # default --out (v2's runs/moco for the demo's runs/demo), where the line found no run
            again[1:1] = _flag("--out", cfg.runtime.out)
        said = f"{e} (the --data the run was trained with, which --resume reads where no --data is given"
        line = _as_launched([*again, "--data", "NEW_PATH"])
        e.args = (f"{said})" if line is None else f"{said}; if its images moved, `{line}` continues the run there)",)
        raise e from None


def _report(row: dict, cfg) -> None:
    from moco_fast.checkpoint import CHECKPOINT_NAME
    from moco_fast.metrics import rate
    from moco_fast.trainer import nothing_to_train

    if not row:  # the command's last line, the one line that says so (train logs nothing of it)
        print(f"nothing to do: {nothing_to_train(cfg)}")
        return
    checkpoint = Path(cfg.runtime.out) / CHECKPOINT_NAME  # where the run's weights are: its summary says so
    print(
        f"finished epoch {row['epoch']}: loss {row['loss']:.4f}, {rate(row['img_per_s'])} img/s; checkpoint {checkpoint}"
    )
    knn = f"k={row.get('knn_k', cfg.runtime.knn_k)}, t={cfg.runtime.knn_t:g}"  # knn_k: the k used
    if "final_knn_top1" in row:
        line = f"kNN top-1 ({knn}, trained backbone): {row['final_knn_top1']:.2f}%"
        if "random_knn_top1" in row:
            line += f"   random-init backbone: {row['random_knn_top1']:.2f}%"
        print(line)
    if "final_knn_head_top1" in row:
        print(f"kNN top-1 ({knn}, trained head output): {row['final_knn_head_top1']:.2f}%")
    elif "final_knn_top1" not in row and cfg.runtime.final_knn:
        # no eval split to measure on (a .beton, shards, synthetic data, a folder without val/ or test/):
        # the run ends without a figure or summary.json, so say how to get one
        from moco_fast.monitor import NO_EVAL_IMAGES, knn_data

        data, what = knn_data(cfg)
        print(
            f"no final kNN: {NO_EVAL_IMAGES}; "
            f"for a figure run `moco-fast knn --checkpoint {shlex.quote(str(checkpoint))} --data {data}`{what}"
        )
