"""Throughput of MoCo pretraining, one table per run: loader-only, trainer-only, end-to-end, and the
official-style reference step on the same device, with every step row also a ratio to the reference
and every loader row a ratio to the fastest step row (above 1: the loader outpaces that step).

    python bench/throughput.py                                  # GPU: ResNet-50, MoCo v2, batch 256, bf16
    python bench/throughput.py --loader synthetic --rows reference,trainer:fp16,trainer:bf16+compile+graph
    python bench/throughput.py --device cpu --arch resnet18     # CPU smoke run (64 px, batch 16, < 1 min)

Each row warms up, synchronizes, times `--steps` steps and synchronizes again (nanoGPT's bench.py).
On a GPU the row also reports peak allocated memory and, from NVML (pynvml), the mean utilisation,
memory-bus utilisation and power, and the most device memory used while it ran.
The JSON (`--json`) is rewritten after every row, so a run cut short still leaves its finished rows;
its `complete` is true only once every row ran.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package

from before_rows import interrupted_before_rows, stopped_before_rows

with interrupted_before_rows():  # torch takes seconds to import: a Ctrl-C here is one line too
    import torch
    from gpu_stats import GpuSampler
    from moco_fast.loaders import LoaderArgs, create_loader
    from reference_step import build_reference, reference_step
    from report import (
        NOT_RUN,
        add_ratios,
        check_output_path,
        device_info,
        each_warning_once,
        forever,
        format_table,
        ratio_notes,
        speed_text,
        write_json,
    )
    from row_specs import DEFAULT_ROWS, MODIFIERS, RowSpec, parse_rows

    from moco_fast.backbone import BN_KERNELS
    from moco_fast.cli import log_as_lines
    from moco_fast.config import ConfigError, build_config, check_at_least, check_image_size, to_dict
    from moco_fast.data import DataError, DataSplits
    from moco_fast.model import MoCo
    from moco_fast.trainer import (
        GraphedStep,
        StepState,
        check_cuda_graph,
        make_optimizer,
        resolve_amp,
        resolve_device,
        resolve_workers,
        train_step,
        validate,
    )


# --profile's steps under the profiler where --profile-steps is not given.
PROFILE_STEPS = 3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, warmup: int, steps: int, batch: int, device: torch.device, peak_from_warmup: bool = False) -> dict:
    """`peak_from_warmup`: the peak memory counts the warm-up too. A CUDA graph's replays allocate
    nothing (its activations live in the pool the capture, during warm-up, allocated), so for graph
    rows the steady-state peak would leave them out."""
    if device.type == "cuda" and peak_from_warmup:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda" and not peak_from_warmup:  # the steady state's, not cuDNN's search
        torch.cuda.reset_peak_memory_stats(device)
    with GpuSampler(device) as gpu:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        dt = time.perf_counter() - t0
    row = {"img_per_s": batch * steps / dt, "ms_per_step": dt / steps * 1000, "steps": steps, "warmup": warmup}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    row.update(gpu.summary())
    return row


class Bench:
    def __init__(self, args: argparse.Namespace, cfg, device: torch.device, splits: DataSplits | None):
        """`splits`: --data as check_data listed it, which every loader row reads (None: no row
        reads an image folder)."""
        self.args, self.cfg, self.device, self.splits = args, cfg, device, splits
        self.workers = resolve_workers(cfg.data.workers, device)

    def loader(self, amp_dtype, channels_last: bool, synthetic: bool = False):
        args = loader_args(self.cfg, self.device, self.workers, self.splits)
        # the epochs a row's batches can cross (forever's, a step each at least), which the trainer gives
        # its loader as a run's: the torch loader's workers start each next one's first batch ahead
        epochs = self.args.warmup + self.args.steps
        args = replace(args, dtype=amp_dtype or torch.float32, channels_last=channels_last, epochs=epochs)
        if synthetic:
            args = replace(args, splits=None, options={})
        return create_loader("synthetic" if synthetic else self.cfg.data.loader, args)

    def step(self, spec: RowSpec, amp_dtype, num_images: int):
        """The moco_fast step as the trainer builds it; returns (step(batch), model, optimizer)."""
        c, device = self.cfg, self.device
        if spec.graph:
            check_cuda_graph(device)
        moco = c.moco if spec.shuffle_bn else replace(c.moco, shuffle_bn=False)
        model = MoCo(
            c.model, moco, c.data.aug.image_size, num_images, momentum_backend=spec.momentum, bn_kernel=spec.bn_kernel
        )
        model = model.to(device)
        if spec.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, c, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        if spec.compile:
            model.encoder_q.compile()
            if model.encoder_k is not None:
                model.encoder_k.compile()
        s = StepState(model, optimizer, scaler, amp_dtype, device)
        if spec.graph:
            return GraphedStep(s, c.moco.m), model, optimizer
        return (lambda batch: train_step(s, batch, c.moco.m)), model, optimizer

    def run(self, spec: RowSpec) -> dict:
        a, c, device = self.args, self.cfg, self.device
        amp_dtype = None if spec.kind == "reference" else resolve_amp(spec.amp, device)
        row = {"name": spec.name, "kind": spec.kind, "settings": spec.settings(amp_dtype, self.workers, c.data.loader)}
        if spec.kind != "loader":
            row["shuffle_bn"] = spec.shuffle_bn
            row["bn_kernel"] = spec.bn_kernel if spec.split_bn else None  # None: no split BN ran
        n = c.optim.batch_size
        it = None
        if spec.kind == "reference":
            model, optimizer = build_reference(c, device, shuffle_bn=spec.shuffle_bn)
            shape = (n, 3, c.data.aug.image_size, c.data.aug.image_size)
            x1, x2 = torch.randn(shape, device=device), torch.randn(shape, device=device)
            row.update(timed(lambda: reference_step(model, optimizer, x1, x2), a.warmup, a.steps, n, device))
        elif spec.kind == "loader":
            it = forever(self.loader(amp_dtype, spec.channels_last))
            row.update(timed(lambda: next(it), a.warmup, a.steps, n, device))
        else:
            loader = self.loader(amp_dtype, spec.channels_last, synthetic=spec.kind == "trainer")
            step, model, optimizer = self.step(spec, amp_dtype, loader.num_images)
            if spec.kind == "trainer":
                batch = next(iter(loader))
                fn = lambda: step(batch)  # noqa: E731
            else:
                it = forever(loader)
                fn = lambda: step(next(it))  # noqa: E731
            row.update(timed(fn, a.warmup, a.steps, n, device, peak_from_warmup=spec.graph))
            if a.profile and spec.kind == "trainer" and not spec.graph and not self.profiled:
                from profile_step import profile_breakdown

                self.profiled = True
                row["profile"] = profile_breakdown(
                    fn, model, optimizer, device, steps=a.profile_steps, unprofiled_ms=row["ms_per_step"]
                )
        if it is not None:
            it.close()  # stops DataLoader workers now, not at garbage collection
        return row

    profiled = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        # one paragraph each, wrapped by argparse to the terminal (raw, the epilog was one 540-character line)
        description=" ".join(__doc__.split("\n\n")[0].split()),
        epilog="Rows (--rows, comma-separated): loader (iterate the loader), trainer (the moco_fast step on one "
        "fixed synthetic batch), end-to-end (loader + step), reference (bench/reference_step.py: fp32, NCHW, "
        "per-parameter EMA loop, queue pointer read on the host). A row takes modifiers after a colon, joined "
        f"by '+': {', '.join(MODIFIERS)}; e.g. trainer:fp16+compile+graph (triton: the EMA's kernel; "
        "bntriton: split BN's, opt-in, its GPU speed unmeasured). CPU defaults: 64 px, batch 16, "
        "the ImageNet stem (the CIFAR stem at 64 px costs 16x), 1 warm-up and 3 timed steps.",
    )
    B = argparse.BooleanOptionalAction
    p.add_argument("--loader", default="torch", help="torch | resident | dali | ffcv | synthetic (default torch)")
    p.add_argument(
        "--data", help="data root, or a .beton for ffcv (which needs it); default: the demo set in the package"
    )
    p.add_argument("--workers", type=int, default=-1, help="data workers; -1: as the trainer picks (default)")
    p.add_argument(
        "--loader-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a backend option, as `moco-fast train --loader-option` takes it (repeatable, each KEY once)",
    )
    p.add_argument("--arch", default="resnet50", help="torchvision ResNet, or resnet50w2/resnet50w4 (default resnet50)")
    p.add_argument("--preset", default="v2", help="config preset: v1, v2, cifar, demo (default v2)")
    p.add_argument("--stem", choices=["auto", "imagenet", "cifar"], help="default: the preset's; imagenet on CPU")
    p.add_argument("--batch-size", type=int, help="per device (default 256; 16 on the CPU)")
    p.add_argument("--image-size", type=int, help="crop size (default: the preset's; 64 on the CPU)")
    p.add_argument("--moco-k", type=int, help="queue length (default: the preset's, 65536)")
    p.add_argument("--bn-splits", type=int, help="split-BN sub-batches (default: the preset's, 8)")
    p.add_argument(
        "--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="auto (default): bf16 on GPU, off on CPU"
    )
    p.add_argument("--channels-last", action=B, default=True, help="channels-last (default on)")
    p.add_argument(
        "--compile",
        action=B,
        default=False,
        help="torch.compile the encoders (default off; a row's +compile/+eager overrides)",
    )
    p.add_argument(
        "--cuda-graph",
        action=B,
        default=False,
        help="capture the whole step as a CUDA graph (default off; +graph/+eager per row)",
    )
    p.add_argument(
        "--momentum-backend", default="foreach", help="EMA kernel: foreach, triton, apex, reference (default foreach)"
    )
    p.add_argument(
        "--bn-kernel",
        default="torch",
        choices=BN_KERNELS,
        help="split BN's kernel: torch (default) or triton (opt-in, its GPU speed unmeasured); per row +bntorch/+bntriton",
    )
    p.add_argument("--steps", type=int, help="timed steps per row (default 30; 3 on the CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 10; 1 on the CPU)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: cuda where there is one)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"rows to run (default {DEFAULT_ROWS})")
    p.add_argument("--json", help="write the results here, a .json file (rewritten after every row)")
    p.add_argument("--plot", help="write a bar chart of the rows here, a .png file (needs matplotlib)")
    p.add_argument("--profile", action="store_true", help="profile breakdown of the first eager trainer row")
    p.add_argument(
        "--profile-steps", type=int, help=f"steps under the profiler, with --profile (default {PROFILE_STEPS})"
    )
    return p


def default(value, fallback):
    """The flag's value where given (0 included: it is checked, not replaced), else the fallback."""
    return fallback if value is None else value


