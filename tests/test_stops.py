"""Checkpoints within an epoch: a stop signal or Ctrl-C during the steps is acted on at the next host
sync (a checkpoint of that step, then the stop as before), --save-every saves within an epoch, and
--resume continues the epoch at the next step as an uninterrupted run would have trained it."""

import logging
import os
import signal

import pytest
import torch
from run_helpers import last_error, rows

import moco_fast.trainer as trainer
from moco_fast import checkpoint as ckpt
from moco_fast.checkpoint import load_model
from moco_fast.cli import main
from moco_fast.config import ConfigError, build_config
from moco_fast.epoch import EpochPart, resumed_part
from moco_fast.signals import Terminated, _on_stop_signal
from moco_fast.stops import SaveClock, StopRequests

TINY = {
    "model.arch": "resnet18",
    "model.stem": "imagenet",
    "moco.k": 32,
    "moco.bn_splits": 2,
    "optim.batch_size": 8,
    "runtime.device": "cpu",
    "data.workers": 0,
    "runtime.final_knn": False,
    "runtime.log_every": 2,
    "runtime.save_every": 0.0,
}


def config(out, root=None, **extra):
    data = {"data.data": str(root)} if root else {"data.loader": "synthetic", "data.synthetic_steps": 5}
    return build_config("cifar", {**TINY, **data, "runtime.out": str(out), **extra})


def signal_at(monkeypatch, steps: dict[int, int]):
    """train_step, which sends itself signal steps[n] after its n-th call (1-based, over the run)."""
    real, calls = trainer.train_step, []

    def step(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) in steps:
            os.kill(os.getpid(), steps[len(calls)])
        return out

    monkeypatch.setattr(trainer, "train_step", step)
    return calls


def same_weights(a, b):
    sa = torch.load(a / "checkpoint.pt", weights_only=False)["model"]
    sb = torch.load(b / "checkpoint.pt", weights_only=False)["model"]
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


@pytest.mark.parametrize(
    "loader,workers",
    [
        ("torch", 0),
        pytest.param("torch", 2, marks=pytest.mark.slow),
        ("resident", 0),
        pytest.param("ffcv", 1, marks=pytest.mark.slow),
    ],
)
def test_a_stop_within_an_epoch_saves_its_step_and_resume_trains_as_without_it(
    tiny_root, tmp_path, monkeypatch, handlers, loader, workers, request
):
    # the torch loader draws each image's views from (seed, epoch, image) whatever worker makes it,
    # the resident loader from the step's own seed, FFCV's crops and flips from each image's (seed,
    # epoch, index) and its colour pass from the step's seed: the resumed run trains exactly as the
    # uninterrupted one (4 steps an epoch, a sync every 2; FFCV compiles a pipeline per run, ~25 s each)
    if loader == "ffcv":
        tiny_root = request.getfixturevalue("tiny_beton")  # the same 32 images
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run = {"optim.epochs": 2, "data.loader": loader, "data.workers": workers}
    trainer.train(config(whole, tiny_root, **run))
    calls = signal_at(monkeypatch, {5: signal.SIGTERM})  # in epoch 2's first step: acted on after its second
    with pytest.raises(Terminated) as stop:
        trainer.train(config(cut, tiny_root, **run))
    assert stop.value.signum == signal.SIGTERM and len(calls) == 6  # the steps up to the sync, no more
    state = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"], state["epoch_part"]["steps"]) == (1, 2, 4)
    assert [r["epoch"] for r in rows(cut)] == [1]
    load_model(cut / "checkpoint.pt")  # the evaluations (knn, lincls, export) read it as the weights of that step
    monkeypatch.undo()
    trainer.train(config(cut, tiny_root, **run, **{"runtime.resume": "auto"}))
    a, b = rows(whole), rows(cut)
    assert [r["epoch"] for r in b] == [1, 2]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["pretext_acc"] for r in a] == [r["pretext_acc"] for r in b]
    for r in b:  # every step of the epoch counted, the part before the stop too
        assert r["img_per_s"] * r["epoch_time_s"] == pytest.approx(4 * 8)
    state = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2 and "step" not in state
    assert same_weights(whole, cut) == []


