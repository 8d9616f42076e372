"""The rows of bench/throughput.py: `--rows` (loader, trainer, end-to-end, reference, each with
modifiers after a colon joined by '+') parsed into one RowSpec each, checked for contradictions
within a row and for split BN's kernel (bntorch, bntriton) on a row that runs no split BN. What a
row needs of the machine is checked by throughput.check_specs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import torch

from moco_fast.config import ConfigError

KINDS = ("loader", "trainer", "end-to-end", "reference")
DEFAULT_ROWS = "loader,trainer,end-to-end,reference"
# Row modifiers (after a colon, joined by '+'): field -> value of a RowSpec.
MODIFIERS = {
    "bf16": {"amp": "bf16"},
    "fp16": {"amp": "fp16"},
    "fp32": {"amp": "off"},
    "compile": {"compile": True},
    "graph": {"graph": True},
    "eager": {"compile": False, "graph": False},
    "cl": {"channels_last": True},
    "nchw": {"channels_last": False},
    "foreach": {"momentum": "foreach"},
    "triton": {"momentum": "triton"},
    "apex": {"momentum": "apex"},
    "loop": {"momentum": "reference"},
    "noshuffle": {"shuffle_bn": False},  # plain BN: what split BN (shuffle BN on one device) costs
    # split BN's kernel (not "triton", the EMA's): torch's passes or kernels/split_bn_triton.py's
    "bntorch": {"bn_kernel": "torch"},
    "bntriton": {"bn_kernel": "triton"},
}
BN_KERNEL_MODIFIERS = ("bntorch", "bntriton")


@dataclass(frozen=True)
class RowSpec:
    name: str  # as written in --rows
    kind: str  # loader | trainer | end-to-end | reference
    amp: str
    channels_last: bool
    compile: bool
    graph: bool
    momentum: str
    shuffle_bn: bool = True
    bn_kernel: str = "torch"  # split BN's; a row without split BN (loader, noshuffle, reference) runs none
    bn_splits: int | None = None  # --bn-splits (None: the preset's, 8); 1 is plain BN, the key shuffle kept

    @property
    def split_bn(self) -> bool:
        """Whether the row's step runs split BN (and so its kernel)."""
        return self.kind in ("trainer", "end-to-end") and self.shuffle_bn and self.bn_splits != 1

    def settings(self, amp_dtype: torch.dtype | None, workers: int, loader: str) -> str:
        if self.kind == "reference":
            bn = "" if self.shuffle_bn else ", no shuffle BN"
            return "fp32, NCHW, per-parameter EMA loop, host queue pointer" + bn
        parts = [{torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp_dtype]]
        parts.append("channels-last" if self.channels_last else "NCHW")
        if self.kind in ("loader", "end-to-end"):
            parts.insert(0, f"{loader} loader" + (f", workers {workers}" if loader == "torch" else ""))
        if self.kind != "loader":
            parts += ["compile"] * self.compile + ["cuda graph"] * self.graph + [f"EMA {self.momentum}"]
            if self.split_bn:
                parts.append(f"split BN {self.bn_kernel}")
            else:
                parts.append("no shuffle BN" if not self.shuffle_bn else "plain BN (--bn-splits 1)")
        return ", ".join(parts)


def parse_rows(text: str, args: argparse.Namespace) -> list[RowSpec]:
    base = RowSpec("", "", args.amp, args.channels_last, args.compile, args.cuda_graph, args.momentum_backend)
    base = replace(base, bn_kernel=args.bn_kernel, bn_splits=args.bn_splits)
    rows = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        kind, _, mods = item.partition(":")
        if kind not in KINDS:
            raise ConfigError(f"--rows: unknown row {kind!r}; choose from {', '.join(KINDS)}")
        spec = replace(base, name=item, kind=kind)
        if kind == "reference":  # the official step as it is; the global --compile/--cuda-graph are not its
            spec = replace(spec, amp="off", channels_last=False, compile=False, graph=False, momentum="reference")
        chosen: dict[str, tuple[str, object]] = {}  # field -> (modifier, value) within this row
        for mod in filter(None, mods.split("+")):
            if mod not in MODIFIERS:
                raise ConfigError(f"--rows: unknown modifier {mod!r} in {item!r}; choose from {', '.join(MODIFIERS)}")
            if kind == "reference" and mod != "noshuffle":
                raise ConfigError(
                    f"--rows: {item!r}: the reference row is the official step as it is (fp32, NCHW, the "
                    "per-parameter EMA loop); only noshuffle (plain BN) applies to it"
                )
            for field, value in MODIFIERS[mod].items():
                if field in chosen and chosen[field][1] != value:
                    raise ConfigError(f"--rows: {item!r}: {chosen[field][0]} and {mod} contradict each other")
                chosen[field] = (mod, value)
            spec = replace(spec, **MODIFIERS[mod])
        bn_mod = next((m for m in mods.split("+") if m in BN_KERNEL_MODIFIERS), None)
        if bn_mod and not spec.split_bn:
            what = (
                "the loader row runs no step"
                if kind == "loader"
                else ("noshuffle" if not spec.shuffle_bn else "--bn-splits 1") + " runs plain BN"
            )
            raise ConfigError(f"--rows: {item!r}: {bn_mod} chooses split BN's kernel, and {what}")
        rows.append(spec)
    if not rows:
        raise ConfigError("--rows names no row")
    return rows
