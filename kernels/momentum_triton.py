"""The momentum (EMA) update as one Triton multi-tensor kernel: k <- k + (1 - m) * (q - k).

Every key/query parameter pair is cut into chunks of BLOCK elements; one program updates one chunk.
The program finds its tensor through small device tables (the tensors' addresses and sizes, and a
chunk -> (tensor, offset) map) that are built once per parameter list and cached, so a steady-state
call is one launch with no allocation and no host-device copy. The lists are checked (dtypes,
shapes, strides) when their tables are built, not on every call: that Python walk over every pair
(ResNet-50 + head: 163) takes longer than the kernel, and the GPU would wait for it. Like
`torch._foreach_lerp_`, it reads k and q once and writes k once: 12 bytes per fp32 parameter, the
memory-bandwidth floor.

On the CPU the kernel runs under Triton's interpreter (`TRITON_INTERPRET=1`), which is how the tests
check it against the per-parameter reference without a GPU.
"""

from __future__ import annotations

import operator
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the foreach backend needs nothing
    triton = None
    tl = None

Tensors = Sequence[torch.Tensor]
BLOCK = 4096  # elements per program: 16 KB of fp32 per operand keeps enough bytes in flight per SM
_CACHE_SIZE = 8  # parameter lists remembered (one model has one; tests make a few)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True where the kernel can run: triton imports and there is a GPU or the interpreter is on."""
    return triton is not None and (torch.cuda.is_available() or interpreting())


def _add(a, b):
    return a + b


def sum_combiner(standard) -> Callable:
    """sum0's combine function: `standard`'s (triton.language.standard's) `_sum_combine`, a + b, which
    compiles as tl.sum does and which the interpreter, knowing it, does as one numpy sum. A private
    name: where a triton has none, `_add` as a JITFunction whatever the mode, correct in both (compiled
    code calls it as a jit function, the interpreter its Python function), but under the interpreter
    once per element (minutes for the tests)."""
    found = getattr(standard, "_sum_combine", None)
    return found if found is not None else triton.JITFunction(_add)


_SUM_COMBINE = None if tl is None else sum_combiner(tl.standard)


def sum0(v):
    """A jit helper of the kernel modules (jitted_for_mode): the sum of `v` along axis 0. Not tl.sum
    (a jit function of triton's, built without the interpreter when triton was imported before
    TRITON_INTERPRET was set, cannot run under it), nor tl.reduce with a combine function of ours
    where triton has its own (`sum_combiner`: the interpreter calls ours once per element)."""
    return tl.reduce(v, 0, _SUM_COMBINE)


def check_device(device: torch.device, kernel: str) -> None:
    """Whether a Triton kernel of this package (`kernel`, as the errors name it) can run on `device`:
    triton importable, and a GPU, or the CPU under the interpreter; else a ValueError. The augmentation
    kernels' and split BN's check, at construction and at each call."""
    if triton is None:
        raise ValueError(f"{kernel} needs the triton package")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{kernel} needs a CUDA batch (or TRITON_INTERPRET=1 on the CPU), got a {device.type} one")


def _momentum_body(
    k_addr,
    q_addr,
    sizes,
    chunk_tensor,
    chunk_start,
    w,
    ELEM: tl.constexpr,
    HIGH: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)  # which tensor this program updates
    start = tl.multiple_of(tl.load(chunk_start + pid), BLOCK)  # and where in it (a whole number of chunks)
    n = tl.load(sizes + t)
    # The tables hold raw addresses (int64); ELEM is the parameters' element type.
    kp = tl.load(k_addr + t).to(tl.pointer_type(ELEM))
    qp = tl.load(q_addr + t).to(tl.pointer_type(ELEM))
    if ALIGNED:  # every address is a multiple of 16 bytes (checked on the host)
        kp = tl.multiple_of(kp, 16)
        qp = tl.multiple_of(qp, 16)
    offs = start + tl.arange(0, BLOCK)
    # A whole chunk loads and stores without a mask: with the alignment above, 16-byte vector
    # accesses (ld.global.v4 in the PTX for sm_90; a mask against a size read from memory, or
    # addresses of unknown alignment, leave one element per access). The last chunk is masked.
    whole = start + BLOCK <= n
    mask = offs < n
    if whole:
        k = tl.load(kp + offs).to(tl.float32)
        q = tl.load(qp + offs).to(tl.float32)
    else:
        k = tl.load(kp + offs, mask=mask).to(tl.float32)
        q = tl.load(qp + offs, mask=mask).to(tl.float32)
    # torch.lerp's two forms, exact at both ends (w = 0 keeps k, w = 1 copies q) like the reference.
    if HIGH:
        out = (q - (q - k) * (1.0 - w)).to(ELEM)
    else:
        out = (k + w * (q - k)).to(ELEM)
    if whole:
        tl.store(kp + offs, out)
    else:
        tl.store(kp + offs, out, mask=mask)


def jitted_for_mode(cache: dict, namespace: dict, helpers: dict[str, Callable], *bodies: Callable) -> tuple:
    """`bodies` jitted, once per mode (compiled or TRITON_INTERPRET=1) in `cache`: made on first use,
    so that TRITON_INTERPRET set after import still counts, and one set per mode (a GPU process can
    also run the interpreter in a test). A kernel finds its helper functions by name among its
    module's globals (`namespace`): they are jitted per mode too, and the current mode's put there."""
    mode = interpreting()
    if mode not in cache:
        cache[mode] = ({name: triton.jit(fn) for name, fn in helpers.items()}, tuple(map(triton.jit, bodies)))
    jitted_helpers, kernels = cache[mode]
    namespace.update(jitted_helpers)
    return kernels


