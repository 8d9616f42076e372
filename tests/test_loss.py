"""InfoNCE against a hand-written reference, and the queue as a ring buffer."""

import math

import pytest
import torch
import torch.nn.functional as F

from moco_fast.model import info_nce, info_nce_in_batch


def reference_info_nce(q, k, queue, t):
    """Per-sample loop: -log(exp(q.k+/t) / (exp(q.k+/t) + sum_j exp(q.n_j/t)))."""
    total, correct = 0.0, 0
    for i in range(q.shape[0]):
        pos = float(q[i] @ k[i]) / t
        negs = [float(q[i] @ n) / t for n in queue]
        mx = max([pos, *negs])
        denom = math.exp(pos - mx) + sum(math.exp(v - mx) for v in negs)
        total += -(pos - mx - math.log(denom))
        correct += int(pos > max(negs)) if negs else 1
    return total / q.shape[0], correct / q.shape[0]


@pytest.mark.parametrize("k", [1, 7, 8, 15, 16, 17])
def test_info_nce_matches_reference(k):
    g = torch.Generator().manual_seed(k)
    n, d, t = 8, 16, 0.2
    q = F.normalize(torch.randn(n, d, generator=g), dim=1)
    key = F.normalize(torch.randn(n, d, generator=g), dim=1)
    queue = F.normalize(torch.randn(k, d, generator=g), dim=1)
    loss, acc = info_nce(q, key, queue, t)
    ref_loss, ref_acc = reference_info_nce(q.double(), key.double(), queue.double(), t)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    assert acc.item() == pytest.approx(ref_acc)


def test_info_nce_is_fp32_from_low_precision_features():
    q = F.normalize(torch.randn(4, 8), dim=1)
    loss, _ = info_nce(q.bfloat16(), q.bfloat16(), F.normalize(torch.randn(5, 8), dim=1), 0.07)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_losses_stay_fp32_under_autocast(amp):
    # The step runs under autocast: the logits matmuls must not drop to bf16/fp16 there.
    g = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(8, 16, generator=g), dim=1).to(amp) for _ in range(2))
    queue = F.normalize(torch.randn(64, 16, generator=g), dim=1)
    plain = info_nce(q, k, queue, 0.2), info_nce_in_batch(q, k, 0.2)
    with torch.autocast("cpu", dtype=amp):
        cast = info_nce(q, k, queue, 0.2), info_nce_in_batch(q, k, 0.2)
    for (a, _), (b, _) in zip(plain, cast):
        assert b.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize(("keys", "offset"), [(6, 0), (12, 0), (12, 6)])
def test_info_nce_in_batch_matches_reference(keys, offset):
    # keys > 6: every rank's keys (12: two ranks of 6), this rank's queries' positives at `offset`
    g = torch.Generator().manual_seed(0)
    k = F.normalize(torch.randn(keys, 8, generator=g), dim=1)
    # near their positives, so that most are right and the accuracy says which column is the positive
    q = F.normalize(k[offset : offset + 6] + 0.5 * torch.randn(6, 8, generator=g), dim=1)
    loss, acc = info_nce_in_batch(q, k, 0.1, offset)
    # For sample i the positive is k[offset + i] and the negatives are all the other keys.
    refs = [
        reference_info_nce(q[i : i + 1].double(), k[j : j + 1].double(), torch.cat([k[:j], k[j + 1 :]]).double(), 0.1)
        for i, j in enumerate(range(offset, offset + 6))
    ]
    assert loss.item() == pytest.approx(sum(r[0] for r in refs) / 6, rel=1e-5)
    assert acc.item() == pytest.approx(sum(r[1] for r in refs) / 6)
