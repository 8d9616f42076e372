"""README.md's "Use from Python" block, run as written on a tiny image folder, and docs/dali.md's
corrupt-JPEG finder, run on damaged JPEGs, and each documented sweep's settings checked: the docs
cannot drift from what they show."""

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
DALI_DOC = README.parent / "docs" / "dali.md"


def python_block() -> str:
    """The one ```python block of the README's "### Use from Python" section."""
    section = README.read_text().split("### Use from Python\n", 1)[1].split("\n#", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return block


def test_the_readmes_python_block_runs_as_written(tiny_root, tmp_path):
    out = tmp_path / "py"
    # the block's paths and sizes for a 32-image folder and a 1-epoch run that evaluates nothing; each
    # must be in the block, so that an edit of the README meets this test
    tiny = '"optim.epochs": 1, "optim.batch_size": 8, "moco.k": 32, "moco.bn_splits": 2, "data.workers": 0, '
    tiny += '"runtime.device": "cpu", "runtime.final_knn": False, "runtime.knn_baseline": False'
    edits = {
        '"/data/cifar10"': repr(str(tiny_root)),
        '"runs/py': f'"{out}',
        '"optim.epochs": 2': tiny,
        "batch_size=64": "batch_size=8",
    }
    code = python_block()
    for old, new in edits.items():
        assert old in code, f"the README's block no longer has {old}"
        code = code.replace(old, new)
    names: dict = {}
    exec(compile(code, str(README), "exec"), names)
    assert names["row"]["epoch"] == 1
    assert names["run_cfg"].runtime.out == str(out)
    assert names["batch"].im_q.shape[0] == 8 and names["features"].shape[0] == 8
    assert "conv1.weight" in torch.load(out / "resnet.pth")  # a torchvision ResNet's state dict


def test_the_dali_docs_corrupt_jpeg_finder_names_each_damaged_file_and_no_good_one(tmp_path):
    pytest.importorskip("cv2")  # the finder decodes with OpenCV (the ffcv extra)
    section = DALI_DOC.read_text().split("## Corrupt images\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    (tmp_path / "find.py").write_text(block)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), np.uint8)).save(buf, "JPEG")
    good = buf.getvalue()
    data = tmp_path / "data"
    data.mkdir()
    scan = good.index(b"\xff\xda")
    damaged = bytearray(good)
    damaged[scan + 40 : -50 : 37] = bytes(b ^ 0x5A for b in damaged[scan + 40 : -50 : 37])
    files = {
        "good.JPEG": good,
        "empty.jpg": b"",  # the finder's earlier cv2-only version died here, its traceback in the captured stderr
        "garbage.jpg": np.random.default_rng(1).bytes(4000),
        "header.jpg": b"\0\0" + good[2:],
        "truncated.jpg": good[: len(good) * 6 // 10],  # OpenCV 5 fails it without a word
        "end.jpg": good[:-2],
        "scan.jpg": bytes(damaged),  # decodes, with libjpeg's "Corrupt JPEG data" warning
    }
    for name, content in files.items():
        (data / name).write_bytes(content)
    out = subprocess.run([sys.executable, "find.py", str(data)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    named = {Path(line.split(" ", 1)[0]).name for line in out.stdout.splitlines()}
    assert named == set(files) - {"good.JPEG"}, out.stdout


def documented_sweeps() -> list[str]:
    """Each `moco-fast sweep` command in the fenced blocks of README.md and docs/experiments.md, its
    continued lines joined and its comment left off."""
    found = []
    for doc in (README, README.parent / "docs" / "experiments.md"):
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", doc.read_text(), re.S):
            for command in block.replace("\\\n", " ").splitlines():
                if command.startswith("moco-fast sweep "):
                    found.append(command.split("  #", 1)[0])
    return found


def test_each_documented_sweep_passes_every_settings_checks(tmp_path, monkeypatch, capsys):
    # the README's `--moco-k 256,4096 ... -- --preset cifar` was refused before anything trained: the
    # cifar preset's batch of 512 enqueues more keys a step than a queue of 256 holds
    import moco_fast.trainer
    from moco_fast.cli import main

    class Checked(Exception):
        """Raised where the sweep has checked every setting, before the data is read."""

    def checked(*args, **kwargs):
        raise Checked

    monkeypatch.setattr(moco_fast.trainer, "check_workers", checked)  # run_sweep's next step
    monkeypatch.chdir(tmp_path)
    commands = documented_sweeps()
    assert len(commands) >= 3, commands  # the README's and experiments.md's two
    for command in commands:
        with pytest.raises(Checked):
            main(command.split()[1:])
            pytest.fail(f"{command}: {capsys.readouterr().err.strip()}")