_KERNELS: dict[bool, tuple] = {}


def _kernel():
    return jitted_for_mode(_KERNELS, globals(), {}, _momentum_body)[0]


class _Tables:
    """Device tables for one (key list, query list): addresses, sizes, and the chunk map."""

    def __init__(self, ks: Tensors, qs: Tensors, device: torch.device):
        self.elem = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[ks[0].dtype]
        sizes = [k.numel() for k in ks]
        chunk_tensor = [i for i, n in enumerate(sizes) for _ in range(0, n, BLOCK)]
        chunk_start = [s for n in sizes for s in range(0, n, BLOCK)]
        host = torch.tensor([[k.data_ptr() for k in ks], [q.data_ptr() for q in qs], sizes], dtype=torch.int64)  # 3 x T
        chunks = torch.tensor([chunk_tensor, chunk_start], dtype=torch.int64)  # 2 x chunks
        if device.type == "cuda":
            # Pinned + non_blocking: built once, and even then no blocking copy (the sync-free test
            # runs the step under set_sync_debug_mode("error")). Keep the host copies alive.
            host, chunks = host.pin_memory(), chunks.pin_memory()
            self._host = (host, chunks)
        table, chunk_map = host.to(device, non_blocking=True), chunks.to(device, non_blocking=True)
        self.args = (table[0], table[1], table[2], chunk_map[0], chunk_map[1])  # the kernel's, made once
        self.num_chunks = len(chunk_tensor)
        # 16-byte aligned addresses (PyTorch's allocations are; a view into a flat buffer may not be)
        self.aligned = all(k.data_ptr() % 16 == 0 and q.data_ptr() % 16 == 0 for k, q in zip(ks, qs, strict=True))


_TABLES: OrderedDict[tuple, _Tables] = OrderedDict()
_KEY = (torch.Tensor.data_ptr, torch.Tensor.size, torch.Tensor.stride, operator.attrgetter("dtype"))


def _tables(ks: Tensors, qs: Tensors) -> _Tables | None:
    """The lists' tables (None for empty lists), checked and built where the key is new. The key is
    what the checks read, tensor by tensor (addresses, shapes, strides, dtypes), so a list found is
    one they passed: addresses and sizes alone, all the kernel reads, let a list in another layout,
    shape or dtype at a checked list's addresses (its views, or a freed list's memory reused) run
    unchecked, its pairs matched element by element in the wrong order. The devices are not in it:
    CUDA's unified addressing gives every device and the host addresses of their own. The key is
    read with `map` over C methods: a Python loop over the pairs, as the checks are, would cost more
    than the kernel."""
    key = tuple(tuple(map(read, ts)) for read in _KEY for ts in (ks, qs))
    found = _TABLES.get(key)
    if found is None:
        _check(ks, qs)
        if not ks:
            return None
        found = _TABLES[key] = _Tables(ks, qs, ks[0].device)
        if len(_TABLES) > _CACHE_SIZE:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return found


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    """The strides that decide the layout: a dimension of size 1 may have any stride (channels-last
    1x1 conv weights come out of an elementwise op as (C, 1, 1, 1) or (C, 1, C, C))."""
    return tuple(st for sz, st in zip(t.shape, t.stride()) if sz != 1)


def _dense(t: torch.Tensor) -> bool:
    """The elements fill one block of memory with no gaps or overlaps, in any dimension order
    (contiguous, channels-last, transposed): the kernel walks each tensor as a flat buffer, which is
    elementwise-correct when key and query share the strides."""
    expect = 1
    for size, stride in sorted(((sz, st) for sz, st in zip(t.shape, t.stride()) if sz != 1), key=lambda d: d[1]):
        if stride != expect:
            return False
        expect *= size
    return True


def _check(ks: Tensors, qs: Tensors) -> None:
    if len(ks) != len(qs):
        raise ValueError("key and query parameter lists differ in length")
    if not ks:
        return
    device, dtype = ks[0].device, ks[0].dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the triton momentum kernel takes fp32/fp16/bf16 parameters, not {dtype}")
    for k, q in zip(ks, qs):
        if k.device != device or q.device != device or k.dtype != dtype or q.dtype != dtype:
            raise ValueError("the triton momentum kernel needs all parameters on one device in one dtype")
        if k.shape != q.shape or _strides(k) != _strides(q) or not _dense(k):
            raise ValueError(
                "the triton momentum kernel needs key/query pairs of equal shape and strides, each one dense "
                "block of memory (contiguous or channels-last)"
            )


@torch.no_grad()
def momentum_update_triton(params_k: Tensors, params_q: Tensors, m: float) -> None:
    """k <- m * k + (1 - m) * q for every pair, in one launch. `m` is a Python float (no sync)."""
    if triton is None:
        raise ValueError("the triton momentum backend needs the triton package")
    # No detach: the kernel reads the queries' addresses, which autograd never sees
    ks, qs = list(params_k), list(params_q)
    if ks and ks[0].device.type == "cpu" and not interpreting():  # per call: the interpreter may be turned off
        raise ValueError("the triton momentum backend needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    t = _tables(ks, qs)
    if t is None:
        return
    w = 1.0 - m
    _kernel()[(t.num_chunks,)](*t.args, w, ELEM=t.elem, HIGH=w >= 0.5, BLOCK=BLOCK, ALIGNED=t.aligned)
