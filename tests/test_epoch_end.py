"""An epoch's end saves its checkpoint before the kNN monitor (--knn-every), which can take minutes:
a stop or a crash in the kNN loses no step, and the epoch's row, which the checkpoint holds, is in
metrics.jsonl after a --resume whether or not the run wrote it. Its row reads the device once, and
its progress bar's figures, read at --log-every's syncs, name the step they are of."""

import json
import os
import signal

import pytest
import torch
from run_helpers import rows
from test_stops import config, same_weights

import moco_fast.trainer as trainer
from moco_fast.config import build_config
from moco_fast.epoch import run_epoch
from moco_fast.metrics import MetricsWriter
from moco_fast.signals import Terminated

RUN = {"optim.epochs": 2, "data.loader": "torch", "runtime.knn_every": 1}


def stop_in_the_first_knn(monkeypatch):
    """The kNN monitor, which gets SIGTERM during its first pass (the CLI's handler raises at once)."""
    real, calls = trainer.knn_top1, []

    def knn(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(trainer, "knn_top1", knn)


def test_a_stop_in_the_knn_monitor_keeps_the_epoch_and_its_row(tiny_root, tmp_path, monkeypatch, handlers):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    trainer.train(config(whole, tiny_root, **RUN))
    stop_in_the_first_knn(monkeypatch)
    with pytest.raises(Terminated):
        trainer.train(config(cut, tiny_root, **RUN))
    state = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and "step" not in state  # the epoch, saved before its kNN
    (first,) = rows(cut)
    assert first["epoch"] == 1 and "knn_top1" not in first  # written on the way out, without the kNN
    assert state["row"] == first  # what --resume writes where a SIGKILL left no row
    monkeypatch.undo()
    trainer.train(config(cut, tiny_root, **RUN, **{"runtime.resume": "auto"}))
    a, b = rows(whole), rows(cut)
    assert [r["epoch"] for r in b] == [1, 2]
    assert (b[0]["loss"], b[1]["loss"], b[1]["knn_top1"]) == (a[0]["loss"], a[1]["loss"], a[1]["knn_top1"])
    assert same_weights(whole, cut) == []


def test_resume_writes_the_checkpoints_row_where_the_run_did_not(tmp_path):
    path = tmp_path / "metrics.jsonl"
    saved = {"epoch": 2, "loss": 1.5}
    path.write_text('{"epoch": 1, "loss": 2.0}\n{"epoch": 3, "loss": 1.0}\n')  # epoch 3: after the checkpoint
    writer = MetricsWriter(tmp_path)
    writer.keep_epochs(2, saved)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"epoch": 1, "loss": 2.0}, saved]
    writer.keep_epochs(2, {**saved, "loss": 9.9})  # the row is there: left as it is
    writer.keep_epochs(2, None)  # a checkpoint without a row (within the first epoch, or older)
    writer.keep_epochs(2, {"epoch": 1, "loss": 9.9})  # a row of another epoch than the checkpoint's
    writer.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"epoch": 1, "loss": 2.0}, saved]


def test_a_finished_run_killed_in_its_last_knn_gets_its_row_without_a_final_knn(tiny_root, tmp_path):
    # --no-final-knn (and every sweep's training) has no summary to owe: the row alone was owed
    run = {**RUN, "optim.epochs": 1, "runtime.final_knn": False}
    trainer.train(config(tmp_path, tiny_root, **run))
    (row,) = rows(tmp_path)
    (tmp_path / "metrics.jsonl").unlink()  # a SIGKILL in the last epoch's kNN: the checkpoint, no row
    (tmp_path / ".summary.json.host-4242.abcdefgh.tmp").write_text("{")  # and one in a finished run's summary write
    trainer.train(config(tmp_path, tiny_root, **run, **{"runtime.resume": "auto"}))
    assert rows(tmp_path) == [{k: v for k, v in row.items() if k != "knn_top1"}]
    assert not list(tmp_path.glob(".summary.json.*.tmp"))  # a finished run's start removes it too


