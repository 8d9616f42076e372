"""The fused momentum update against the per-parameter reference loop."""

import copy

import pytest
import torch
from moco_fast.kernels import momentum_update, momentum_update_foreach, momentum_update_reference
from moco_fast.kernels.momentum import MOMENTUM_BACKENDS

from moco_fast.config import ModelConfig
from moco_fast.model import build_encoder


def encoders():
    torch.manual_seed(0)
    q = build_encoder(ModelConfig(arch="resnet18", dim=16, mlp=True), 32, bn_splits=1)
    k = copy.deepcopy(q)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(torch.randn_like(p))
    return q, k


@pytest.mark.parametrize("m", [0.0, 0.5, 0.99, 0.999, 1.0])
def test_foreach_matches_reference(m):
    q, k = encoders()
    k_ref = copy.deepcopy(k)
    momentum_update_foreach(list(k.parameters()), list(q.parameters()), m)
    momentum_update_reference(list(k_ref.parameters()), list(q.parameters()), m)
    for a, b in zip(k.parameters(), k_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_m_zero_copies_and_m_one_keeps():
    q, k = encoders()
    before = [p.clone() for p in k.parameters()]
    momentum_update(list(k.parameters()), list(q.parameters()), 1.0)
    assert all(torch.equal(a, b) for a, b in zip(k.parameters(), before))
    momentum_update(list(k.parameters()), list(q.parameters()), 0.0)
    assert all(torch.allclose(a, b) for a, b in zip(k.parameters(), q.parameters()))


def test_unknown_backend_and_length_mismatch():
    q, k = encoders()
    with pytest.raises(ValueError, match="unknown momentum backend"):
        momentum_update(list(k.parameters()), list(q.parameters()), 0.9, backend="nope")
    with pytest.raises(ValueError):
        momentum_update_foreach(list(k.parameters())[:-1], list(q.parameters()), 0.9)
    assert {"reference", "foreach"} <= set(MOMENTUM_BACKENDS)


def top_level_aten_ops(fn) -> list[str]:
    """The aten ops `fn` dispatches itself (not those nested in another aten op), as profiled."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [
        e.name
        for e in prof.events()
        if e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))
    ]


def test_foreach_update_is_one_op_whatever_the_number_of_tensors():
    q, k = encoders()
    pk, pq = list(k.parameters()), list(q.parameters())
    assert top_level_aten_ops(lambda: momentum_update_foreach(pk, pq, 0.9)) == ["aten::_foreach_lerp_"]
    assert all(p.grad is None for p in pq)
