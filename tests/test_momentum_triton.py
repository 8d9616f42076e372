"""The Triton multi-tensor momentum kernel against the per-parameter reference.

On the CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set per test); on a GPU
the compiled kernel is checked too.
"""

import os
import subprocess
import sys
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language  # the sums kernel below is a jit function of this module

from moco_fast.kernels import momentum_triton as mt  # noqa: E402
from moco_fast.kernels import momentum_update_reference  # noqa: E402
from triton_helpers import sm90_ptx  # noqa: E402

CUDA = torch.cuda.is_available()


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def fresh_tables(monkeypatch):
    """Each test its own table cache: an earlier test's lists, freed, may leave a checked entry at the
    addresses and sizes of this test's tensors (the allocator reuses them)."""
    monkeypatch.setattr(mt, "_TABLES", OrderedDict())


def param_pairs(shapes, dtype=torch.float32, device="cpu", seed=0):
    """Key/query lists shaped like a small encoder's parameters (conv weights, BN vectors, a bias)."""
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    qs = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    return ks, qs


SHAPES = [(16, 3, 3, 3), (16,), (16,), (32, 16, 3, 3), (32,), (64, 32), (1,), (mt.BLOCK + 1,)]


def check_against_reference(ks, qs, m):
    """The Triton update of `ks` (in place) equals the per-parameter reference loop's."""
    ref = [k.clone() for k in ks]
    momentum_update_reference(ref, qs, m)
    mt.momentum_update_triton(ks, qs, m)
    for a, b in zip(ks, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m", [0.0, 0.3, 0.5, 0.99, 0.999, 1.0])
def test_matches_reference(interpret, m):
    ks, qs = param_pairs(SHAPES, seed=int(m * 1000))
    check_against_reference(ks, qs, m)


def test_ends_are_exact(interpret):
    # m = 1 keeps the key encoder bit for bit; m = 0 copies the query encoder bit for bit.
    ks, qs = param_pairs(SHAPES)
    before = [k.clone() for k in ks]
    mt.momentum_update_triton(ks, qs, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(ks, before))
    mt.momentum_update_triton(ks, qs, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(ks, qs))


@pytest.mark.parametrize("n", [1, mt.BLOCK - 1, mt.BLOCK, mt.BLOCK + 1, 2 * mt.BLOCK + 3])
def test_every_element_at_chunk_edges(interpret, n):
    # Fresh random data each size; a tensor whose tail chunk were skipped would keep its old values.
    ks, qs = param_pairs([(n,), (3,), (n,)], seed=n)
    check_against_reference(ks, qs, 0.9)


def test_views_at_unaligned_addresses(interpret):
    # Dense views into one flat buffer, 4 bytes apart: correct, and launched without the 16-byte
    # alignment hint (which would let the compiled kernel issue misaligned vector accesses).
    n = 2 * mt.BLOCK + 5
    kbuf, qbuf = torch.randn(2 * n + 1), torch.randn(2 * n + 1)
    ks, qs = [kbuf[1 : n + 1], kbuf[n + 1 :]], [qbuf[1 : n + 1], qbuf[n + 1 :]]
    check_against_reference(ks, qs, 0.9)
    assert not mt._tables(ks, qs).aligned
    assert mt._tables(*param_pairs(SHAPES)).aligned  # separate allocations are


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sm90_code_uses_vector_accesses_where_aligned(dtype):
    # Compiled for an H100/H200 (sm_90) without a GPU: Triton's own ptxas builds the PTX. Whole
    # chunks at aligned addresses must load and store 16 bytes at a time; without the hint, one
    # element at a time (the kernel would then trail foreach on bandwidth).
    tl = triton.language
    elem = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
    sig = {"k_addr": "*i64", "q_addr": "*i64", "sizes": "*i64", "chunk_tensor": "*i64", "chunk_start": "*i64"}
    sig["w"] = "fp32"
    ptx = {}
    for aligned in (True, False):
        consts = {"ELEM": elem, "HIGH": True, "BLOCK": mt.BLOCK, "ALIGNED": aligned}
        ptx[aligned] = sm90_ptx(triton.jit(mt._momentum_body), sig, consts)
    assert "ld.global.v4.b32" in ptx[True] and "st.global.v4.b32" in ptx[True]
    assert ".v4." not in ptx[False]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parameters(interpret, dtype):
    ks, qs = param_pairs(SHAPES[:4], dtype=dtype)
    expect = [(k.float() * 0.9 + q.float() * 0.1).to(dtype) for k, q in zip(ks, qs)]
    mt.momentum_update_triton(ks, qs, 0.9)
    for a, b in zip(ks, expect):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_channels_last_and_transposed_parameters(interpret):
    # The trainer's encoders are channels-last: 4-d conv weights are dense but not "contiguous".
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 1))
    ks = list(enc.to(memory_format=torch.channels_last).parameters())
    qs = [torch.randn_like(k) for k in ks]  # randn_like keeps the layout
    assert not ks[0].is_contiguous() and qs[0].stride() == ks[0].stride()
    ks += [torch.randn(5, 7).t()]
    qs += [torch.randn(5, 7).t()]
    check_against_reference(ks, qs, 0.9)