OPTIONAL_BACKENDS = ("triton", "apex")  # registered only where they can run


def check_specs(specs: list[RowSpec], args: argparse.Namespace, device: torch.device) -> None:
    """What each row needs, checked before the first row runs (a run must not die at row 3 of 10)."""
    from moco_fast.kernels.momentum import MOMENTUM_BACKENDS
    from moco_fast.loaders import available_loaders

    names = [s.name for s in specs]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"--rows names {dup!r} twice")
    if args.loader not in available_loaders():
        raise ConfigError(f"--loader {args.loader!r}: choose from {', '.join(available_loaders())}")
    if args.bn_kernel == "triton" and args.bn_splits == 1:
        raise ConfigError("--bn-kernel triton: --bn-splits 1 runs plain BN, with no split BN for its kernel")
    for spec in specs:
        # a row's own +graph or +fp16 on a CPU names the row: "drop --cuda-graph" or "use --amp bf16"
        # would name a flag that was not given
        own = spec.name.partition(":")[2].split("+")
        if spec.graph and device.type != "cuda" and "graph" in own:
            raise ConfigError(
                f"--rows: {spec.name!r}: graph captures the step on a CUDA GPU; the device is {device}: "
                "drop +graph from it"
            )
        if spec.amp == "fp16" and device.type == "cpu" and "fp16" in own:
            raise ConfigError(f"--rows: {spec.name!r}: fp16 needs a GPU; use +bf16 or +fp32 in it on the CPU")
        if spec.graph:
            check_cuda_graph(device)
        if spec.kind == "reference":
            continue
        resolve_amp(spec.amp, device)
        if spec.split_bn and spec.bn_kernel == "triton":
            check_split_bn_kernel(spec, device)
        if spec.kind != "loader" and spec.momentum not in MOMENTUM_BACKENDS:
            if spec.momentum not in OPTIONAL_BACKENDS:  # a typo: nothing runs
                raise ConfigError(
                    f"{spec.name}: unknown momentum backend {spec.momentum!r}; "
                    f"choose from {', '.join(sorted({*MOMENTUM_BACKENDS, *OPTIONAL_BACKENDS}))}"
                )
            # a backend this machine lacks fails its own rows only (the others of a GPU run stay)
            print(f"warning: {spec.name}: momentum backend {spec.momentum!r} is not available here", file=sys.stderr)
    if args.profile_steps is None:
        args.profile_steps = PROFILE_STEPS
    elif not args.profile:  # it was read by nothing, without a word
        raise ConfigError(
            f"--profile-steps {args.profile_steps} sets the steps of --profile: add --profile, or drop it"
        )
    if args.profile:
        check_at_least("--profile-steps", args.profile_steps, 1)
    if args.profile and not any(s.kind == "trainer" and not s.graph for s in specs):
        raise ConfigError("--profile profiles the first eager trainer row, and --rows has none (add trainer)")


