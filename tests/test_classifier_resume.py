"""The linear classifier and fine-tuning interrupted and resumed: a run resumed (with --workers too)
ends as an uninterrupted one, a stop says how to resume, a state of other settings or a damaged
one is refused with what to do, and a second run into the same result stops at once (the lock)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from eval_helpers import interrupt_at, state_reads
from torch import nn

from moco_fast.cli import main
from moco_fast.config import ConfigError


def test_lincls_resumes_where_it_was_interrupted(ckpt, six_root, tmp_path, capsys, caplog, monkeypatch):
    import moco_fast.lincls

    def lincls(out, *extra):
        argv = ["lincls", "--checkpoint", str(ckpt), "--data", str(six_root), "--epochs", "3", "--lr", "0.5"]
        return main([*argv, "--batch-size", "8", "--workers", "0", "--device", "cpu", "--out", str(out), *extra])

    whole = tmp_path / "whole.json"
    assert lincls(whole, "--eval-every", "1") == 0
    ref = json.loads(whole.read_text())
    tops = [row["top1"] for row in ref["history"]]
    assert len(tops) == 3 and ref["top1"] == tops[-1]  # top1 stays the last epoch's
    assert ref["best_top1"] == max(tops) and ref["history"][ref["best_epoch"] - 1]["top1"] == max(tops)
    assert f"(best epoch {ref['best_epoch']}: top-1 {max(tops):.2f}%)" in capsys.readouterr().out
    # evaluating along the way draws nothing from the training's random streams
    plain = tmp_path / "plain.json"
    assert lincls(plain) == 0
    assert json.loads(plain.read_text())["top1"] == ref["top1"] and "best_epoch" not in json.loads(plain.read_text())

    # Ctrl-C in the evaluation after epoch 2: the state holds the two epochs, the second unevaluated
    out = tmp_path / "lincls.json"
    calls = []
    real_evaluate = moco_fast.lincls.evaluate

    def evaluate(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args)

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="moco_fast"):
        m.setattr(moco_fast.lincls, "evaluate", evaluate)
        assert lincls(out, "--eval-every", "1") == 130
    state = tmp_path / "lincls.state.pt"
    assert f"lincls: stopped; {state} holds epochs 1-2: --resume continues" in caplog.text
    saved = torch.load(state, weights_only=False)
    assert state.is_file() and not out.exists() and [("top1" in row) for row in saved["history"]] == [True, False]
    capsys.readouterr()
    # what would be thrown away or may not resume is refused before the checkpoint or the data is read
    with monkeypatch.context() as m:
        m.setattr(moco_fast.lincls, "run_lincls", lambda cfg, loaded=None: pytest.fail("ran"))
        assert lincls(out, "--eval-every", "1") == 2  # starting over would drop two epochs silently
        assert f"{state} holds an interrupted lincls run: --resume continues it" in capsys.readouterr().err
        assert lincls(out, "--eval-every", "1", "--resume", "--lr", "0.1") == 2
        assert "was run with other settings: --lr 0.5 (now 0.1)" in capsys.readouterr().err
        assert lincls(out, "--eval-every", "1", "--resume", "--amp", "bf16") == 2  # other features
        assert "--amp 'auto', i.e. off (now 'bf16': --amp off runs as it ran)" in capsys.readouterr().err
        assert lincls(out, "--eval-every", "1", "--resume", "--image-size", "40") == 2
        assert "--image-size not given (now 40)" in capsys.readouterr().err  # it said "--image-size None"
        # the checkpoint trained further since (`train --resume` keeps lincls.state.pt): another backbone
        # (another save of the run); the same checkpoint copied (a new mtime) is the same backbone
        original = ckpt.read_bytes()
        torch.save({**torch.load(ckpt, weights_only=False), "save_id": "a later save"}, ckpt)
        try:
            assert lincls(out, "--eval-every", "1", "--resume") == 2
            assert "the checkpoint has changed since (trained further?)" in capsys.readouterr().err
        finally:
            ckpt.write_bytes(original)
    partial = tmp_path / ".lincls.state.pt.x1y2.tmp"  # a save that a kill cut short
    partial.write_bytes(b"0" * 100)
    # the same settings spelt otherwise (a trailing slash, the run folder for its checkpoint) resume;
    # the owed evaluation of epoch 2 runs first
    argv = ["lincls", "--checkpoint", str(ckpt.parent), "--data", f"{six_root}/", "--epochs", "3", "--lr", "0.5"]
    argv += ["--batch-size", "8", "--workers", "0", "--device", "cpu", "--out", str(out)]
    with monkeypatch.context() as m:
        reads = state_reads(m)
        assert main([*argv, "--eval-every", "1", "--resume"]) == 0
    # read once, whole, by the command's check; the check after the data listing and the loop's load
    # read it again (twice mapped, then whole)
    assert [mapped for name, mapped in reads if name == state.name] == [False]
    res = json.loads(out.read_text())
    assert res["history"] == ref["history"] and res["top1"] == ref["top1"]  # --workers 0: exactly
    assert res["wall_s"] > saved["wall_s"]  # the interrupted part counts
    assert not state.exists() and not partial.exists()
    capsys.readouterr()
    assert lincls(out, "--resume") == 2  # nothing to continue, and a finished result to overwrite
    assert f"--resume: {out} is a finished lincls result and there is no state to continue" in capsys.readouterr().err


@pytest.mark.slow
def test_lincls_resumed_with_workers_ends_as_an_uninterrupted_run(ckpt, six_root, tmp_path, monkeypatch):
    # the DataLoader workers persist across epochs and their random streams are not saved: each
    # image's crop and flip come from (seed, epoch, index) alone (seeded_images), and the order from
    # the saved generator, so a run resumed with workers draws what the uninterrupted one drew
    import moco_fast.lincls

    made, real = [], moco_fast.lincls.new_classifier
    monkeypatch.setattr(moco_fast.lincls, "new_classifier", lambda *a: made.append(real(*a)) or made[-1])

    def lincls(out, *extra):
        argv = ["lincls", "--checkpoint", str(ckpt), "--data", str(six_root), "--epochs", "2", "--lr", "0.5"]
        return main([*argv, "--batch-size", "8", "--workers", "2", "--device", "cpu", "--out", str(out), *extra])

    assert lincls(tmp_path / "whole.json") == 0
    with monkeypatch.context() as m:
        interrupt_at(m, moco_fast.lincls, 1)
        assert lincls(tmp_path / "l.json") == 130
    assert lincls(tmp_path / "l.json", "--resume") == 0
    whole, _, resumed = made
    assert torch.equal(whole.weight, resumed.weight) and torch.equal(whole.bias, resumed.bias)
    ref, res = (json.loads((tmp_path / name).read_text()) for name in ("whole.json", "l.json"))
    assert res["history"] == ref["history"]


def test_a_stop_behind_a_dataloader_error_still_says_how_to_resume(tmp_path, caplog, monkeypatch):
    # SIGTERM to the process group kills the DataLoader workers too: the error that reaches the loop
    # can be the DataLoader's, with the Terminated behind it; the hint must still come
    import time

    from moco_fast.classifier_epochs import EpochLoop
    from moco_fast.lincls import LinclsConfig

    def one_epoch(epoch):
        if epoch == 1:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.") from None
        return {"epoch": epoch + 1, "lr": 0.1, "loss": 1.0}

    cfg = LinclsConfig(str(tmp_path / "none.pt"), epochs=3, out=str(tmp_path / "l.json"))
    loop = EpochLoop("lincls", cfg, tmp_path / "l.json", {"classifier": nn.Linear(2, 2)}, None, time.perf_counter())
    with caplog.at_level(logging.WARNING, logger="moco_fast"), pytest.raises(RuntimeError):
        loop.run(one_epoch, lambda: (50.0, 90.0, 10))
    assert f"lincls: stopped; {tmp_path / 'l.state.pt'} holds epoch 1: --resume continues" in caplog.text
    # stopped inside the save of epoch 2: the file still holds epoch 1 alone, and says so
    import moco_fast.classifier_epochs as ce

    real_save, saves = ce.ckpt.save_atomic, []

    def save_atomic(state, path):
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt
        real_save(state, path)

    (tmp_path / "l.state.pt").unlink()
    caplog.clear()
    loop = EpochLoop("lincls", cfg, tmp_path / "l.json", {"classifier": nn.Linear(2, 2)}, None, time.perf_counter())
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="moco_fast"):
        m.setattr(ce.ckpt, "save_atomic", save_atomic)
        with pytest.raises(KeyboardInterrupt):
            loop.run(lambda e: {"epoch": e + 1, "lr": 0.1, "loss": 1.0}, lambda: (50.0, 90.0, 10))
    assert "holds epoch 1: --resume continues" in caplog.text


def lincls_loop(tmp_path, checkpoint=None, **kw):
    """An EpochLoop of lincls, 2 epochs of a 2x2 classifier, its result tmp_path/l.json."""
    import time

    from moco_fast.classifier_epochs import EpochLoop
    from moco_fast.lincls import LinclsConfig

    cfg = LinclsConfig(str(checkpoint or tmp_path / "none.pt"), epochs=2, out=str(tmp_path / "l.json"), **kw)
    net = nn.Linear(2, 2)
    return EpochLoop("lincls", cfg, tmp_path / "l.json", {"classifier": net}, None, time.perf_counter())


def an_epoch(epoch):
    return {"epoch": epoch + 1, "lr": 0.1, "loss": 1.0}


def stop_in_epoch_2(epoch):
    if epoch == 1:
        raise KeyboardInterrupt
    return an_epoch(epoch)


def evaluated():
    return 50.0, 90.0, 10


def test_the_loop_itself_refuses_a_state_of_other_settings(tmp_path):
    # the commands check before reading data; a caller of the library (the sweep) meets the loop's check
    with pytest.raises(KeyboardInterrupt):
        lincls_loop(tmp_path).run(stop_in_epoch_2, evaluated)
    with pytest.raises(ConfigError, match=r"was run with other settings: --lr 30.0 \(now 1.0\)"):
        lincls_loop(tmp_path, lr=1.0, resume=True).run(an_epoch, evaluated)


def test_other_images_read_as_images_beside_other_settings(tmp_path):
    # images added at the same --data, no flag changed: the refusal said "was run with other
    # settings: ...; resume with those"; with a flag changed too, it says both in one line
    import time

    from moco_fast.classifier_epochs import EpochLoop
    from moco_fast.lincls import LinclsConfig

    def loop(listing, **kw):
        cfg = LinclsConfig(str(tmp_path / "none.pt"), data=str(tmp_path), epochs=2, **kw)
        parts = {"classifier": nn.Linear(2, 2)}
        return EpochLoop("lincls", cfg, tmp_path / "l.json", parts, None, time.perf_counter(), None, listing)

    with pytest.raises(KeyboardInterrupt):
        loop("2 classes, 4 + 2 images, sha256 a").run(stop_in_epoch_2, evaluated)
    images = f"--data {str(tmp_path)!r} lists other images since (4 + 2 images, now 5 + 2)"
    state = tmp_path / "l.state.pt"
    with pytest.raises(ConfigError) as e:
        loop("2 classes, 5 + 2 images, sha256 b", resume=True).run(an_epoch, evaluated)
    assert str(e.value) == f"--resume: {state} ran on other images: {images}: put them back, or delete it to start over"
    with pytest.raises(ConfigError) as e:
        loop("2 classes, 5 + 2 images, sha256 b", resume=True, lr=1.0).run(an_epoch, evaluated)
    assert str(e.value) == (
        f"--resume: {state} ran on other images: {images}, and with other settings: --lr 30.0 (now 1.0); put the "
        "images back and resume with those settings, or delete it to start over"
    )


def test_a_diverged_classifier_stops_before_its_save_and_its_evaluation(tmp_path):
    # NaN logits still have a top-1: lincls --lr 1e30 reported 33.33% on 3 classes, and finetune wrote
    # a network of NaN as its result's model
    import time

    from moco_fast.classifier_epochs import EpochLoop, continued_by, state_path
    from moco_fast.divergence import Diverged
    from moco_fast.lincls import LinclsConfig

    out = tmp_path / "l.json"
    cfg = LinclsConfig(str(tmp_path / "none.pt"), epochs=3, eval_every=1, lr=1e30, out=str(out))
    net = nn.Linear(2, 2)
    evaluated = []

    def nan_in_epoch_2(epoch):
        if epoch == 1:
            with torch.no_grad():
                net.bias[1] = float("nan")
        return {"epoch": epoch + 1, "lr": 1e30, "loss": 1.0}

    def evaluate():
        evaluated.append(torch.isfinite(net.bias).all().item())
        return 50.0, 90.0, 10

    loop = EpochLoop("lincls", cfg, out, {"classifier": net}, None, time.perf_counter())
    with pytest.raises(Diverged) as e:
        loop.run(nan_in_epoch_2, evaluate)
    assert str(e.value) == (
        "lincls diverged in epoch 2: NaN or inf in 1 tensor of its classifier (first: bias): lower --lr (now 1e+30) "
        f"and start over; {state_path(out)} holds epoch 1, which --resume continues with these settings only: "
        "delete it"
    )
    assert evaluated == [True]  # epoch 1 only
    state = torch.load(state_path(out), weights_only=False)
    assert state["epoch"] == 1 and torch.isfinite(state["classifier"]["bias"]).all()
    # the sweep's short classifier: its lr flag, and no state to delete (the sweep starts its own over)
    state_path(out).unlink()
    net.bias.data.zero_()
    with continued_by("the same sweep command continues it", "--lincls-lr"), pytest.raises(Diverged) as e:
        EpochLoop("lincls", cfg, out, {"classifier": net}, None, time.perf_counter()).run(nan_in_epoch_2, evaluate)
    assert str(e.value).endswith("(first: bias): lower --lincls-lr (now 1e+30) and start over")


def test_a_loss_far_above_chance_warns_once_naming_the_lr_flag(tmp_path, caplog):
    # lincls at its default lr 30 on a demo backbone trained at batch 16 (2 images per BN split, whose
    # weights grew 250x in 15 steps) logged losses of 4e9 an epoch with finite weights, and nothing said so
    import time

    from moco_fast.classifier_epochs import EpochLoop, continued_by
    from moco_fast.lincls import LinclsConfig

    losses = [1.0, 50.0, 4e9, 5e9]  # ln 6 = 1.79: 50 is over 10x chance's loss

    def epoch_of(losses):
        return lambda epoch: {"epoch": epoch + 1, "lr": 30.0, "loss": losses[epoch]}

    def run(losses, classes, out):
        cfg = LinclsConfig(str(tmp_path / "none.pt"), epochs=len(losses), out=str(tmp_path / out))
        loop = EpochLoop(
            "lincls", cfg, tmp_path / out, {"classifier": nn.Linear(2, 6)}, None, time.perf_counter(), classes=classes
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moco_fast"):
            loop.run(epoch_of(losses), evaluated)
        return [r.getMessage() for r in caplog.records]

    assert run(losses, 6, "a.json") == [
        "lincls epoch 2: the mean loss 50 is over 10x chance's (ln 6 = 1.79): the steps overshoot, and the "
        "accuracy means little; lower --lr (now 30)"
    ]
    assert run([1.0, 17.0], 6, "b.json") == []  # under 10 x 1.79
    assert run([float("nan"), 1.0], 6, "c.json") == []  # no figure (fp16 skipped steps: divergence's care)
    with continued_by("the same sweep command continues it", "--lincls-lr"):
        assert run(losses, 6, "d.json")[0].endswith("lower --lincls-lr (now 30)")


def test_a_weight_decay_that_makes_the_weights_grow_is_named_with_the_lr(tmp_path, caplog):
    # lincls --weight-decay 1e12 overshot (lr x weight decay past 2 (1 + momentum): the decay alone
    # grows the weights) and was told "lower --lr" alone
    import time

    from moco_fast.classifier_epochs import EpochLoop
    from moco_fast.divergence import Diverged
    from moco_fast.lincls import LinclsConfig

    def run(weight_decay: float, out: str, diverge: bool = False) -> str:
        cfg = LinclsConfig(str(tmp_path / "none.pt"), epochs=1, out=str(tmp_path / out), weight_decay=weight_decay)
        net = nn.Linear(2, 6)
        if diverge:
            net.bias.data[0] = float("nan")
        loop = EpochLoop("lincls", cfg, tmp_path / out, {"classifier": net}, None, time.perf_counter(), classes=6)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moco_fast"):
            try:
                loop.run(lambda epoch: {"epoch": 1, "lr": 3.0, "loss": 50.0}, lambda: (50.0, 90.0, 10))
            except Diverged as e:
                return str(e)
        return caplog.records[0].getMessage()

    grows = (
        "lower --lr (now 30) or --weight-decay (now 1e+12): at lr 3 a step's decay lr x weight decay = 3e+12 is "
        "past 2 (1 + --momentum 0.9) = 3.8, where the decay alone makes the weights grow"
    )
    assert run(1e12, "a.json").endswith(f"accuracy means little; {grows}")
    assert f"(first: bias): {grows} and start over" in run(1e12, "b.json", diverge=True)
    assert run(1.2, "c.json").endswith("accuracy means little; lower --lr (now 30)")  # 3 x 1.2 = 3.6: stable
    assert run(1.3, "d.json").endswith(
        "= 3.9 is past 2 (1 + --momentum 0.9) = 3.8, where the decay alone makes the weights grow"
    )


@pytest.mark.parametrize("command", ["lincls", "finetune"])
def test_the_commands_judge_their_loss_against_their_classes(command, ckpt, six_root, tmp_path, caplog):
    args = [command, "--checkpoint", str(ckpt), "--data", str(six_root), "--epochs", "1", "--batch-size", "12"]
    args += ["--workers", "0", "--device", "cpu", "--out", str(tmp_path / "r.json"), "--schedule", "cos"]
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main([*args, "--lr", "1000"]) == 0
    assert f"{command} epoch 1: the mean loss" in caplog.text and "(ln 6 = 1.79)" in caplog.text


# the line named the refused command as the holder: a lincls stopped by a finetune, or by a sweep's
# classifier (sweep_lincls.json), said "another moco-fast lincls"
@pytest.mark.parametrize("command", ["lincls", "finetune"])
@pytest.mark.parametrize("holder", ["lincls", "finetune", "sweep"])
def test_a_second_run_into_the_same_result_stops_at_once(command, holder, ckpt, six_root, tmp_path, capsys):
    from moco_fast.run_folder import hold_output

    out = tmp_path / "l.json"
    argv = [command, "--checkpoint", str(ckpt), "--data", str(six_root), "--epochs", "1", "--batch-size", "8"]
    with hold_output(out, holder):  # as a first run holds it
        assert main([*argv, "--workers", "0", "--device", "cpu", "--out", str(out)]) == 2
    assert f"{out}: another moco-fast {holder} is writing it now" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # the lock file goes with the run that held it


def test_the_output_lock_follows_a_lock_file_its_holder_removed(tmp_path, monkeypatch):
    # Between this run's open and its flock, the run that held the lock ended and removed the file: a
    # lock on that unlinked file guards nothing, so the run must lock the file now at the path.
    import moco_fast.folder_locks as locks
    import moco_fast.run_folder as rf

    out = tmp_path / "l.json"
    lock = tmp_path / ".l.state.pt.lock"
    real_flock, tries = locks._try_flock, []

    def holder_ends_first(fd, what):
        tries.append(fd)
        if len(tries) == 1:
            lock.unlink()
        return real_flock(fd, what)

    with monkeypatch.context() as m:
        m.setattr(locks, "_try_flock", holder_ends_first)
        with rf.hold_output(out, "lincls"):
            assert len(tries) == 2 and lock.is_file()
            with pytest.raises(rf.RunFolderBusy):  # a second run finds the file this one holds
                with rf.hold_output(out, "lincls"):
                    pass
    assert not lock.exists()


def test_a_lock_that_names_no_holder_is_said_to_be_the_guessed_ones(tmp_path):
    # a lock file that a moco-fast from before its holders named themselves holds stays empty
    import fcntl

    import moco_fast.run_folder as rf

    out = tmp_path / "l.json"
    lock = tmp_path / ".l.state.pt.lock"
    lock.touch()
    with lock.open() as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        for args, said in (("lincls",), "lincls"), (("sweep", "lincls or finetune"), "lincls or finetune"):
            with pytest.raises(rf.RunFolderBusy, match=f"{out}: another moco-fast {said} is writing it now"):
                with rf.hold_output(out, *args):
                    pass


def test_a_damaged_state_says_how_to_go_on(ckpt, six_root, tmp_path, capsys):
    (tmp_path / "l.state.pt").write_bytes(b"")  # a disk that filled up, say
    argv = ["lincls", "--checkpoint", str(ckpt), "--data", str(six_root), "--epochs", "1", "--batch-size", "8"]
    argv += ["--workers", "0", "--device", "cpu", "--out", str(tmp_path / "l.json")]
    assert main(argv) == 2
    assert "--resume continues it" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "l.state.pt" in err[0] and err[0].endswith("delete it to start over"), err
    # a record that fails its checksum (a disk or copy fault): the fix is said once, not twice ("use
    # another copy of it, or start over; delete it to start over")
    torch.save({"command": "lincls", "w": torch.zeros(100_000)}, tmp_path / "l.state.pt")
    with open(tmp_path / "l.state.pt", "r+b") as fh:
        fh.seek((tmp_path / "l.state.pt").stat().st_size // 2)  # inside the 400 KB of w
        fh.write(b"\xff" * 64)
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fails its checksum" in err[0], err
    assert err[0].endswith("(a disk or copy fault?); use another copy of it, or delete it to start over"), err


@pytest.mark.slow
def test_finetune_resumes_where_it_was_interrupted(ckpt, six_root, tmp_path, monkeypatch):
    import moco_fast.finetune

    def finetune(out, *extra):
        argv = ["finetune", "--checkpoint", str(ckpt), "--data", str(six_root), "--epochs", "2", "--lr", "0.05"]
        # with DataLoader workers: they persist across epochs, and the crops still come out the same
        return main([*argv, "--batch-size", "8", "--workers", "2", "--device", "cpu", "--out", str(out), *extra])

    assert finetune(tmp_path / "whole.json") == 0
    out = tmp_path / "ft.json"
    with monkeypatch.context() as m:
        interrupt_at(m, moco_fast.finetune, 1)
        assert finetune(out) == 130
    assert (tmp_path / "ft.state.pt").is_file()
    with monkeypatch.context() as m:
        reads = state_reads(m)
        assert finetune(out, "--resume") == 0
    # read once, whole, by the command's check, and handed to the loop (which read it again)
    assert [mapped for name, mapped in reads if name == "ft.state.pt"] == [False]
    ref, res = (json.loads((tmp_path / name).read_text()) for name in ("whole.json", "ft.json"))
    assert res["history"] == ref["history"] and res["top1"] == ref["top1"]
    whole, resumed = (torch.load(tmp_path / name) for name in ("whole.pt", "ft.pt"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)  # the network and its BN statistics
    assert not (tmp_path / "ft.state.pt").exists()


def test_a_state_of_another_checkpoint_names_that_alone(tmp_path):
    # another --checkpoint was also called "changed since (trained further?)": its stamp differs too
    from moco_fast.classifier_settings import differences, settings
    from moco_fast.lincls import LinclsConfig

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"a")
    b.write_bytes(b"bb")
    state = {"config": settings(LinclsConfig(str(a)))}
    assert differences(state, LinclsConfig(str(b))) == [f"--checkpoint {str(a)!r} (now {str(b)!r})"]
    a.write_bytes(b"aa-trained-further")
    assert differences(state, LinclsConfig(str(a))) == ["the checkpoint has changed since (trained further?)"]


def test_a_state_resumes_on_its_checkpoint_moved_elsewhere(tmp_path, caplog):
    # the run folder moved (or copied) with the state beside it: --checkpoint at its new path was refused
    # as another checkpoint although its save id, which the state records, is the same
    import shutil

    (tmp_path / "run").mkdir()
    for name, state in (("saved", {"save_id": "0123"}), ("foreign", {"state_dict": {}})):
        old, new = tmp_path / "run" / f"{name}.pt", tmp_path / "moved" / f"{name}.pt"
        torch.save(state, old)
        with pytest.raises(KeyboardInterrupt):
            lincls_loop(tmp_path, old).run(stop_in_epoch_2, evaluated)
        new.parent.mkdir(exist_ok=True)
        shutil.copy(old, new)
        if name == "foreign":  # no save id: its file's mtime and size are not enough to tell
            with pytest.raises(ConfigError, match=f"--checkpoint {str(old)!r} \\(now {str(new)!r}\\)"):
                lincls_loop(tmp_path, new, resume=True).run(an_epoch, evaluated)
            continue
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moco_fast"):
            history = lincls_loop(tmp_path, new, resume=True).run(an_epoch, evaluated)
        assert [row["epoch"] for row in history] == [1, 2]
        assert caplog.messages == [
            f"--resume: {tmp_path / 'l.state.pt'} ran on the checkpoint {old}, which is the same save as "
            f"--checkpoint {new} (moved or copied since): it continues on {new}, the one given now"
        ]
        (tmp_path / "l.state.pt").unlink()


def test_a_flag_given_with_the_value_it_left_to_its_default_resumes(ckpt, tmp_path):
    # --image-size 32 given again on --resume, where the interrupted run left it out and ran at the
    # checkpoint's own 32 px, was refused as "--image-size not given (now 32)"; likewise a scratch
    # finetune's --stem cifar where "auto" made the CIFAR stem at 32 px
    from dataclasses import replace

    from moco_fast.classifier_settings import differences, settings
    from moco_fast.finetune import FinetuneConfig
    from moco_fast.lincls import LinclsConfig

    lincls = LinclsConfig(str(ckpt))
    state = {"config": settings(lincls)}
    assert differences(state, replace(lincls, image_size=32)) == []
    assert differences(state, replace(lincls, image_size=40)) == ["--image-size not given (now 40)"]
    assert differences({"config": settings(replace(lincls, image_size=32))}, lincls) == []
    scratch = FinetuneConfig(from_scratch=True, arch="resnet18", image_size=32)
    state = {"config": settings(scratch)}
    assert differences(state, replace(scratch, stem="cifar")) == []
    assert differences(state, replace(scratch, stem="imagenet")) == ["--stem 'auto' (now 'imagenet')"]
    scratch = FinetuneConfig(from_scratch=True, arch="resnet18")  # 224 px without a checkpoint
    assert differences({"config": settings(scratch)}, replace(scratch, image_size=224)) == []


def test_amp_is_compared_as_it_ran(tmp_path):
    # --amp off given again on the CPU, where the interrupted run's auto ran without autocast, was
    # refused as "--amp 'auto' (now 'off')"; auto resumed on the CPU after a GPU's auto (bf16), other
    # features, went through as the same setting
    from dataclasses import replace

    from moco_fast.classifier_settings import differences, settings
    from moco_fast.lincls import LinclsConfig

    a = tmp_path / "a.pt"
    a.write_bytes(b"a")
    cpu = LinclsConfig(str(a), device="cpu")
    state = {"config": settings(cpu)}
    assert differences(state, replace(cpu, amp="off")) == []
    on_a_gpu = {"config": {**state["config"], "amp_ran": "bf16"}}
    # "resume with those" read as --amp auto, the flag given: the line names the one that resumes it
    said = "--amp 'auto', i.e. bf16 (now 'auto', i.e. off: --amp bf16 runs as it ran)"
    assert differences(on_a_gpu, cpu) == [said] and differences(on_a_gpu, replace(cpu, amp="bf16")) == []
    assert differences(state, replace(cpu, amp="bf16")) == [
        "--amp 'auto', i.e. off (now 'bf16': --amp off runs as it ran)"
    ]
    before = {"config": {k: v for k, v in state["config"].items() if k != "amp_ran"}}  # an older state
    assert differences(before, cpu) == [] and differences(before, replace(cpu, amp="off")) == [
        "--amp 'auto' (now 'off')"
    ]


@pytest.mark.parametrize("command", ["lincls", "finetune"])
def test_a_state_resumes_on_its_data_moved_elsewhere(command, ckpt, six_root, tmp_path, capsys, caplog, monkeypatch):
    # --data renamed or copied, the same images: refused as "--data 'old' (now 'new')", the state
    # recorded the path alone. Now its listing (class folders and file names) tells the same images
    import shutil

    import moco_fast.finetune
    import moco_fast.lincls

    old, new, other = tmp_path / "data", tmp_path / "moved", tmp_path / "other"
    shutil.copytree(six_root, old)
    out = tmp_path / "r.json"

    def run(data, *extra):
        argv = [command, "--checkpoint", str(ckpt), "--data", str(data), "--epochs", "2", "--batch-size", "8"]
        return main([*argv, "--lr", "0.05", "--workers", "0", "--device", "cpu", "--out", str(out), *extra])

    with monkeypatch.context() as m:
        interrupt_at(m, getattr(moco_fast, command), 1)
        assert run(old) == 130
    state = tmp_path / "r.state.pt"
    shutil.copytree(old, other)
    moved = next((other / "train").glob("*/*"))
    moved.rename(moved.with_name("renamed" + moved.suffix))  # the same count of images, one of another name
    capsys.readouterr()
    assert run(other, "--resume") == 2  # after the listing, before any epoch
    assert (
        f"--data {str(old)!r} (now {str(other)!r}, other images: as many classes and images, other class or file names)"
    ) in capsys.readouterr().err
    saved = torch.load(state, weights_only=False)
    old.rename(new)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert run(new, "--resume") == 0
    assert (
        f"--resume: {state} ran on --data {old}, which lists the same images as --data {new} (moved or copied "
        f"since): it continues on {new}, the one given now"
    ) in caplog.messages
    assert json.loads(out.read_text())["history"][0] == saved["history"][0] and not state.exists()
    # a state written before the listing was recorded: another path is other data, as then
    for result in (out, out.with_suffix(".pt")):  # finetune's network too
        result.unlink(missing_ok=True)
    del saved["config"]["data_listing"]
    torch.save(saved, state)
    assert run(new, "--resume") == 2 and state.exists()
    assert f"--data {str(old)!r} (now {str(new)!r})" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["lincls", "finetune"])
def test_a_state_refuses_its_data_changed_since(command, ckpt, six_root, tmp_path, capsys, monkeypatch):
    # Images added to --data since the run stopped: the same path resumed on other images without a
    # word. The listing recorded in the state tells them apart, the line says how
    import shutil

    import moco_fast.finetune
    import moco_fast.lincls

    data, out = tmp_path / "data", tmp_path / "r.json"
    shutil.copytree(six_root, data)

    def run(*extra):
        argv = [command, "--checkpoint", str(ckpt), "--data", str(data), "--epochs", "2", "--batch-size", "8"]
        return main([*argv, "--lr", "0.05", "--workers", "0", "--device", "cpu", "--out", str(out), *extra])

    with monkeypatch.context() as m:
        interrupt_at(m, getattr(moco_fast, command), 1)
        assert run() == 130
    state = tmp_path / "r.state.pt"
    first = next((data / "train").glob("*/*"))
    added = first.with_name("added" + first.suffix)
    shutil.copy(first, added)
    capsys.readouterr()
    assert run("--resume") == 2 and state.exists()
    # no setting changed: the line said "was run with other settings ...; resume with those"
    assert (
        f"--resume: {state} ran on other images: --data {str(data)!r} lists other images since (36 + 18 images, "
        "now 37 + 18): put them back, or delete it to start over"
    ) in capsys.readouterr().err
    # a state written before the listing was recorded resumes on the same path, as then
    saved = torch.load(state, weights_only=False)
    del saved["config"]["data_listing"]
    torch.save(saved, state)
    assert run("--resume") == 0 and not state.exists()


def test_cached_features_refuse_other_images_before_extracting_them(ckpt, six_root, tmp_path, capsys, monkeypatch):
    # A moved --data of other images was refused by the loop, after --cached-features had extracted
    # the features of every image (minutes on a real set); now as soon as the data is listed
    import shutil

    import moco_fast.lincls

    data, other, out = tmp_path / "data", tmp_path / "other", tmp_path / "r.json"
    shutil.copytree(six_root, data)

    def run(data, *extra):
        argv = ["lincls", "--checkpoint", str(ckpt), "--data", str(data), "--epochs", "2", "--cached-features"]
        return main([*argv, "--lr", "0.05", "--workers", "0", "--device", "cpu", "--out", str(out), *extra])

    with monkeypatch.context() as m:
        interrupt_at(m, moco_fast.lincls, 1)
        assert run(data) == 130
    shutil.copytree(data, other)
    gone = next((other / "train").iterdir()).name
    for split in ("train", "test"):
        shutil.rmtree(other / split / gone)  # a class fewer
    extracted = []
    real = moco_fast.lincls.extract
    monkeypatch.setattr(moco_fast.lincls, "extract", lambda *a: extracted.append(a[-1]) or real(*a))
    capsys.readouterr()
    assert run(other, "--resume") == 2 and extracted == []
    assert (
        f"(now {str(other)!r}, other images: 6 classes, now 5; 36 + 18 images, now 30 + 15)" in capsys.readouterr().err
    )