def test_tables_are_cached_per_parameter_list(interpret):
    ks, qs = param_pairs(SHAPES)
    mt.momentum_update_triton(ks, qs, 0.9)
    t1 = mt._tables(ks, qs)
    mt.momentum_update_triton(ks, qs, 0.9)
    assert mt._tables(ks, qs) is t1
    # Other tensors get their own tables (never the stale addresses of the first list).
    ks2, qs2 = param_pairs(SHAPES, seed=7)
    check_against_reference(ks2, qs2, 0.5)
    assert mt._tables(ks2, qs2) is not t1


def test_a_list_is_checked_when_its_tables_are_built_not_on_every_call(interpret, monkeypatch):
    # The checks walk every pair in Python: run on each call, they took the kernel to 0.785 ms a call
    # on an H200 (ResNet-50 + head), foreach 0.206 ms. A list seen before runs unchecked; one not seen is
    # checked before it runs.
    checked = []
    check = mt._check
    monkeypatch.setattr(mt, "_check", lambda ks, qs: checked.append(len(ks)) or check(ks, qs))
    ks, qs = param_pairs(SHAPES)
    for m in (0.9, 0.5, 0.99):
        check_against_reference(ks, qs, m)
    assert checked == [len(SHAPES)]
    with pytest.raises(ValueError, match="one dtype"):
        mt.momentum_update_triton(ks, [qs[0].double(), *qs[1:]], 0.9)
    assert checked == [len(SHAPES)] * 2


@pytest.mark.parametrize(
    "other, refused",
    [
        (lambda k, q: (k, q.transpose(0, 1)), "strides"),  # the query's memory read in another order
        (lambda k, q: (k, q.view(torch.int32)), "one dtype"),  # its bytes read as another type
        # the same size and strides in another shape: rows with gaps between them, in a larger buffer
        (lambda k, q: (k.as_strided((6, 4), (6, 1)), q.as_strided((6, 4), (6, 1))), "dense"),
    ],
    ids=["transposed", "int32", "gaps"],
)
def test_a_list_at_a_checked_lists_addresses_is_checked_where_its_layout_differs(interpret, other, refused):
    # The tables were found by the tensors' addresses and sizes: a list at those of a checked one but
    # in another layout, shape or dtype (here views of the same memory; in a process, a freed list's
    # addresses reused) ran unchecked, the query's elements paired with the wrong keys' elements
    (bk, b), (bq, c) = (torch.randn(40).split([24, 16]) for _ in range(2))
    ks, qs = [bk.view(4, 6), b], [bq.view(4, 6), c]
    check_against_reference(ks, qs, 0.9)
    k, q = other(ks[0], qs[0])
    with pytest.raises(ValueError, match=refused):
        mt.momentum_update_triton([k, b], [q, c], 0.9)