def test_a_stop_at_an_epochs_last_step_is_its_end(tmp_path, monkeypatch, handlers):
    # Ctrl-C in the 5th (last) step of epoch 1: the epoch ends as usual (row, checkpoint), then the stop
    calls = signal_at(monkeypatch, {5: signal.SIGINT})
    with pytest.raises(KeyboardInterrupt) as stop:
        trainer.train(config(tmp_path, **{"optim.epochs": 2}))
    assert not isinstance(stop.value, Terminated) and len(calls) == 5
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and "step" not in state
    assert [r["epoch"] for r in rows(tmp_path)] == [1]


def test_a_stop_after_an_epochs_last_sync_is_its_end(tmp_path, monkeypatch, handlers):
    # SIGTERM while the loader ends epoch 1 (after its last --log-every sync): agreed at the epoch's
    # end, which ends as usual (row, checkpoint), then the stop; not raised on leaving the steps by
    # the rank that got it alone, the epoch lost
    from moco_fast.loaders.synthetic import SyntheticLoader

    real = SyntheticLoader.__iter__

    def ends_with_a_stop(self):
        yield from real(self)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(SyntheticLoader, "__iter__", ends_with_a_stop)
    with pytest.raises(Terminated):
        trainer.train(config(tmp_path, **{"optim.epochs": 2}))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and "step" not in state
    assert [r["epoch"] for r in rows(tmp_path)] == [1]


def test_a_stop_in_an_epochs_end_save_waits_for_the_save(tmp_path, monkeypatch, handlers):
    # SIGTERM after the epoch's last agreement, as its checkpoint is checked and written (where a rank
    # waits for a slower one): the save is written first, the epoch's steps kept, then the stop
    from moco_fast.run_checkpoint import RunCheckpoints

    real = RunCheckpoints.check

    def check_then_stop(self, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)

    monkeypatch.setattr(RunCheckpoints, "check", check_then_stop)
    with pytest.raises(Terminated):
        trainer.train(config(tmp_path, **{"optim.epochs": 2}))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and "step" not in state
    # its row written as at any epoch end a stop ends (it was left to a --resume, which a run stopped
    # at its last epoch never gets)
    assert [r["epoch"] for r in rows(tmp_path)] == [1]


def test_the_cli_stops_with_its_line_and_status_and_resume_ends_as_a_whole_run(tmp_path, monkeypatch, capsys, caplog):
    # synthetic data (every step the same batch): the weights of stopped + resumed equal a whole run's
    args = ["train", "--loader", "synthetic", "--synthetic-steps", "5", "--preset", "cifar", "--arch", "resnet18",
            "--stem", "imagenet", "--epochs", "2", "--batch-size", "8", "--moco-k", "32", "--bn-splits", "2",
            "--device", "cpu", "--workers", "0", "--log-every", "2", "--save-every", "0", "--no-final-knn"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    cut = tmp_path / "cut"
    calls = signal_at(monkeypatch, {8: signal.SIGUSR1})  # epoch 2, step 3: the sync after step 4 acts
    assert main([*args, "--out", str(cut)]) == 128 + signal.SIGUSR1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "stopped by SIGUSR1"
    assert len(calls) == 9 and torch.load(cut / "checkpoint.pt", weights_only=False)["step"] == 4
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, "moco_fast"):
        assert main([*args, "--out", str(cut), "--resume"]) == 0
    assert "epoch 2 continues at step 5 of 5" in caplog.text
    assert f"resumed from {cut / 'checkpoint.pt'} after step 4 of epoch 2\n" in caplog.text  # said "at epoch 1, ..."
    assert [r["epoch"] for r in rows(cut)] == [1, 2]
    assert [r["loss"] for r in rows(cut)] == [r["loss"] for r in rows(tmp_path / "whole")]
    assert same_weights(tmp_path / "whole", cut) == []


