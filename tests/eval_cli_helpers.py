"""What the evaluation-command test files share (not a test module: pytest does not collect it): the
settings of the `run_dir` fixture's checkpoint (conftest.py), the one-line error (test_cli_checks and
test_run_messages read it too), and a stand-in for the training that records its config and stops."""

from __future__ import annotations

TINY = {
    "model.arch": "resnet18",
    "model.stem": "imagenet",
    "moco.k": 16,
    "optim.batch_size": 8,
    "optim.epochs": 1,
    "runtime.device": "cpu",
    "data.workers": 0,
}


class Stop(Exception):
    """Raised by a stand-in for the training function: the command got past its checks."""


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def stop_training(monkeypatch) -> list:
    """Replaces run_lincls and fine_tune with a stand-in that records its config and raises Stop."""
    import moco_fast.finetune
    import moco_fast.lincls

    seen = []

    def stand_in(cfg, loaded=None):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(moco_fast.lincls, "run_lincls", stand_in)
    monkeypatch.setattr(moco_fast.finetune, "fine_tune", stand_in)
    return seen