def test_bad_input_is_refused(interpret, monkeypatch):
    ks, qs = param_pairs(SHAPES[:3])
    with pytest.raises(ValueError, match="length"):
        mt.momentum_update_triton(ks[:-1], qs, 0.9)
    with pytest.raises(ValueError, match="one dtype"):
        mt.momentum_update_triton(ks, [qs[0].double(), *qs[1:]], 0.9)
    with pytest.raises(ValueError, match="strides"):  # the same shape, laid out differently
        mt.momentum_update_triton(ks, [qs[0].transpose(0, 1).contiguous().transpose(0, 1), *qs[1:]], 0.9)
    with pytest.raises(ValueError, match="dense"):  # gaps between the elements
        mt.momentum_update_triton([ks[0][:, :, ::2], *ks[1:]], [qs[0][:, :, ::2], *qs[1:]], 0.9)
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        mt.momentum_update_triton([k.double() for k in ks], [q.double() for q in qs], 0.9)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        mt.momentum_update_triton(ks, qs, 0.9)


@pytest.mark.slow
def test_registered_backend():
    # A fresh process with the interpreter on at import: "triton" is in the registry, and the
    # dispatcher that MoCo.momentum_update calls reaches it.
    code = """
import torch
from moco_fast.kernels import momentum_update, momentum_update_reference
from moco_fast.kernels.momentum import MOMENTUM_BACKENDS
from moco_fast.kernels.momentum_triton import momentum_update_triton
assert MOMENTUM_BACKENDS.get("triton") is momentum_update_triton, sorted(MOMENTUM_BACKENDS)
ks, qs = [torch.randn(5, 7), torch.randn(9000)], [torch.randn(5, 7), torch.randn(9000)]
ref = [k.clone() for k in ks]
momentum_update_reference(ref, qs, 0.99)
momentum_update(ks, qs, 0.99, backend="triton")
for x, y in zip(ks, ref):
    torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_on_cuda(monkeypatch, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    shapes = [*SHAPES, (2048, 2048), (512, 256, 3, 3)]
    ks, qs = param_pairs(shapes, dtype=dtype, device="cuda")
    ref = [k.clone() for k in ks]
    torch._foreach_lerp_(ref, qs, 1.0 - 0.999)
    mt.momentum_update_triton(ks, qs, 0.999)
    torch.cuda.synchronize()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for a, b in zip(ks, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_strides_of_size_one_dimensions_do_not_matter(interpret):
    # Channels-last 1x1 conv weights: an elementwise op may give (C, 1, 1, 1) where the parameter has
    # (C, 1, C, C); both are the same layout.
    k = torch.empty_strided((8, 4, 1, 1), (4, 1, 4, 4)).normal_()
    q = torch.empty_strided((8, 4, 1, 1), (4, 1, 1, 1)).normal_()
    check_against_reference([k], [q], 0.9)


# -- sum0, the kernel modules' interpreter-safe sum along axis 0 ---------------------------------------
def _column_sums_body(x, out, M: tl.constexpr, N: tl.constexpr):
    v = tl.load(x + tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :])
    tl.store(out + tl.arange(0, N), _sum0(v))  # noqa: F821 (jitted_for_mode puts it here)


def column_sums():
    """The kernel, jitted afresh (with sum0 as `_sum0`) in the current mode."""
    return mt.jitted_for_mode({}, globals(), {"_sum0": mt.sum0}, _column_sums_body)[0]


@pytest.mark.parametrize("own", [True, False], ids=["tritons", "ours"])
def test_sum0_with_tritons_sum_combiner_or_without(interpret, monkeypatch, own):
    # sum0 reduces with triton.language.standard._sum_combine, a private name; where a triton has none
    # (a module without the name here: triton itself untouched) a combiner of ours, the same sums
    combine = mt.sum_combiner(tl.standard if own else SimpleNamespace())
    assert (combine is tl.standard._sum_combine) == own
    monkeypatch.setattr(mt, "_SUM_COMBINE", combine)
    x = torch.randn(8, 4, dtype=torch.float64)
    out = torch.empty(4, dtype=torch.float64)
    column_sums()[(1,)](x, out, M=8, N=4)
    torch.testing.assert_close(out, x.sum(0), rtol=1e-15, atol=1e-15)


def test_sum0_without_tritons_sum_combiner_builds_for_sm90(monkeypatch):
    # the compiled frontend takes our combiner as a jit function, made whatever TRITON_INTERPRET said
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(mt, "_SUM_COMBINE", mt.sum_combiner(SimpleNamespace()))
    assert ".entry" in sm90_ptx(column_sums(), {"x": "*fp32", "out": "*fp32"}, {"M": 8, "N": 4})
