"""README.md's "Use from Python" block, run as written on a tiny image folder: the README cannot drift
from the functions it shows."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


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