def test_an_epochs_row_reads_the_device_once(monkeypatch):
    # On a GPU each read of a device tensor is a copy and a host wait: the row's loss and accuracy
    # were an .item() each, and check_finite read the loss again; both come in one .tolist() now,
    # and check_finite reads the row's loss. The one .item() left is the progress bar's, at the
    # epoch's last step (--log-every's sync).
    reads = []
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _r=real, _n=name: reads.append(_n) or _r(self))
    step = lambda batch: (torch.tensor(2.0), torch.tensor(0.5))  # noqa: E731
    row = run_epoch(step, [None] * 4, build_config("v2", {"runtime.log_every": 100}), 0, 0.1, torch.device("cpu"), 1)
    assert reads == ["item", "tolist"] and (row["loss"], row["pretext_acc"]) == (2.0, 50.0)


class Bar:
    """run_epoch's progress bar, which keeps what each draw (at an update) shows in `shown`."""

    def __init__(self, shown: list):
        self.n, self.postfix, self.shown = 0, "", shown

    def update(self, k):
        self.n += k
        self.shown.append((self.n, self.postfix))

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text

    def set_postfix(self, refresh=True, **figures):  # as tqdm writes them
        self.postfix = ", ".join(f"{k}={v}" for k, v in figures.items())

    def close(self):
        self.shown.append((self.n, self.postfix))


def test_the_bars_loss_names_the_step_it_is_of(monkeypatch):
    # The loss is read at a --log-every sync only, and the bar's count runs on: at step 14 it showed
    # step 10's loss as "loss=10.000" beside "14/25", as if it were step 14's
    shown = []
    monkeypatch.setattr("moco_fast.epoch.progress", lambda **k: Bar(shown))
    losses = iter(range(1, 26))
    step = lambda batch: (torch.tensor(float(next(losses))), torch.tensor(0.5))  # noqa: E731 (step i's loss is i)
    run_epoch(step, [None] * 25, build_config("v2", {"runtime.log_every": 10}), 0, 0.1, torch.device("cpu"), 1)
    assert len(shown) == 26  # 25 updates and the close
    for count, postfix in shown[:25]:
        synced = (count - 1) // 10 * 10  # the last sync before this update's draw (steps 10, 20)
        assert postfix.startswith(f"at step {synced}: loss={synced:.3f}, img_s=" if synced else ""), (count, postfix)


def test_the_bars_rate_counts_the_wait_for_its_steps(monkeypatch):
    # The clock was read before the loss's copy, which waits for the steps the host queued: on a
    # GPU the rate counted steps the device had not run. Here a step's queueing takes 1 s and the
    # device's run of both steps 8 s more, which the copy waits for: 2 steps of 256 in 10 s
    from types import SimpleNamespace

    clock = [0.0]
    monkeypatch.setattr("moco_fast.epoch.time", SimpleNamespace(perf_counter=lambda: clock[0]))
    item = torch.Tensor.item

    def waited(t):
        clock[0] += 8
        return item(t)

    monkeypatch.setattr(torch.Tensor, "item", waited)
    shown = []
    monkeypatch.setattr("moco_fast.epoch.progress", lambda **k: Bar(shown))

    def step(batch):
        clock[0] += 1
        return torch.tensor(1.0), torch.tensor(0.5)

    cfg = build_config("v2", {"runtime.log_every": 2, "optim.batch_size": 256})
    run_epoch(step, [None] * 2, cfg, 0, 0.1, torch.device("cpu"), 1)
    assert shown[-1][1] == "at step 2: loss=1.000, img_s=51", shown  # 512 images in 10 s, not in 2


def test_a_non_finite_epoch_loss_reaches_the_check_as_the_rows(tmp_path, monkeypatch, caplog):
    # check_finite reads the row's loss (a float) since the row reads the device once: the trainer
    # hands it over, and a NaN loss with finite weights is the warning, not a silent pass.
    row = {"loss": float("nan"), "img_per_s": 1.0}  # the steps are not what is tested
    monkeypatch.setattr(trainer, "_run_epoch", lambda step, loader, cfg, epoch, lr, *rest: {"epoch": epoch + 1, **row})
    with caplog.at_level("WARNING", logger="moco_fast"):
        trainer.train(config(tmp_path, **{"optim.epochs": 1}))
    assert "epoch 1: the mean loss is nan" in caplog.text
