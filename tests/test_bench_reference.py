"""bench/: the profile breakdown (--profile) and the official-style reference step that the
throughput table compares against: its model, its step, its pairing with the trainer's rows, and the
fast step computing what it computes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import profile_step  # noqa: E402
import reference_step  # noqa: E402
from moco_fast.loaders.base import Batch  # noqa: E402
from report import add_ratios  # noqa: E402
from test_bench import parse  # noqa: E402

import moco_fast.model as moco_model  # noqa: E402
from moco_fast.config import build_config  # noqa: E402
from moco_fast.model import MoCo  # noqa: E402
from moco_fast.trainer import StepState, make_optimizer, train_step  # noqa: E402


def tiny_cfg():
    return build_config(
        "v2", {"model.arch": "resnet18", "model.stem": "imagenet", "moco.k": 32, "optim.batch_size": 16}
    )


PROFILE_ON_THE_CPU = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from profile_step import profile_breakdown

model = torch.nn.Linear(4, 4)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x = torch.randn(2, 4)

def step():
    model(x).sum().backward()
    opt.step()

print(profile_breakdown(step, model, opt, torch.device("cpu"), steps=1)["steps"])
"""


def test_a_cpu_profile_prints_none_of_the_profiler_s_own_lines():
    # torch's kineto probed the GPUs at every profile: "ERROR:... gpuGetDeviceCount failed with code
    # 35" on a machine without one, and "USDT:... profiler_start" (torch 2.14); torch 2.11 warned that
    # the "Profiler clears events at the end of each cycle". In a process of its own: kineto reads its
    # log level at the process's first profile.
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    run = subprocess.run(
        [sys.executable, "-c", PROFILE_ON_THE_CPU, str(BENCH)], capture_output=True, text=True, timeout=120, env=env
    )
    assert run.stdout.split() == ["1"], run.stderr[-3000:]
    kineto = re.compile(r"^(VERBOSE|INFO|WARNING|STAGE|ERROR|USDT):\d{4}-", re.MULTILINE)  # its log lines' start
    assert not kineto.search(run.stderr) and "Profiler clears events" not in run.stderr, run.stderr[-3000:]


def test_profile_breakdown_names_the_phases_and_undoes_its_wrappers():
    cfg = tiny_cfg()
    model = MoCo(cfg.model, cfg.moco, 32)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    s = StepState(model, opt, torch.amp.GradScaler("cpu", enabled=False), None, torch.device("cpu"))
    x = torch.randn(16, 3, 32, 32)  # 8 BN sub-batches of 2
    batch = Batch(x, x.clone(), torch.zeros(16, dtype=torch.long), torch.arange(16))
    info_nce = moco_model.info_nce
    b = profile_step.profile_breakdown(lambda: train_step(s, batch, 0.99), model, opt, torch.device("cpu"), steps=1)
    for phase in ("forward q", "forward k", "backward", "optimizer", "momentum", "loss", "queue"):
        assert b["phases_ms"][phase] > 0, b["phases_ms"]
    assert b["kernels_ms"]["convolution / GEMM"] > 0 and b["wall_ms_per_step"] >= b["phases_ms"]["forward q"]
    assert "encode_q" not in model.__dict__ and "step" not in opt.__dict__ and moco_model.info_nce is info_nce
    assert "by phase" in profile_step.format_breakdown(b)


def test_each_row_is_paired_with_the_reference_of_its_bn_set_up():
    # Split BN against split BN, plain BN (+noshuffle) against plain BN; a run without a plain-BN
    # reference compares everything with the first reference row.
    rows = [
        {"name": "reference", "kind": "reference", "shuffle_bn": True, "img_per_s": 1000.0},
        {"name": "trainer:fp16", "kind": "trainer", "shuffle_bn": True, "img_per_s": 3500.0},
        {"name": "reference:noshuffle", "kind": "reference", "shuffle_bn": False, "img_per_s": 1250.0},
        {"name": "trainer:fp16+noshuffle", "kind": "trainer", "shuffle_bn": False, "img_per_s": 5000.0},
        {"name": "loader", "kind": "loader", "img_per_s": 9000.0},
    ]
    add_ratios(rows)
    got = {r["name"]: (r["vs_reference"], r["reference"]) for r in rows if r["kind"] != "loader"}
    assert got["trainer:fp16"] == (3.5, "reference") and got["trainer:fp16+noshuffle"] == (4.0, "reference:noshuffle")
    assert got["reference:noshuffle"] == (1.0, "reference:noshuffle")
    del rows[2]
    add_ratios(rows)
    assert rows[2]["vs_reference"] == 5.0 and rows[2]["reference"] == "reference"
    # the plain-BN reference is built with plain BN (the split-BN one with the demo's split BN)
    cfg = tiny_cfg()
    split = reference_step.build_reference(cfg, torch.device("cpu"))[0]
    plain = reference_step.build_reference(cfg, torch.device("cpu"), shuffle_bn=False)[0]
    kinds = lambda m: {type(x).__name__ for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)}  # noqa: E731
    assert kinds(split) == {"DemoSplitBatchNorm"} and kinds(plain) == {"BatchNorm2d"}
    (spec,) = parse("reference:noshuffle")
    assert not spec.shuffle_bn and "no shuffle BN" in spec.settings(None, 0, "synthetic")


