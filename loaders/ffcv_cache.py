"""FFCV's page-cache reader (os_cache=1) with its state's Numba types declared without changing Numba's.

FFCV 1.0.2's `OSCacheManager.state_type` (ffcv/memory_managers/os_cache.py) marks the mapped file
read-only with `t1 = nb.uint8[::1]; t1.mutable = False`. Numba interns its types: `nb.uint8[::1]` is
the process's one writable `array(uint8, 1d, C)` object, and a type hashes as (dtype, ndim, layout,
mutable, aligned). So every Loader changes, in place, the hash of a type that earlier pipelines
compiled with (a writable uint8 buffer) and that is a key of their dispatchers' `overloads`. When one
of those dispatchers is collected, Numba's finalizer (numba/core/dispatcher.py, `_make_finalizer`)
iterates that OrderedDict, cannot find the key under its new hash and prints `Exception ignored in:
<finalize object ...> KeyError: (Array(uint8, 1, 'C', True, aligned=True), ...)`: each loader after
the first in one process (a sweep's settings, a benchmark's rows) did.

`PageCacheManager` declares the same types with Numba's constructor: the mapped file read-only (the
reader's return type too, which FFCV's code only got read-only through that change), the page
tables writable, as FFCV's effectively are. `use_page_cache_manager` has FFCV's Loader build it.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from moco_fast.threads import kept_ffcv_import_threads

with kept_ffcv_import_threads():  # FFCV's import sets torch's and Numba's thread counts to 1
    import ffcv.loader.loader
    from ffcv.memory_managers import OSCacheManager
    from ffcv.pipeline.compiler import Compiler

BYTES = nb.types.Array(nb.uint8, 1, "C", readonly=True)  # a slice of np.memmap(mode="r")
TABLE = nb.types.Array(nb.uint64, 1, "C")  # the manager's sorted pointers and sizes


class PageCacheManager(OSCacheManager):
    @property
    def state_type(self) -> nb.types.Tuple:
        return nb.types.Tuple([BYTES, TABLE, TABLE])  # (the file, its pointers, their sizes)

    def compile_reader(self):
        def read(address, mem_state):  # FFCV's own: the bytes of the sample field at `address`
            size = mem_state[2][np.searchsorted(mem_state[1], address)]
            return mem_state[0][address : address + size]

        return Compiler.compile(read, BYTES(nb.uint64, self.state_type))


def use_page_cache_manager() -> None:
    """FFCV's Loader builds its os_cache=1 manager by this module-level name, in its __init__; there
    is no argument to pass another. Idempotent; every Loader of the process then gets the fix."""
    ffcv.loader.loader.OSCacheManager = PageCacheManager
