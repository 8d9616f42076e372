"""Times every momentum (EMA) backend on a real encoder's parameters and checks each against float64.

    python bench/momentum_kernels.py                  # GPU: ResNet-50 + MLP head (163 tensors), channels-last
    python bench/momentum_kernels.py --device cpu --arch resnet18

Rows: each backend in moco_fast.kernels.momentum.MOMENTUM_BACKENDS (reference loop, foreach, triton
where it runs, apex where installed), the official code's allocating loop
(`param_k.data = param_k.data * m + param_q.data * (1 - m)`), and the floor: one lerp over a single
flat tensor of the same size. Bytes moved per update: read k, read q, write k.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package

import torch
from moco_fast.kernels.momentum import MOMENTUM_BACKENDS
from moco_fast.kernels.momentum_triton import interpreting
from report import check_output_path, device_info, time_calls

from moco_fast.checkpoint import atomic_write_text
from moco_fast.config import ConfigError, ModelConfig, check_at_least
from moco_fast.model import build_encoder
from moco_fast.trainer import resolve_device

M = 0.999


def official_loop(ks, qs, m):
    for pk, pq in zip(ks, qs):
        pk.data = pk.data * m + pq.data * (1.0 - m)


def rel_error(ks, k0, q0, m) -> float:
    """||out - ref|| / ||ref|| over all tensors, the reference in float64 from the same inputs."""
    num = den = 0.0
    for k, a, b in zip(ks, k0, q0):
        ref = a.double() * m + b.double() * (1 - m)
        num += float((k.double() - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return (num / den) ** 0.5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: cuda where there is one)")
    p.add_argument(
        "--arch",
        default="resnet50",
        help="ResNet whose parameters are updated: torchvision's, or resnet50w2/resnet50w4 (default resnet50)",
    )
    p.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=True, help="MoCo v2 head (default on)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="(default on)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per row first (default 5)")
    p.add_argument("--repeats", type=int, help="timed calls per row (default 50 on GPU, 5 on CPU)")
    p.add_argument("--json", help="write the rows here, a .json file")
    args = p.parse_args(argv)
    try:  # every value checked before any work: one line and exit 2
        device = resolve_device(args.device)
        repeats = (50 if device.type == "cuda" else 5) if args.repeats is None else args.repeats
        check_at_least("--repeats", repeats, 1)
        check_at_least("--warmup", args.warmup, 0)
        check_output_path(args.json, "--json", ".json")
        torch.manual_seed(0)
        enc_q = build_encoder(ModelConfig(arch=args.arch, mlp=args.mlp), 224, bn_splits=1).to(device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.channels_last:  # the trainer's layout: 4-d weights are dense but not contiguous
        enc_q = enc_q.to(memory_format=torch.channels_last)
    qs = [p.detach() for p in enc_q.parameters()]
    k_init = [q + 0.01 * torch.randn_like(q) for q in qs]  # random data, never zeros
    numel = sum(q.numel() for q in qs)
    nbytes = 3 * sum(q.numel() * q.element_size() for q in qs)

    backends = dict(MOMENTUM_BACKENDS)
    if device.type == "cpu" and not interpreting():
        backends.pop("triton", None)
    fns = {name: (lambda ks, fn=fn: fn(ks, qs, M)) for name, fn in backends.items()}
    fns["official-loop"] = lambda ks: official_loop(ks, qs, M)
    rows = []
    for name, fn in fns.items():
        ks = [copy.deepcopy(k) for k in k_init]
        try:
            fn(ks)  # one update from k_init: the correctness check
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            err = rel_error(ks, k_init, qs, M)
            ms = time_calls(lambda ks=ks, fn=fn: fn(ks), device, args.warmup, repeats)
            rows.append({"name": name, "ms": ms, "gb_per_s": nbytes / ms / 1e6, "rel_err": err})
        except (RuntimeError, ValueError) as e:
            rows.append({"name": name, "ms": None, "error": f"{type(e).__name__}: {e}"})
    flat_k, flat_q = torch.cat([k.flatten() for k in k_init]), torch.cat([q.flatten() for q in qs])
    ms = time_calls(lambda: flat_k.lerp_(flat_q, 1 - M), device, args.warmup, repeats)
    rows.append({"name": "floor (one flat lerp)", "ms": ms, "gb_per_s": nbytes / ms / 1e6, "rel_err": None})

    info = device_info(device)  # the same record as throughput.py's JSON
    name = info["name"]
    print(
        f"\nmomentum update of {args.arch}{' + MLP head' if args.mlp else ''}: {len(qs)} tensors, {numel / 1e6:.1f} M"
    )
    print(f"parameters, {nbytes / 1e6:.0f} MB moved per update, on {name}; median of {repeats} calls")
    print(f"{'backend':<24}{'ms/update':>10}{'GB/s':>9}{'rel err':>10}")
    for r in rows:
        if r.get("ms") is None:
            print(f"{r['name']:<24}failed: {r['error'][:70]}")
            continue
        err = f"{r['rel_err']:.1e}" if r["rel_err"] is not None else ""
        print(f"{r['name']:<24}{r['ms']:>10.3f}{r['gb_per_s']:>9.0f}{err:>10}")
    if args.json:
        out = {"rows": rows, "device": info, "torch": torch.__version__, "tensors": len(qs), "numel": numel}
        atomic_write_text(args.json, json.dumps(out, indent=2))
    bad = [r["name"] for r in rows if r.get("rel_err") is not None and r["rel_err"] > 1e-6]
    if bad:
        print(f"WRONG: {bad} differ from the float64 reference by more than 1e-6", file=sys.stderr)
    return 1 if bad or any(r.get("ms") is None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
