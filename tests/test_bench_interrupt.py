"""Ctrl-C before a bench's first row (torch importing, flags and data being checked) ends as an
interrupted bench does: one line, exit status 130, nothing written; it was Python's traceback. One
during the rows leaves a JSON that says it is no whole run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def sigint_in_import(module: str) -> str:
    """A real SIGINT to the bench run as a script, as its imports reach `module`; at its exit it says on
    stdout whether torch was imported whole."""
    return f"""
import atexit, importlib.abc, os, runpy, signal, sys

class Interrupt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == {module!r}:
            os.kill(os.getpid(), signal.SIGINT)
        return None

# as from a terminal: a runner in the background (`make test &`) starts it with SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.meta_path.insert(0, Interrupt())
atexit.register(lambda: print("torch whole:", hasattr(sys.modules.get("torch"), "cuda")))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", ["throughput.py", "ffcv_loader.py"])
# after torch, or within its import (as its C++ side loads), where the CLI holds it until torch is in
# (signals.import_holding_signals): there it could abort the process
@pytest.mark.parametrize("module", ["moco_fast.loaders", "torch._C"])
def test_sigint_while_importing_is_one_line_and_130(script, module, tmp_path):
    out = tmp_path / "rows.json"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-c", sigint_in_import(module), str(BENCH / script), "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 130, run.stderr
    assert run.stderr.startswith("interrupted") and run.stderr.count("\n") == 1, run.stderr
    assert run.stdout == "torch whole: True\n" and not out.exists()


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def status(main, argv: list[str]) -> int | str:
    """main's exit status; a Ctrl-C that escapes it would end pytest's whole session."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        return "KeyboardInterrupt escaped main"


def test_throughput_interrupted_in_data_check(tmp_path, capsys, monkeypatch):
    import throughput

    monkeypatch.setattr(throughput, "check_data", interrupt)
    out = tmp_path / "rows.json"
    assert status(throughput.main, ["--device", "cpu", "--loader", "synthetic", "--json", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted") and err.count("\n") == 1 and not out.exists(), err


def test_ffcv_bench_interrupted_in_its_checks(tmp_path, capsys, monkeypatch):
    import ffcv_loader

    monkeypatch.setattr(ffcv_loader, "check_output_path", interrupt)
    out = tmp_path / "rows.json"
    assert status(ffcv_loader.main, ["--rows", "aug-sample", "--json", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted") and err.count("\n") == 1 and not out.exists(), err


@pytest.mark.parametrize(
    ("raised", "code", "complete", "error"),
    [
        (KeyboardInterrupt, 130, False, "not run (interrupted)"),
        (RuntimeError("out of memory"), 1, True, "RuntimeError: out of memory"),  # a failed row ran
        (None, 0, True, None),
    ],
)
def test_throughputs_json_says_whether_every_row_ran(raised, code, complete, error, tmp_path, capsys, monkeypatch):
    # A Ctrl-C'd run's JSON said so in its rows' errors only: a script had to scan them to tell it
    # from a whole run. `complete` says it, false too in the file as it stands between rows.
    import throughput

    out, on_disk = tmp_path / "rows.json", []

    def run(bench, spec):
        if out.exists():
            on_disk.append(json.loads(out.read_text())["complete"])
        if spec.name == "trainer:eager" and raised is not None:
            raise raised
        return {"name": spec.name, "kind": spec.kind, "img_per_s": 100.0, "ms_per_step": 160.0}

    monkeypatch.setattr(throughput.Bench, "run", run)
    argv = ["--device", "cpu", "--loader", "synthetic", "--rows", "trainer,reference,trainer:eager"]
    assert status(throughput.main, [*argv, "--json", str(out)]) == code
    result = json.loads(out.read_text())
    assert on_disk == [False, False] and result["complete"] is complete
    assert [r.get("error") for r in result["rows"]] == [None, None, error]
