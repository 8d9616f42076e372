"""The suite on a machine without the dali and ffcv extras (the GPU machine, unless they are brought
over): every module collects, and those that need DALI or FFCV throughout skip whole. CI has both, so
nothing else would notice a module that imports either at its top (three did: `pytest -m gpu` there
ended at collection)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# a plugin (-p) that runs before any test module is imported: both packages look uninstalled
WITHOUT_EXTRAS = 'import sys\nfor name in ("nvidia.dali", "ffcv"):\n    sys.modules[name] = None\n'


@pytest.mark.slow
def test_every_module_collects_or_skips_without_dali_and_ffcv(tmp_path):
    (tmp_path / "without_extras.py").write_text(WITHOUT_EXTRAS)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    argv = ["-m", "pytest", "--collect-only", "-q", "-rs", "-p", "without_extras", "-p", "no:cacheprovider"]
    run = subprocess.run(
        [sys.executable, *argv, "tests"],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:]
    skipped = re.findall(r"SKIPPED \[1\] (tests/\S+?):\d+: could not import '([\w.]+)'", run.stdout)
    assert skipped and {name for _, name in skipped} <= {"nvidia.dali", "ffcv"}, run.stdout[-4000:]