def test_save_every_saves_within_an_epoch(tmp_path, monkeypatch):
    saved = []
    real = trainer.ckpt.save_atomic
    monkeypatch.setattr(
        trainer.ckpt, "save_atomic", lambda state, path: (saved.append(state.get("step")), real(state, path))
    )
    clock = iter(range(0, 10**6, 7))  # seconds: 7 between readings, against a save every 0.2 min (12 s)
    monkeypatch.setattr("moco_fast.stops._now", lambda: next(clock))
    trainer.train(config(tmp_path, **{"optim.epochs": 1, "data.synthetic_steps": 9, "runtime.save_every": 0.2}))
    # syncs after steps 2, 4, 6, 8 (and 9, the end): the clock reads 7, 14 (due: saved), 21, 28 (due)
    assert saved == [4, 8, None]
    saved.clear()
    trainer.train(config(tmp_path / "off", **{"optim.epochs": 1, "data.synthetic_steps": 9}))
    assert saved == [None]  # 0: at the epoch's end only


def test_a_save_within_an_epoch_never_replaces_the_last_good_checkpoint_with_nan_weights(tmp_path, monkeypatch):
    # a save at every sync (after steps 2 and 4); the weights turn NaN in step 3: the run stops as a
    # divergence at the sync after step 4, which an epoch's end checks, keeping the save of step 2
    from moco_fast.divergence import Diverged

    real, calls = trainer.train_step, []

    def step(s, *a, **k):
        out = real(s, *a, **k)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                next(s.model.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(trainer, "train_step", step)
    with pytest.raises(Diverged, match=r"diverged in epoch 1: .*; the last checkpoint is kept"):
        trainer.train(config(tmp_path, **{"optim.epochs": 1, "runtime.save_every": 1e-9}))
    assert len(calls) == 4
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and all(v.isfinite().all() for v in state["model"].values() if v.is_floating_point())


def test_a_loader_that_starts_epochs_at_their_first_step_only_saves_at_epoch_ends(
    tmp_path, monkeypatch, handlers, caplog
):
    # as DALI on a shard set: no save within an epoch (a stop drops the epoch in progress), said once
    from moco_fast.loaders.synthetic import SyntheticLoader

    monkeypatch.setattr(SyntheticLoader, "starts_mid_epoch", False)
    saved = []
    real = trainer.ckpt.save_atomic
    monkeypatch.setattr(
        trainer.ckpt, "save_atomic", lambda state, path: (saved.append(state["epoch"]), real(state, path))
    )
    signal_at(monkeypatch, {7: signal.SIGTERM})  # epoch 2, step 2
    with caplog.at_level(logging.INFO, "moco_fast"), pytest.raises(Terminated):
        trainer.train(config(tmp_path, **{"optim.epochs": 2, "runtime.save_every": 1e-9}))
    assert saved == [1] and "checkpoints at epoch ends only" in caplog.text


def test_a_sweep_reuses_a_result_whatever_its_save_every(tmp_path):
    from moco_fast.sweep_plan import training_config

    a, b = config(tmp_path, **{"runtime.save_every": 5.0}), config(tmp_path, **{"runtime.save_every": 0.0})
    assert training_config(a) == training_config(b)  # when checkpoints are written, not what is trained


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_save_every_must_be_minutes(tmp_path, value):
    with pytest.raises(ConfigError, match="--save-every"):
        trainer.validate(config(tmp_path, **{"runtime.save_every": float(value)}), 1)


def test_a_resume_with_another_batch_size_restarts_the_epoch(tmp_path, monkeypatch, handlers, caplog):
    signal_at(monkeypatch, {2: signal.SIGTERM})  # epoch 1, step 2 of 5: saved there
    with pytest.raises(Terminated):
        trainer.train(config(tmp_path, **{"optim.epochs": 1}))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2
    monkeypatch.undo()
    longer = config(tmp_path, **{"optim.epochs": 2, "optim.batch_size": 4, "runtime.resume": "auto"})
    with caplog.at_level(logging.WARNING, "moco_fast"):
        trainer.train(longer)
    assert "epoch 1 starts again from its first step" in caplog.text
    # and --epochs 1 -> 2: the lr of epoch 1 is compared with the one its first steps had, not an epoch 0's
    was = trainer.lr_at(config(tmp_path, **{"optim.epochs": 1}), 0, trainer.base_lr(config(tmp_path), 1))
    will = trainer.lr_at(longer, 0, trainer.base_lr(longer, 1))
    assert f"epoch 1 trains at lr {will:.4g} where its first 2 steps had {was:.4g}" in caplog.text, caplog.text
    row = rows(tmp_path)[0]
    assert row["img_per_s"] * row["epoch_time_s"] == pytest.approx(5 * 4)  # the restarted epoch's steps only


def test_a_checkpoint_within_an_epoch_past_a_shortened_run_is_a_finished_run(tmp_path, monkeypatch, handlers, caplog):
    signal_at(monkeypatch, {7: signal.SIGTERM})  # epoch 2, step 2 of 5: saved there
    with pytest.raises(Terminated):
        trainer.train(config(tmp_path, **{"optim.epochs": 2}))
    monkeypatch.undo()
    shortened = config(tmp_path, **{"optim.epochs": 1, "runtime.resume": "auto"})
    with caplog.at_level(logging.INFO, "moco_fast"):
        row = trainer.train(shortened)
    # nothing trained: {} (the caller's one line says so), and no epoch continued
    assert row == {} and "continues" not in caplog.text
    assert "trained for its 1 epoch already" in trainer.nothing_to_train(shortened)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2  # left as it was


def test_a_resume_with_fewer_epochs_than_its_checkpoint_finished_is_refused(tmp_path, capsys):
    # a run of 2 resumed with --epochs 1 trained nothing and said "nothing to do: RUN trained for its 1
    # epoch already", the --epochs given left aside without a word
    trainer.train(config(tmp_path, **{"optim.epochs": 2}))
    with pytest.raises(ConfigError, match="has trained 2 epochs already"):
        trainer.train(config(tmp_path, **{"optim.epochs": 1, "runtime.resume": "auto"}))
    for extra in ([], ["--print-config"]):  # refused with the flags, before the data is read
        assert main(["train", "--resume", "--out", str(tmp_path), "--epochs", "1", *extra]) == 2
        assert last_error(capsys) == (
            "moco-fast train: error: --epochs 1: the checkpoint --resume continues has trained 2 epochs already, "
            "and its weights cannot go back to fewer: give --epochs 2 or more, or leave --epochs out"
        )
    assert main(["train", "--resume", "--out", str(tmp_path), "--epochs", "2"]) == 0
    assert capsys.readouterr().out == f"nothing to do: {tmp_path} trained for its 2 epochs already\n"


def test_a_checkpoint_within_an_epoch_hands_its_image_count_to_the_resume(tmp_path, monkeypatch, handlers, caplog):
    # the data's images changed since the stop (the checkpoint's count stands for the old list)
    signal_at(monkeypatch, {2: signal.SIGTERM})  # step 2 of 5: saved there
    with pytest.raises(Terminated):
        trainer.train(config(tmp_path, **{"optim.epochs": 1}))
    monkeypatch.undo()
    state = ckpt.load(tmp_path / "checkpoint.pt")
    ckpt.save_atomic({**state, "num_images": state["num_images"] + 1}, tmp_path / "checkpoint.pt")
    with caplog.at_level(logging.INFO, "moco_fast"):
        trainer.train(config(tmp_path, **{"optim.epochs": 1, "runtime.resume": "auto"}))
    assert "class folders added or removed" in caplog.text and "continues at step" not in caplog.text


class Loader:
    def __init__(self, steps, mid=True, num_images=80):
        self.steps, self.starts_mid_epoch, self.num_images = steps, mid, num_images

    def __len__(self):
        return self.steps


def test_a_resume_with_other_steps_per_epoch_restarts_the_epoch(caplog):
    saved = {**EpochPart(3, 1.5, 0.5, 2.0, 10, 8, 2).to_dict()}
    assert resumed_part(saved, 4, Loader(10), 8, 2) == EpochPart(3, 1.5, 0.5, 2.0, 10, 8, 2)
    with caplog.at_level(logging.WARNING, "moco_fast"):
        assert resumed_part(saved, 4, Loader(20), 8, 1) is None  # one process: twice the steps
        assert "epoch 5 starts again from its first step" in caplog.text and "10 steps of 8 images in 2" in caplog.text
        caplog.clear()
        assert resumed_part(saved, 4, Loader(10, mid=False), 8, 2) is None  # DALI on shards
        assert "starts an epoch at its first step only" in caplog.text
    assert resumed_part(None, 4, Loader(10), 8, 2) is None


def test_a_resume_on_images_added_since_restarts_the_epoch_even_at_the_same_steps(caplog):
    # 80 images then, 82 now (a class folder of 2 added): still 10 steps of 8, but the epoch's
    # order is drawn over the new list, so its first 3 steps now are not the ones trained
    saved = {**EpochPart(3, 1.5, 0.5, 2.0, 10, 8, 1).to_dict(), "num_images": 80}
    assert resumed_part(saved, 4, Loader(10, num_images=80), 8, 1) == EpochPart(3, 1.5, 0.5, 2.0, 10, 8, 1)
    with caplog.at_level(logging.WARNING, "moco_fast"):
        assert resumed_part(saved, 4, Loader(10, num_images=82), 8, 1) is None
    assert "the data has 82 images now, the run trained on 80" in caplog.text and "epoch 5 starts again" in caplog.text
    assert "--batch-size" not in caplog.text  # not the advice for another batch or process count
    caplog.clear()
    with caplog.at_level(logging.WARNING, "moco_fast"):  # DALI on shards restarts it anyway, and says both
        assert resumed_part(saved, 4, Loader(10, mid=False, num_images=82), 8, 1) is None
    assert "first step only, and the data has 82 images now, the run trained on 80" in caplog.text
    del saved["num_images"]  # a checkpoint from before it held the count: continued as before
    assert resumed_part(saved, 4, Loader(10, num_images=82), 8, 1) == EpochPart(3, 1.5, 0.5, 2.0, 10, 8, 1)


def test_a_second_signal_stops_at_once_and_one_after_the_last_sync_on_leaving(handlers):
    stops = StopRequests()
    with pytest.raises(Terminated), stops.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.signum == signal.SIGTERM  # recorded, not raised
        os.kill(os.getpid(), signal.SIGUSR1)  # the second: at once
        raise AssertionError("a second signal was held")
    assert signal.getsignal(signal.SIGTERM) is _on_stop_signal  # the handlers are back
    stops = StopRequests()
    with pytest.raises(KeyboardInterrupt), stops.deferred():
        os.kill(os.getpid(), signal.SIGINT)  # no sync point agreed on it: raised when the steps end
    # a launcher's worker waits through repeats (the job's signal and the launcher's copy of it)
    stops = StopRequests(repeats_wait=True)
    with stops.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        stops.agreed = True
    assert stops.signum == signal.SIGTERM


def test_save_clock_is_rank_zeros_and_zero_is_off(monkeypatch):
    now = iter([0.0, 59.0, 61.0, 0.0, 1e9])
    monkeypatch.setattr("moco_fast.stops._now", lambda: next(now))
    clock = SaveClock(1)
    assert not clock.due() and clock.due()
    assert not SaveClock(0).due()
    monkeypatch.setattr("moco_fast.stops.dist_utils.is_main", lambda: False)
    assert not clock.due()  # another rank's clock (1e9 s on) asks for nothing: the ranks follow rank 0's


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_stop_within_an_epoch_on_cuda_saves_its_step_and_resumes(tiny_root, tmp_path, monkeypatch, handlers):
    # On the GPU: the epoch's sums stay on the device between syncs, the resident loader reseeds its
    # CUDA generator each step, the RNG states go into the checkpoint as CPU tensors. cuDNN may pick
    # other algorithms in another process: the losses are compared as close, not equal.
    cuda = {"runtime.device": "cuda", "runtime.amp": "bf16", "data.loader": "resident", "optim.epochs": 2}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    trainer.train(config(whole, tiny_root, **cuda))
    calls = signal_at(monkeypatch, {5: signal.SIGTERM})
    with pytest.raises(Terminated):
        trainer.train(config(cut, tiny_root, **cuda))
    assert len(calls) == 6
    state = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"], state["epoch_part"]["steps"]) == (1, 2, 4)
    monkeypatch.undo()
    trainer.train(config(cut, tiny_root, **cuda, **{"runtime.resume": "auto"}))
    a, b = rows(whole), rows(cut)
    assert [r["epoch"] for r in b] == [1, 2]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=0.02)
    for r in b:
        assert r["img_per_s"] * r["epoch_time_s"] == pytest.approx(4 * 8)
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["epoch"] == 2
