"""FFCV's import sets torch's and Numba's thread counts to 1 (ffcv.pipeline.compiler runs
Compiler.set_num_threads(1)): each module of the FFCV backend, imported directly and first in a fresh
process (not through create_loader), keeps the caller's counts, as convert's import of FFCV's writer does."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("ffcv")

SET = "import numba, torch\ntorch.set_num_threads(3)\nnumba.set_num_threads(3)\n"
SHOW = "\nprint(torch.get_num_threads(), numba.get_num_threads())\n"
# convert_beton imports FFCV's writer where it writes, under kept_ffcv_import_threads
WRITER = (
    "from moco_fast.threads import kept_ffcv_import_threads\nwith kept_ffcv_import_threads():\n    import ffcv.writer"
)


@pytest.mark.slow  # each a fresh process that imports FFCV: ~10 s on 2 cores
@pytest.mark.parametrize(
    "imports",
    [
        "import moco_fast.loaders.ffcv",
        "import moco_fast.loaders.ffcv_ops",
        "import moco_fast.loaders.ffcv_cache",
        WRITER,
    ],
)
def test_a_direct_import_keeps_the_callers_thread_counts(imports):
    env = {**os.environ, "NUMBA_NUM_THREADS": "4"}  # numba.set_num_threads(3) needs 3 or more
    out = subprocess.run(
        [sys.executable, "-c", SET + imports + SHOW], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "3"]