def test_reference_model_matches_the_trainers_size_and_steps_like_the_official_code():
    cfg = tiny_cfg()
    ref, opt = reference_step.build_reference(cfg, torch.device("cpu"))
    ours = MoCo(cfg.model, cfg.moco, 32)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ref.encoder_q) == count(ours.encoder_q) and ref.queue.shape == (128, 32)  # C x K
    x = torch.randn(16, 3, 32, 32)
    loss = reference_step.reference_step(ref, opt, x, x.clone())
    assert isinstance(loss, float) and loss > 0
    assert int(ref.queue_ptr) == 16  # the pointer advanced by one batch
    # The next step's per-parameter loop moves k towards the q that the optimiser just changed.
    k1 = [p.clone() for p in ref.encoder_k.parameters()]
    q1 = [p.detach().clone() for p in ref.encoder_q.parameters()]
    reference_step.reference_step(ref, opt, x, x.clone())
    for pk, k, q in zip(ref.encoder_k.parameters(), k1, q1):
        torch.testing.assert_close(pk, k * 0.999 + q * 0.001)
    assert any(not torch.equal(a, b) for a, b in zip(k1, q1))  # the optimiser did move q
    assert int(ref.queue_ptr) == 0  # K = 32: two batches of 16 wrap around


def test_the_fast_step_computes_what_the_official_step_does():
    # Same weights, images and shuffle draws: over 3 steps (the third wraps the queue) the trainer's
    # step (foreach SGD, the fused momentum update, the K x C ring buffer with its device pointer,
    # shuffle BN and its unshuffle) gives the official step's loss, query and key encoders and queue.
    # Plain BN: the official demo's split BN groups the batch in another order (strided, not chunks).
    cfg = build_config(
        "v2",
        {"model.arch": "resnet18", "model.stem": "cifar", "model.dim": 16, "moco.k": 24,
         "moco.m": 0.9, "moco.bn_splits": 1, "optim.batch_size": 8},
    )  # fmt: skip
    ref, ref_opt = reference_step.build_reference(cfg, torch.device("cpu"))
    ours = MoCo(cfg.model, cfg.moco, 16)
    for a, b in zip(ours.encoder_q.parameters(), ref.encoder_q.parameters(), strict=True):
        b.data.copy_(a.data)
    for a, b in zip(ours.encoder_k.parameters(), ref.encoder_k.parameters(), strict=True):
        b.data.copy_(a.data)
    ref.queue.copy_(ours.queue.T)
    opt = make_optimizer(ours, cfg, torch.device("cpu"))
    for g in opt.param_groups:
        g["lr"] = ref_opt.param_groups[0]["lr"]  # the reference's batch-scaled lr, no schedule
    s = StepState(ours, opt, torch.amp.GradScaler("cpu", enabled=False), None, torch.device("cpu"))
    # fp32 sums in another order (foreach against per-parameter updates, the convolutions' threads)
    # move a weight near 0 by ~1.5e-5 over the 3 steps on some inputs (one element in 1728 failed an
    # atol of 1e-5 in one CI run); a wrong update moves them by orders of magnitude more
    close = dict(rtol=1e-4, atol=5e-5)
    images = torch.Generator().manual_seed(0)  # the same inputs whatever ran before in the process
    for step in range(3):
        x = torch.randn(8, 3, 16, 16, generator=images), torch.randn(8, 3, 16, 16, generator=images)
        torch.manual_seed(10 + step)  # the shuffle's permutation: one randperm(8) in both steps
        loss, _ = train_step(s, Batch(*x, torch.zeros(8, dtype=torch.long), torch.arange(8)), 0.9)
        torch.manual_seed(10 + step)
        ref_loss = reference_step.reference_step(ref, ref_opt, *x)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-5), step
        for a, b in zip(ours.encoder_q.parameters(), ref.encoder_q.parameters()):
            torch.testing.assert_close(a, b, **close)
        for a, b in zip(ours.encoder_k.parameters(), ref.encoder_k.parameters()):
            torch.testing.assert_close(a, b, **close)
        torch.testing.assert_close(ours.queue, ref.queue.T, **close)
        assert ours.queue_ptr.item() == ref.queue_ptr.item() == (step + 1) * 8 % 24