def check_split_bn_kernel(spec: RowSpec, device: torch.device) -> None:
    """A row on split BN's triton kernel needs a device the kernels run on (a GPU, or the CPU under
    TRITON_INTERPRET=1). One without split BN (noshuffle, --bn-splits 1) refused its bntriton in
    parse_rows; --bn-kernel triton with --bn-splits 1, in check_specs."""
    from moco_fast.kernels.momentum_triton import check_device

    try:
        check_device(device, "split BN's kernel 'triton'")
    except ValueError as e:
        raise ConfigError(f"--rows: {spec.name!r}: {e}") from None


def loader_args(cfg, device: torch.device, workers: int, splits: DataSplits | None = None) -> LoaderArgs:
    """What every loader row's loader is given (Bench.loader sets its dtype and memory format), and
    what check_data lists --data with: one place, since loaders.base.listed_splits refuses a listing
    made with other options than its loader's."""
    return LoaderArgs(
        data=cfg.data.data,
        aug=cfg.data.aug,
        batch_size=cfg.optim.batch_size,
        device=device,
        workers=workers,
        seed=cfg.runtime.seed,
        synthetic_steps=1,
        check_images=False,  # the trainer checks files; a benchmark should not time that
        eval_split="skip",  # no row evaluates: an ImageNet val/ not yet sorted into classes is no error
        splits=splits,
        options=dict(cfg.data.loader_options),
    )


