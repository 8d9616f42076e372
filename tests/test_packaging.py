"""The wheel that `pip install .` builds: what it holds, and that an installed copy runs from itself.
Every other test imports the editable install, which maps moco_fast.loaders and moco_fast.kernels to
the repository's loaders/ and kernels/: a module or data file that setup.py leaves out passes there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a wheel built from a copy of the repository: ~10 s on 2 cores

ROOT = Path(__file__).resolve().parents[1]
# where each folder of the repository lands in the installed package (setup.py's package_dir)
INSTALLED_AS = {"moco_fast": "moco_fast", "loaders": "moco_fast/loaders", "kernels": "moco_fast/kernels"}
DEMO = "moco_fast/demo_data"


def _can_build_wheels() -> bool:
    # asked in a process of its own: importing setuptools here swaps distutils under what imported it
    # already. setuptools >= 70.1 has bdist_wheel itself; before that it comes from the `wheel` package
    probe = "import setuptools, pip\ntry:\n import setuptools.command.bdist_wheel\nexcept ImportError:\n import wheel"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The repository as `pip install .` sees it, without what .gitignore keeps out (.venv, runs,
    caches): copied, as setuptools writes build/ and *.egg-info into the tree it builds. Its build/lib
    holds what an earlier build of this checkout left there, of modules removed since."""
    ignored = [line.strip().rstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines()]
    ignore = shutil.ignore_patterns(".git", *[p for p in ignored if p and not p.startswith("#")])
    dst = tmp_path_factory.mktemp("source") / "moco-fast"
    shutil.copytree(ROOT, dst, ignore=ignore)
    for stale in ("moco_fast/loaders/removed.py", "loaders/__init__.py"):
        (dst / "build/lib" / stale).parent.mkdir(parents=True, exist_ok=True)
        (dst / "build/lib" / stale).write_text("")
    return dst


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    if not _can_build_wheels():
        pytest.skip("building a wheel needs pip and setuptools (+ wheel before setuptools 70.1)")
    out = tmp_path_factory.mktemp("wheel")
    # offline, with this environment's setuptools, as the brief's `pip wheel --no-build-isolation` does
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation", "-q"]
    done = subprocess.run(
        [*pip, "--disable-pip-version-check", "-w", str(out), str(source)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("moco_fast-*.whl")
    return built


def test_the_wheel_holds_the_package_its_loaders_kernels_and_demo_set_and_nothing_else(source, wheel):
    zf = zipfile.ZipFile(wheel)
    meta = {n for n in zf.namelist() if n.split("/")[0].endswith(".dist-info")}
    files = set(zf.namelist()) - meta
    demo_images = len(list((source / DEMO).rglob("*.jpg")))
    assert len([n for n in files if n.startswith(DEMO + "/") and n.endswith(".jpg")]) == demo_images > 0
    expected = {f"{DEMO}/{p.relative_to(source / DEMO).as_posix()}" for p in (source / DEMO).rglob("*") if p.is_file()}
    for folder, installed in INSTALLED_AS.items():
        # every module, a new subpackage's too (setup.py lists its packages by name)
        expected |= {
            f"{installed}/{p.relative_to(source / folder).as_posix()}" for p in (source / folder).rglob("*.py")
        }
    # no bare loaders/kernels/tests/bench, no caches, nothing an earlier build left in build/lib: the
    # package and its data only
    assert files == expected, f"missing: {sorted(expected - files)[:10]}; not expected: {sorted(files - expected)[:10]}"
    dist_info = next(iter(meta)).split("/")[0]
    assert zf.read(f"{dist_info}/top_level.txt").decode().split() == ["moco_fast"]
    assert "moco-fast = moco_fast.cli:main" in zf.read(f"{dist_info}/entry_points.txt").decode()


def test_an_installed_wheel_imports_and_finds_the_demo_set_inside_itself(source, wheel, tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # a pure-Python wheel installs as its files unpacked (what `pip install --target` does, faster)
    zipfile.ZipFile(wheel).extractall(target)
    # PYTHONPATH's copy comes before site-packages; the editable finder (a meta path hook that maps
    # moco_fast to the repository) is dropped too, so that nothing here is read from the repository
    code = textwrap.dedent("""
        import json, sys
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        import moco_fast, moco_fast.cli, moco_fast.kernels, moco_fast.loaders
        from moco_fast.data import DEMO_ROOT, load_splits
        splits = load_splits(None, check=False)
        modules = [moco_fast, moco_fast.cli, moco_fast.kernels, moco_fast.loaders]
        print(json.dumps({"files": [m.__file__ for m in modules], "demo": str(DEMO_ROOT),
                          "train": len(splits.train), "eval": len(splits.eval)}))
    """)
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(Path(f).is_relative_to(target) for f in seen["files"]), seen["files"]
    assert Path(seen["demo"]) == target / DEMO
    assert (seen["train"], seen["eval"]) == tuple(
        len(list((source / DEMO / split).rglob("*.jpg"))) for split in ("train", "test")
    )
