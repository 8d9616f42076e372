"""FFCV's import sets torch's and Numba's thread counts to 1 (ffcv.pipeline.compiler runs
Compiler.set_num_threads(1)): each module of the FFCV backend, imported directly and first (not through
create_loader), keeps the caller's counts, as convert's import of FFCV's writer does.

One process for all the cases (FFCV's first import is ~4 s of Numba compiling, torch's ~3 s): before
each, FFCV's modules and the backend's are dropped from sys.modules, so that each import runs FFCV's
import again, its set_num_threads(1) with it, as the first import of a fresh process would."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("ffcv")

CASES = [
    "import moco_fast.loaders.ffcv",
    "import moco_fast.loaders.ffcv_ops",
    "import moco_fast.loaders.ffcv_cache",
    # convert_beton imports FFCV's writer where it writes, under kept_ffcv_import_threads
    "from moco_fast.threads import kept_ffcv_import_threads\nwith kept_ffcv_import_threads():\n    import ffcv.writer",
]
SCRIPT = """
import sys, numba, torch
for case in CASES:
    for name in [n for n in sys.modules if n == "ffcv" or n.startswith(("ffcv.", "moco_fast.loaders.ffcv"))]:
        del sys.modules[name]
    torch.set_num_threads(3)
    numba.set_num_threads(3)
    exec(case, {})
    print(torch.get_num_threads(), numba.get_num_threads())
"""


@pytest.mark.slow  # one process that imports torch and FFCV: 11-21 s on 2 shared cores (four took ~48 s)
def test_a_direct_import_keeps_the_callers_thread_counts():
    env = {**os.environ, "NUMBA_NUM_THREADS": "4"}  # numba.set_num_threads(3) needs 3 or more
    code = f"CASES = {CASES!r}\n{SCRIPT}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert dict(zip(CASES, out.stdout.splitlines())) == {case: "3 3" for case in CASES}