def warn_unread(args: argparse.Namespace, specs: list[RowSpec]) -> None:
    """One line for --data or --workers given where no row reads them (`--loader synthetic --workers
    8` ran as if the workers made its batches): the synthetic loader makes its batches without data
    or workers; trainer and reference rows step on one synthetic batch."""
    from moco_fast.loaders.synthetic import DATA_UNREAD

    if args.loader == "synthetic":
        if args.data is not None:
            print(f"warning: {DATA_UNREAD % args.data}", file=sys.stderr)
        if args.workers != -1:
            print(
                f"warning: --workers {args.workers} has no effect with --loader synthetic: it makes its batches "
                "without workers",
                file=sys.stderr,
            )
    elif not any(s.kind in ("loader", "end-to-end") for s in specs):
        for flag, value in (("--data", args.data), ("--workers", None if args.workers == -1 else args.workers)):
            if value is not None:
                print(
                    f"warning: {flag} {value} has no effect: no row of --rows reads data (only loader and "
                    "end-to-end rows do)",
                    file=sys.stderr,
                )


def check_data(cfg, device: torch.device) -> DataSplits | None:
    """The loader rows' data, listed before the first row runs (without decoding or building a
    loader: the resident loader alone would decode the whole set). Returns the listing of an image
    folder, which every loader row reads (Bench.loader): listed once, not once more per row (minutes
    each on ImageNet); None for a .beton, a shard set or synthetic data."""
    from moco_fast.loaders.base import listed_splits
    from moco_fast.loaders.wds import beton_file, is_wds_root

    loader, data = cfg.data.loader, cfg.data.data
    if loader == "ffcv":
        beton_file(data)  # DataError: none, missing, a folder, a shard set
    elif loader != "synthetic" and not is_wds_root(data):
        # DataError: missing, a file, empty, no classes
        return listed_splits(loader_args(cfg, device, workers=0))  # as the rows' loaders list it
    return None


def make_config(args: argparse.Namespace, device: torch.device):
    from moco_fast.loaders.options import option_flags

    cpu = device.type == "cpu"
    overrides = {
        "model.arch": args.arch,
        "model.stem": args.stem or ("imagenet" if cpu else None),
        "moco.k": args.moco_k,
        "moco.bn_splits": args.bn_splits,
        "optim.batch_size": default(args.batch_size, 16 if cpu else 256),
        "data.loader": args.loader,
        "data.data": args.data,
        "data.workers": args.workers,
        "runtime.device": str(device),
    }
    cfg = build_config(args.preset, overrides)
    cfg.data.loader_options.update(option_flags(args.loader_option))
    size = default(args.image_size, 64 if cpu else None)
    if size is not None:
        cfg.data.aug = cfg.data.aug.with_size(size)
    validate(cfg, 1)
    return cfg


