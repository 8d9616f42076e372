"""Times each split-BN path, forward + backward, on every BatchNorm input shape of the MoCo encoder.

    python bench/split_bn.py                          # GPU: ResNet-50, batch 256, 224 px, 8 splits, fp16 channels-last
    python bench/split_bn.py --device cpu --arch resnet18 --batch-size 16 --image-size 32 --dtype fp32

Candidates: `plain` (F.batch_norm on the whole batch: no sub-batches, the floor of what emulating
shuffle BN can cost), `split` (split_batch_norm, the model's path: whole-batch passes), `reference`
(split_batch_norm_reference: F.batch_norm per sub-batch, the path before it), `regroup`
(split_batch_norm_regroup: the official CIFAR demo's one F.batch_norm on N/S x S*C channels; a
channels-last batch is copied in and out, and that is timed too) and `triton`
(split_batch_norm_triton: the same as `split` in six Triton kernels, x read twice forward and
(x, dy) twice backward; on a CUDA device, or on the CPU under TRITON_INTERPRET=1, where it is left
out of the default rows otherwise). The shapes come from the encoder itself, run on the meta
device; each shape's time counts once per layer that has it, so a column's total is its ms per step
of all BN layers of the query encoder's forward + backward (the key encoder's forward, without
backward, is not in it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package

import torch
import torch.nn.functional as F
from moco_fast.kernels.momentum_triton import interpreting, triton
from moco_fast.kernels.split_bn import split_batch_norm, split_batch_norm_reference, split_batch_norm_regroup
from moco_fast.kernels.split_bn_triton import split_batch_norm_triton
from report import check_output_path, device_info, format_table, time_calls
from torch import nn

from moco_fast.checkpoint import atomic_write_text
from moco_fast.config import ConfigError, ModelConfig, check_at_least, check_image_size
from moco_fast.model import build_encoder
from moco_fast.trainer import resolve_device


def plain(x, num_splits, running_mean, running_var, weight, bias, momentum, eps):
    """Native BN of the whole batch, the splits ignored."""
    return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)


CANDIDATES = {
    "plain": plain,
    "split": split_batch_norm,
    "reference": split_batch_norm_reference,
    "regroup": split_batch_norm_regroup,
    "triton": split_batch_norm_triton,
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Calls in one timed sample on a GPU (one on a CPU, where there is no queue). In an eager step a
# layer's kernels queue behind the last layer's; one call between two events starts on an idle GPU
# and ends with a sync, a latency that would count in every call (possibly much of a small layer's BN).
CHAINED = 5


def bn_shapes(model: ModelConfig, batch: int, image_size: int) -> dict[tuple[int, ...], int]:
    """Each distinct input shape of the encoder's BatchNorm layers and how many layers have it, in
    the order the forward pass meets them. The encoder is built and run on the meta device (shapes
    only: no memory, no arithmetic), so the list follows moco_fast's backbone as it changes."""
    with torch.device("meta"):
        enc = build_encoder(model, image_size, bn_splits=1).eval()  # a BN's input shape is the same in training
        x = torch.empty(batch, 3, image_size, image_size)
    shapes: dict[tuple[int, ...], int] = {}

    def record(_module, args):
        shape = tuple(args[0].shape)
        shapes[shape] = shapes.get(shape, 0) + 1

    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(record)
    with torch.no_grad():
        enc(x)
    return shapes


def bn_call(fn, shape, splits: int, dtype: torch.dtype, channels_last: bool, device: torch.device, calls: int):
    """`calls` forwards + backwards of `fn` on a random batch of `shape` (fp32 parameters and running
    statistics, as autocast leaves them): the input, weight and bias gradients of a random upstream
    gradient, as the training step takes them."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn_like(x)
    c = shape[1]
    weight = (torch.rand(c, device=device) + 0.5).requires_grad_()
    bias = torch.randn(c, device=device).requires_grad_()
    running = torch.zeros(c, device=device), torch.ones(c, device=device)

    def call():
        for _ in range(calls):
            y = fn(x, splits, *running, weight, bias, 0.1, 1e-5)
            torch.autograd.grad(y, (x, weight, bias), dy)

    return call


def triton_runs_on(device: torch.device) -> bool:
    """The Triton candidate's kernels run: compiled on a CUDA device, or on the CPU under the interpreter."""
    return triton is not None and (device.type == "cuda" or interpreting())


def rows_to_time(rows: str | None, device: torch.device) -> list[str]:
    """--rows as a list of candidates (None: each that runs on `device`), or ConfigError."""
    if rows is None:
        return [n for n in CANDIDATES if n != "triton" or triton_runs_on(device)]
    names = [n for n in rows.split(",") if n]
    if not names or set(names) - set(CANDIDATES):
        raise ConfigError(f"--rows {rows!r}: name some of {', '.join(CANDIDATES)}")
    if "triton" in names and not triton_runs_on(device):
        raise ConfigError("--rows triton needs the triton package and a CUDA device (or TRITON_INTERPRET=1 on the CPU)")
    return names


