"""The training step never waits for the GPU, and the CUDA-graph step replays it faithfully.

On a GPU: steady-state steps run under `torch.cuda.set_sync_debug_mode("error")`, which turns any
device -> host synchronisation into an exception (a `.item()`, an `int()` of a device tensor, a
blocking copy). The official-style reference step must trip it, which shows the detector works.
On the CPU: `--cuda-graph` is refused with a one-line error before any work.
"""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from moco_fast.loaders.base import Batch

from moco_fast.cli import main
from moco_fast.config import ConfigError, build_config
from moco_fast.model import MoCo
from moco_fast.trainer import GraphedStep, StepState, check_cuda_graph, make_optimizer, set_lr, train, train_step

CUDA = torch.cuda.is_available()


def small_cfg(**over):
    base = {"model.arch": "resnet18", "model.stem": "imagenet", "moco.k": 256, "optim.batch_size": 32}
    return build_config("v2", {**base, **over})


def make_state(cfg, device, amp=None, backend="foreach", bn_kernel="torch"):
    torch.manual_seed(0)
    model = MoCo(cfg.model, cfg.moco, 64, num_images=1024, momentum_backend=backend, bn_kernel=bn_kernel).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    return StepState(model, opt, scaler, amp, device)


def batches(n, device, dtype=torch.float32, size=64, batch=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x1, x2 = (torch.randn(batch, 3, size, size, generator=g) for _ in range(2))
        idx = torch.randint(1024, (batch,), generator=g)
        out.append(
            Batch(
                *(x.to(device, dtype).contiguous(memory_format=torch.channels_last) for x in (x1, x2)),
                torch.zeros(batch, dtype=torch.long, device=device),
                idx.to(device),
            )
        )
    return out


# -- on every machine -------------------------------------------------------------------------------
def test_cuda_graph_is_refused_on_the_cpu():
    s = make_state(small_cfg(), torch.device("cpu"))
    with pytest.raises(ConfigError, match="--cuda-graph"):
        GraphedStep(s, 0.99)
    with pytest.raises(ConfigError, match="one process"):
        check_cuda_graph(torch.device("cuda"), world=2)


def test_train_refuses_cuda_graph_on_the_cpu_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = small_cfg(**{"runtime.device": "cpu", "runtime.cuda_graph": True, "runtime.out": str(out)})
    with pytest.raises(ConfigError, match="--cuda-graph"):
        train(cfg)
    assert not out.exists()
    args = ["train", "--device", "cpu", "--cuda-graph", "--loader", "synthetic", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--cuda-graph" in err and err.strip().count("\n") == 0


def test_set_lr_fills_a_tensor_learning_rate_in_place():
    s = make_state(small_cfg(), torch.device("cpu"))
    set_lr(s.optimizer, 0.5)
    assert s.optimizer.param_groups[0]["lr"] == 0.5
    lr = torch.tensor(0.1)
    s.optimizer.param_groups[0]["lr"] = lr
    set_lr(s.optimizer, 0.25)
    assert s.optimizer.param_groups[0]["lr"] is lr and lr.item() == 0.25


# -- on a GPU ---------------------------------------------------------------------------------------
def run_without_sync(step, data, warmup=4):
    for b in data[:warmup]:
        step(b)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [step(b) for b in data[warmup:]]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    loss = outs[-1][0]
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize(
    ("amp", "backend", "over"),
    [
        (torch.bfloat16, "foreach", {}),
        (torch.float16, "foreach", {}),  # GradScaler: its inf check must stay on the device
        (None, "foreach", {}),
        (torch.bfloat16, "triton", {}),
        (torch.bfloat16, "foreach", {"moco.symmetric": True}),
        (torch.bfloat16, "foreach", {"moco.mechanism": "memory-bank"}),
        (torch.bfloat16, "foreach", {"moco.mechanism": "end-to-end"}),
    ],
)
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_steady_state_step_has_no_host_sync(amp, backend, over, graph):
    dev = torch.device("cuda")
    s = make_state(small_cfg(**over), dev, amp, backend)
    step = GraphedStep(s, 0.99) if graph else (lambda b: train_step(s, b, 0.99))
    run_without_sync(step, batches(8, dev, amp or torch.float32))


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_graphed_step_with_the_triton_split_bn_has_no_host_sync(amp):
    # bench/throughput.py's trainer:fp16+graph+bntriton row: split BN's Triton kernels in the captured step
    dev = torch.device("cuda")
    s = make_state(small_cfg(), dev, amp, bn_kernel="triton")
    run_without_sync(GraphedStep(s, 0.99), batches(8, dev, amp))


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_compiled_graphed_step_has_no_host_sync():
    dev = torch.device("cuda")
    s = make_state(small_cfg(), dev, torch.bfloat16)
    s.model.encoder_q.compile()
    s.model.encoder_k.compile()
    run_without_sync(GraphedStep(s, 0.99), batches(8, dev, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_the_detector_catches_the_official_style_step():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from reference_step import build_reference, reference_step

    dev = torch.device("cuda")
    model, opt = build_reference(small_cfg(), dev)
    x = torch.randn(32, 3, 64, 64, device=dev)
    reference_step(model, opt, x, x.clone())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            reference_step(model, opt, x, x.clone())
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_graph_replays_match_eager_steps_and_read_the_lr_tensor():
    # fp32, no shuffle (no random numbers), deterministic cuDNN: eager and replayed steps on the same
    # changing batches must agree; a graph that ignored the new batch or the lr would not.
    dev = torch.device("cuda")
    cfg = small_cfg(**{"moco.shuffle_bn": False})
    bench, det = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        eager = make_state(cfg, dev)
        graphed = make_state(cfg, dev)
        graphed.model.load_state_dict(copy.deepcopy(eager.model.state_dict()))
        gstep = GraphedStep(graphed, 0.99)
        data = batches(8, dev)
        for b in data:
            le, _ = train_step(eager, b, 0.99)
            lg, _ = gstep(b)
            torch.testing.assert_close(lg, le, rtol=1e-3, atol=1e-3)
        for pe, pg in zip(eager.model.parameters(), graphed.model.parameters()):
            torch.testing.assert_close(pg, pe, rtol=1e-3, atol=1e-3)
        assert gstep.graph is not None  # the last steps were replays
        set_lr(graphed.optimizer, 0.0)
        before = [p.clone() for p in graphed.model.encoder_q.parameters()]
        gstep(data[0])
        assert all(torch.equal(a, b) for a, b in zip(before, graphed.model.encoder_q.parameters()))
        set_lr(graphed.optimizer, 0.1)
        gstep(data[1])
        assert any(not torch.equal(a, b) for a, b in zip(before, graphed.model.encoder_q.parameters()))
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = bench, det


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_trainer_runs_with_cuda_graph(tmp_path):
    cfg = small_cfg(
        **{
            "runtime.device": "cuda",
            "runtime.cuda_graph": True,
            "runtime.out": str(tmp_path),
            "data.loader": "synthetic",
            "data.synthetic_steps": 8,
            "optim.epochs": 2,
            "runtime.final_knn": False,
        }
    )
    cfg.data.aug = cfg.data.aug.with_size(64)
    row = train(cfg)
    assert row["epoch"] == 2 and math.isfinite(row["loss"]) and row["img_per_s"] > 0