def row_done(row: dict) -> str:
    """A finished row's figure on the progress line, as the table shows it (report.speed_text: a wide
    network on a CPU makes under 1 img/s, which ",.0f" showed as 0), or its error."""
    if not row.get("img_per_s"):
        return row.get("error", "")
    return f"{speed_text(row['img_per_s'])} img/s"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_as_lines(logging.WARNING)  # the data listing's warnings as the CLI writes them; no INFO among the rows
    with each_warning_once():  # each loader row decodes the data again (resident, DALI): its warnings too
        try:
            device = resolve_device(args.device)
            if args.device == "auto" and device.type == "cpu":  # the README's bare command measures a GPU
                print(
                    "no CUDA GPU here: the rows run on the CPU, at its defaults where no flag sets them",
                    file=sys.stderr,
                )
            args.steps = default(args.steps, 3 if device.type == "cpu" else 30)
            args.warmup = default(args.warmup, 1 if device.type == "cpu" else 10)
            check_at_least("--steps", args.steps, 1)
            check_at_least("--warmup", args.warmup, 0)
            if args.batch_size is not None:
                check_at_least("--batch-size", args.batch_size, 1)
            if args.image_size is not None:  # before make_config sizes anything by it
                check_image_size(args.image_size)
            check_output_path(args.json, "--json", ".json")
            check_output_path(args.plot, "--plot", ".png")
            cfg = make_config(args, device)
            specs = parse_rows(args.rows, args)
            check_specs(specs, args, device)
            warn_unread(args, specs)
            splits = check_data(cfg, device) if any(s.kind in ("loader", "end-to-end") for s in specs) else None
        except (ConfigError, DataError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # the data check reads the folder (seconds on a network disk)
            return stopped_before_rows()
        try:
            return measure(args, cfg, specs, device, splits)
        except OSError as e:  # --json or --plot on a full disk, or a path that may no longer be written
            from moco_fast.cli import one_line

            line = one_line(e)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            return 2


def measure(
    args: argparse.Namespace, cfg, specs: list[RowSpec], device: torch.device, splits: DataSplits | None
) -> int:
    """Runs the rows, prints the table, writes --json and --plot; the exit status. `splits`: the
    data as check_data listed it (Bench)."""
    torch.backends.cudnn.benchmark = True  # fixed shapes; main_moco.py sets it too
    bench = Bench(args, cfg, device, splits)
    result = {
        "rows": [],
        "complete": False,  # until every row ran: a file that a Ctrl-C, kill or crash left is no whole run
        "device": device_info(device),
        "torch": torch.__version__,
        "config": {"args": vars(args), "train": to_dict(cfg)},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    interrupted = False
    for i, spec in enumerate(specs):
        try:
            row = bench.run(spec)
        except (ConfigError, DataError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # a time box ran out (Ctrl-C, timeout -s INT): report what was measured
            result["rows"] += [{"name": x.name, "kind": x.kind, "img_per_s": None, "error": NOT_RUN} for x in specs[i:]]
            print(f"interrupted at {spec.name}", file=sys.stderr)
            interrupted = True
            break
        except Exception as e:  # one failed row (OOM, a compiler error) must not lose the others
            row = {"name": spec.name, "kind": spec.kind, "img_per_s": None, "error": f"{type(e).__name__}: {e}"}
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if spec.compile:
                torch._dynamo.reset()  # new models would otherwise pile up recompiles of one code object
        result["rows"].append(row)
        add_ratios(result["rows"])
        print(f"[{len(result['rows'])}/{len(specs)}] {spec.name}: {row_done(row)}", file=sys.stderr, flush=True)
        if args.json:  # after every row, atomically: a run cut short keeps what it measured
            write_json(args.json, result)
    result["complete"] = not interrupted
    if args.json:
        write_json(args.json, result)
    c = cfg
    print(
        f"\n{c.model.arch} MoCo {c.preset}, batch {c.optim.batch_size}, {c.data.aug.image_size} px, K {c.moco.k}, "
        f"on {result['device']['name']} ({device}); torch {torch.__version__}"
    )
    print(format_table(result["rows"]))
    for note in ratio_notes(result["rows"]):
        print(note)
    for r in result["rows"]:
        if "profile" in r:
            from profile_step import format_breakdown

            print(f"\nwhere the time goes ({r['name']}):\n{format_breakdown(r['profile'])}")
    if args.plot:
        from plot import plot_rows

        if plot_rows(result, args.plot):
            print(f"plot: {args.plot}")
    if interrupted:
        return 130  # as for Ctrl-C, after the table of what was measured
    return 0 if all(r.get("img_per_s") for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