def shape_text(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: cuda where there is one)")
    p.add_argument("--arch", default="resnet50", help="the encoder's ResNet, as train's --arch (default resnet50)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (default 256)")
    p.add_argument("--image-size", type=int, default=224, help="(default 224; 64 or less: the CIFAR stem)")
    p.add_argument("--splits", type=int, default=8, help="sub-batches, as train's --bn-splits (default 8)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        help="the activations' dtype (default fp16 on a GPU, fp32 on the CPU; fp16 needs a GPU, as train's --amp fp16)",
    )
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="(default on)")
    p.add_argument(
        "--rows", help=f"candidates to time, of {','.join(CANDIDATES)} (default: each that runs on the device)"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed samples per shape and candidate first (default 3)")
    p.add_argument("--repeats", type=int, help="timed samples per shape and candidate (default 20 on GPU, 3 on CPU)")
    p.add_argument("--json", help="write the figures here, a .json file")
    args = p.parse_args(argv)
    try:  # every value checked before any work: one line and exit 2
        device = resolve_device(args.device)
        repeats = (20 if device.type == "cuda" else 3) if args.repeats is None else args.repeats
        check_at_least("--repeats", repeats, 1)
        check_at_least("--warmup", args.warmup, 0)
        check_at_least("--batch-size", args.batch_size, 1)
        check_image_size(args.image_size)
        check_at_least("--splits", args.splits, 1)
        # fp16 on the CPU ran, emulated, minutes at the defaults, timing a path no run takes: train
        # refuses --amp fp16 there (and trains in fp32 by default)
        if args.dtype is None:
            args.dtype = "fp16" if device.type == "cuda" else "fp32"
        elif args.dtype == "fp16" and device.type != "cuda":
            raise ConfigError(f"--dtype fp16 needs a GPU, as train's --amp fp16; use --dtype bf16 or fp32 on {device}")
        if args.batch_size % args.splits:
            raise ConfigError(f"--batch-size {args.batch_size} is not divisible by --splits {args.splits}")
        names = rows_to_time(args.rows, device)
        args.rows = ",".join(names)  # the JSON's config: the rows timed
        check_output_path(args.json, "--json", ".json")
        shapes = bn_shapes(ModelConfig(arch=args.arch), args.batch_size, args.image_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    chain = CHAINED if device.type == "cuda" else 1
    torch.manual_seed(0)
    rows, errors = [], []
    for i, (shape, layers) in enumerate(shapes.items()):
        # a line a shape, as throughput.py's a row: on the CPU the defaults (ResNet-50, batch 256, 224 px)
        # ran for minutes with nothing written until the table
        print(f"[{i + 1}/{len(shapes)}] {shape_text(shape)}: {', '.join(names)}", file=sys.stderr, flush=True)
        row = {"name": shape_text(shape), "settings": f"{layers} layer{'s' * (layers > 1)}", "shape": shape}
        row["layers"] = layers
        for name in names:
            try:  # each call's tensors freed before the next candidate's
                call = bn_call(CANDIDATES[name], shape, args.splits, dtype, args.channels_last, device, chain)
                row[name] = layers * time_calls(call, device, args.warmup, repeats) / chain
            except (RuntimeError, ValueError) as e:  # out of memory, a sub-batch of one value per channel
                errors.append(f"{name} on {row['name']}: {type(e).__name__}: {str(e)[:200]}")
            call = None
        rows.append(row)
    n_layers = sum(shapes.values())
    total = {"name": f"all {n_layers} BN layers", "settings": "ms/step"}
    total.update({n: sum(r[n] for r in rows) for n in names if all(n in r for r in rows)})
    ratio = {"name": "x plain", "settings": ""}  # empty where plain BN is not timed
    if "plain" in total:
        ratio.update({n: total[n] / total["plain"] for n in names if n in total})
    columns = [(n, n, "{:.2f}") for n in names]

    info = device_info(device)
    layout = "channels-last" if args.channels_last else "NCHW"
    print(f"\nsplit BN forward + backward on {info['name']}: {args.arch} query encoder, batch {args.batch_size},")
    print(f"{args.image_size} px, {args.splits} splits, {args.dtype} {layout}; ms per step: a shape's median call")
    print(f"(of {repeats}{f' samples of {chain} calls' if chain > 1 else ''}) times the layers that have it")
    print(format_table([*rows, total, ratio], columns))
    split_paths = [n for n in names if n != "plain"]
    splits_timed = [n for n in split_paths if n in total]
    if splits_timed:  # of the paths timed on every shape: one that failed on some is named, not ranked
        best = min(splits_timed, key=total.get)
        against = f" ({ratio[best]:.2f}x plain)" if best in ratio else ""
        failed = [n for n in split_paths if n not in total]
        unranked = f"; not ranked, failed on a shape: {', '.join(failed)}" if failed else ""
        print(f"fastest split path: {best}, {total[best]:.2f} ms/step{against}{unranked}")
    for e in errors:
        print(f"failed: {e}", file=sys.stderr)
    if args.json:
        out = {
            "rows": rows,
            "total_ms": {n: total.get(n) for n in names},
            "vs_plain": {n: ratio.get(n) for n in names},
            "errors": errors,
            "layers": n_layers,
            "config": {k: v for k, v in vars(args).items() if k != "json"} | {"repeats": repeats},
            "calls_per_sample": chain,  # a figure is the median sample's time over this
            "device": info,
            "torch": torch.__version__,
        }
        atomic_write_text(args.json, json.dumps(out, indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
