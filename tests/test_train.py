"""The trainer end to end on the CPU: loss falls, resume equals an uninterrupted run, the CLI."""

import json
import logging

import pytest
import torch
from moco_fast.loaders import LoaderArgs, create_loader
from run_helpers import rows as read_metrics

from moco_fast.cli import main
from moco_fast.config import ConfigError, build_config
from moco_fast.data import list_images
from moco_fast.model import MoCo
from moco_fast.monitor import monitor_splits
from moco_fast.step import fast_sgd
from moco_fast.trainer import StepState, make_optimizer, train, train_step

TINY = {
    "model.arch": "resnet18",
    "model.stem": "imagenet",
    "moco.k": 32,
    "moco.bn_splits": 2,
    "optim.batch_size": 8,
    "runtime.device": "cpu",
    "data.workers": 0,
    "runtime.final_knn": False,
    "runtime.knn_baseline": False,
}


def tiny_config(root, out, **extra):
    cfg = build_config("cifar", {**TINY, "data.data": str(root), "runtime.out": str(out), **extra})
    return cfg


@pytest.mark.parametrize("mechanism", ["end-to-end", "memory-bank"])
def test_loss_falls_on_a_tiny_set(tiny_root, mechanism):
    # A fixed batch of real images: the step must learn to tell its 8 images apart. (With the MoCo
    # queue a repeated batch fills the queue with copies of its own positives, so the queue-free
    # mechanisms show the optimisation working; the queue has its own tests.)
    torch.manual_seed(0)
    cfg = tiny_config(tiny_root, "unused", **{"moco.mechanism": mechanism, "moco.k": 16})
    model = MoCo(cfg.model, cfg.moco, 32, num_images=32)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    for g in opt.param_groups:
        g["lr"] = 0.05
    s = StepState(model, opt, torch.amp.GradScaler("cpu", enabled=False), None, torch.device("cpu"))
    loader = create_loader(
        "torch", LoaderArgs(str(tiny_root), cfg.data.aug, batch_size=8, device=torch.device("cpu"), workers=0)
    )
    batch = next(iter(loader))
    losses = [train_step(s, batch, 0.9)[0].item() for _ in range(15)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.8, losses


def test_resume_equals_uninterrupted(tiny_root, tmp_path):
    # K = 24, not a multiple of an epoch's 32 keys: each save leaves the queue's pointer mid-queue
    # (at 32, the pointer of every epoch's end was 0, and a resume that lost it passed)
    queue24 = {"moco.k": 24}
    full = tmp_path / "full"
    train(tiny_config(tiny_root, full, **queue24, **{"optim.epochs": 3}))
    part = tmp_path / "part"
    train(tiny_config(tiny_root, part, **queue24, **{"optim.epochs": 1}))
    # the checkpoint holds everything a resume needs, and nothing temporary is left beside it
    state = torch.load(part / "checkpoint.pt", weights_only=False)
    assert {"config", "epoch", "model", "optimizer", "scaler", "rng"} <= set(state)
    assert any(k.startswith("encoder_k.") for k in state["model"])
    assert state["model"]["queue_ptr"].item() == 32 % 24  # the pointer is saved, mid-queue
    assert not list(part.glob(".checkpoint.pt.*"))
    assert (part / "config.json").is_file() and any((part / "tb").iterdir())
    row = train(tiny_config(tiny_root, part, **queue24, **{"optim.epochs": 3, "runtime.resume": "auto"}))
    a, b = read_metrics(full), read_metrics(part)
    assert [r["epoch"] for r in b] == [1, 2, 3]  # finished epochs are not redone
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert row["epoch"] == 3
    sa = torch.load(full / "checkpoint.pt", weights_only=False)
    sb = torch.load(part / "checkpoint.pt", weights_only=False)
    for k in ("queue", "queue_ptr", "encoder_k.backbone.conv1.weight", "encoder_q.head.weight"):
        assert torch.equal(sa["model"][k], sb["model"][k]), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resume_on_cuda(tiny_root, tmp_path):
    # The checkpoint's RNG states must reach torch as CPU tensors, whatever device the run is on.
    cuda = {"runtime.device": "cuda", "runtime.amp": "bf16"}
    train(tiny_config(tiny_root, tmp_path, **cuda, **{"optim.epochs": 1}))
    row = train(tiny_config(tiny_root, tmp_path, **cuda, **{"optim.epochs": 2, "runtime.resume": "auto"}))
    assert row["epoch"] == 2 and [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["rng"]["cuda"].device.type == "cpu"


def test_sgd_momentum_buffers_exist_from_the_start_and_change_nothing():
    # Zero buffers made up front: the first step equals stock SGD's, which makes them from the gradient.
    torch.manual_seed(0)
    w = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    w_ref = [t.detach().clone().requires_grad_() for t in w]
    opt = fast_sgd(w, torch.device("cpu"), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ref = torch.optim.SGD(w_ref, lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert all(torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in w)
    for _ in range(3):
        for params, o in ((w, opt), (w_ref, ref)):
            o.zero_grad()
            sum((p**2).sum() for p in params).backward()
            o.step()
    for a, b in zip(w, w_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_an_optimizer_state_from_another_device_keeps_this_ones_kernel_and_layout():
    # A state saved on a GPU: fused SGD, channels-last momentum buffers. Resumed on the CPU (foreach,
    # contiguous parameters) it must step as an uninterrupted CPU run would; loaded as it came,
    # CPU fused SGD paired the channels-last buffer with the parameter in the wrong order.
    from moco_fast.step import load_optimizer_state

    torch.manual_seed(0)
    cl = torch.nn.Parameter(torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last))
    gpu_like = torch.optim.SGD([cl], lr=0.1, momentum=0.9, fused=True)
    cl.grad = torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    gpu_like.step()
    saved = gpu_like.state_dict()
    assert not saved["state"][0]["momentum_buffer"].is_contiguous()  # what a CUDA run saves

    w = torch.nn.Parameter(cl.detach().contiguous())
    opt = fast_sgd([w], torch.device("cpu"), lr=0.1, momentum=0.9)
    load_optimizer_state(opt, saved)
    assert opt.param_groups[0]["foreach"] and not opt.param_groups[0].get("fused")
    assert opt.state[w]["momentum_buffer"].stride() == w.stride()
    ref = torch.nn.Parameter(cl.detach().contiguous())
    plain = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    plain.state[ref]["momentum_buffer"] = saved["state"][0]["momentum_buffer"].contiguous()
    for _ in range(2):
        grad = torch.randn(4, 3, 3, 3)
        w.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        plain.step()
    torch.testing.assert_close(w, ref, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_overflow_on_the_first_step_leaves_no_nan():
    # Fused SGD skips a step whose gradients overflowed; its momentum buffers must already be valid.
    w = torch.nn.Parameter(torch.ones(64, device="cuda"))
    opt = fast_sgd([w], torch.device("cuda"), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    for factor in (float("inf"), 1.0, 1.0):  # the first step overflows and is skipped
        opt.zero_grad()
        scaler.scale(w.sum() * factor).backward()
        scaler.step(opt)
        scaler.update()
    assert torch.isfinite(w).all() and (w < 1).all()  # the two finite steps moved it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_reads_a_resumed_lr_from_the_device():
    # A resumed optimizer brings its lr back as a CPU tensor; the graph must read a device one.
    from moco_fast.step import GraphedStep

    cfg = tiny_config("unused", "unused", **{"runtime.device": "cuda"})
    model = MoCo(cfg.model, cfg.moco, 32).cuda()
    opt = make_optimizer(model, cfg, torch.device("cuda"))
    opt.param_groups[0]["lr"] = torch.tensor(0.05)  # as load_state_dict(map_location="cpu") leaves it
    s = StepState(model, opt, torch.amp.GradScaler("cuda", enabled=False), torch.bfloat16, torch.device("cuda"))
    GraphedStep(s, 0.99)
    lr = opt.param_groups[0]["lr"]
    # float32 (fused SGD's CUDA kernel reads a float lr): 0.05 comes back as 0.0500000007
    assert lr.device.type == "cuda" and lr.dtype == torch.float32 and lr.item() == pytest.approx(0.05)


def test_cli_trains_and_reports_knn(tiny_root, tmp_path, capsys):
    rc = main(
        [
            "train",
            "--data",
            str(tiny_root),
            "--preset",
            "cifar",
            "--arch",
            "resnet18",
            "--stem",
            "imagenet",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--moco-k",
            "16",
            "--bn-splits",
            "2",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--out",
            str(tmp_path),
            "--knn-baseline",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "kNN top-1" in out and "random-init backbone" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= summary["final_knn_top1"] <= 100 and 0 <= summary["final_knn_head_top1"] <= 100
    assert "trained head output" in out
    # fewer train images than the default k=200: all of them vote, and that k is the one named
    n_train = sum(1 for _ in (tiny_root / "train").rglob("*.jpg"))
    assert summary["knn_k"] == n_train < 200 and f"kNN top-1 (k={n_train}, t=0.1, trained backbone)" in out
    rc = main(
        [
            "knn",
            "--checkpoint",
            str(tmp_path / "checkpoint.pt"),
            "--data",
            str(tiny_root),
            "--device",
            "cpu",
            "--workers",
            "0",
            "--features",
            "both",
        ]
    )
    assert rc == 0
    assert "backbone" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--moco-k", "4", "--batch-size", "8"], "smaller than the keys"),
        (["--batch-size", "6", "--bn-splits", "4"], "multiple of --bn-splits"),
        (["--batch-size", "8", "--bn-splits", "8"], "at least 2 images"),
        (["--arch", "vgg16"], "unknown arch"),
        (["--moco-m", "1.5"], "--moco-m"),
        (["--amp", "fp16"], "needs a GPU"),
    ],
)
def test_contradicting_flags_are_one_line_errors(tiny_root, tmp_path, capsys, args, message):
    base = [
        "train",
        "--data",
        str(tiny_root),
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--out",
        str(tmp_path),
        "--workers",
        "0",
        "--batch-size",
        "16",
        "--moco-k",
        "64",
    ]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_missing_and_empty_data(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope"), "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "no class subfolders" in capsys.readouterr().err


def test_bad_files_are_named_and_skipped(fresh_root, caplog):
    cls = fresh_root / "train" / sorted(p.name for p in (fresh_root / "train").iterdir())[0]
    (cls / "notes.txt").write_text("not an image")
    (cls / "fake.jpg").write_text("not a jpeg either")
    good = sorted(cls.glob("*.jpg"))[0].read_bytes()
    (cls / "truncated.jpg").write_bytes(good[: len(good) // 2])
    images = list_images(fresh_root / "train")
    skipped = {p.split("/")[-1]: r for p, r in images.skipped}
    assert set(skipped) == {"notes.txt", "fake.jpg", "truncated.jpg"}
    assert "skipped 3 of" in caplog.text and "fake.jpg" in caplog.text
    assert len(images) == 16  # 2 classes x 8 good images
    # Without the up-front check, decoding the truncated JPEG warns by name and substitutes another.
    from moco_fast.image_dataset import ImageDataset

    images = list_images(fresh_root / "train", check=False)
    ds = ImageDataset(images)
    i = [n.split("/")[-1] for n in images.files].index("truncated.jpg")
    with pytest.warns(UserWarning, match="truncated.jpg"):
        img, _label, j = ds[i]
    assert j != i and img.mode == "RGB"


def test_grayscale_and_cmyk_become_rgb(fresh_root):
    from PIL import Image

    from moco_fast.image_dataset import load_rgb

    src = sorted((fresh_root / "train").rglob("*.jpg"))[0]
    Image.open(src).convert("L").save(fresh_root / "gray.jpg")
    Image.open(src).convert("CMYK").save(fresh_root / "cmyk.jpg")
    for name in ("gray.jpg", "cmyk.jpg"):
        assert load_rgb(str(fresh_root / name)).mode == "RGB"


def test_knn_every_needs_an_eval_split(tiny_root, tmp_path, capsys):
    argv = ["train", "--data", str(tiny_root / "train"), "--device", "cpu", "--epochs", "1", "--out", str(tmp_path)]
    argv += ["--workers", "0", "--batch-size", "16", "--moco-k", "64", "--knn-every", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--knn-every needs an eval split" in err[0], err
    # a loader without an image folder (FFCV reads a .beton): said, not silently ignored
    cfg = tiny_config(tiny_root, tmp_path, **{"data.loader": "ffcv", "runtime.knn_every": 1})
    with pytest.raises(ConfigError, match="--knn-every needs an image folder"):
        monitor_splits(cfg)


def test_knn_monitor_uses_the_loaders_listing(tiny_root, tmp_path, monkeypatch):
    # The loader has just listed (and header-checked) both splits; the kNN monitor and the final kNN
    # take those lists rather than walking the folder a second time (minutes on a large set).
    import moco_fast.monitor

    def list_again(*args, **kwargs):
        raise AssertionError("the image folder was listed a second time")

    monkeypatch.setattr(moco_fast.monitor, "load_splits", list_again)
    cfg = tiny_config(tiny_root, tmp_path / "run", **{"optim.epochs": 1, "runtime.knn_every": 1})
    cfg.runtime.final_knn = True
    summary = train(cfg)
    assert summary["knn_top1"] == summary["final_knn_top1"] and 0 <= summary["final_knn_head_top1"] <= 100
    # without lists handed to it the folder is listed (train hands the loader's, a sweep its own)
    with pytest.raises(AssertionError, match="listed a second time"):
        monitor_splits(cfg)


def test_knn_on_one_class_is_flagged(tmp_path, caplog):
    from conftest import make_image_root

    root = make_image_root(tmp_path / "one", per_class=2, classes=1, test_per_class=2)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert monitor_splits(tiny_config(root, tmp_path / "run", **{"runtime.final_knn": True})) is not None
    assert "holds a single class (airplane): every neighbour votes for it, so kNN top-1 is 100%" in caplog.text


def test_epoch_rows_average_the_steps(tmp_path, monkeypatch):
    # The step is replaced by one that returns known losses and accuracies: each epoch's row must be
    # their mean (pretext_acc in %), with the lr of the schedule and the images the epoch saw.
    import moco_fast.trainer as trainer

    losses = iter([4.0, 5.0, 6.0, 1.0, 2.0, 6.0])
    accs = iter([0.0, 0.5, 1.0, 0.25, 0.25, 0.25])
    calls = []

    def fake_step(s, batch, m):
        calls.append(m)
        return torch.tensor(next(losses)), torch.tensor(next(accs))

    monkeypatch.setattr(trainer, "train_step", fake_step)
    cfg = tiny_config(
        None,
        tmp_path / "run",
        **{"data.loader": "synthetic", "data.synthetic_steps": 3, "optim.epochs": 2, "moco.m": 0.95},
    )
    train(cfg)
    rows = read_metrics(tmp_path / "run")
    assert calls == [0.95] * 6
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["loss"] for r in rows] == pytest.approx([5.0, 3.0])
    assert [r["pretext_acc"] for r in rows] == pytest.approx([50.0, 25.0])
    base = cfg.optim.lr * 8 / 256
    assert [r["lr"] for r in rows] == pytest.approx([base, base * 0.5])  # cosine over 2 epochs: 1, 1/2
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([base * 0.5])  # set, not only logged
    for r in rows:
        assert r["img_per_s"] * r["epoch_time_s"] == pytest.approx(3 * 8)
        assert r["img_per_s_per_device"] == pytest.approx(r["img_per_s"])  # one process


def test_knn_in_train_and_in_the_knn_command_agree_on_unreadable_files(fresh_root, tmp_path, capsys, caplog):
    # The trainer's kNN takes the loader's header-checked lists, and a truncated JPEG passes that
    # check: the feature passes must leave out whatever fails to decode, not count another image in
    # its place, so that train's monitor and summary, `moco-fast knn` and a copy without the bad
    # files agree.
    import shutil

    from moco_fast.checkpoint import load_model
    from moco_fast.data import load_splits
    from moco_fast.knn import knn_score

    clean = tmp_path / "clean"
    shutil.copytree(fresh_root, clean)
    for split, n_junk in (("train", 1), ("test", 2)):
        for c in sorted((fresh_root / split).iterdir()):
            good = sorted(c.iterdir())[0].read_bytes()
            (c / "0000a_trunc.jpg").write_bytes(good[: int(len(good) * 0.9)])  # header fine, decode fails
            for i in range(n_junk):
                (c / f"0000b_junk{i}.jpg").write_text("junk")
    out = tmp_path / "run"
    argv = ["train", "--data", str(fresh_root), "--preset", "cifar", "--arch", "resnet18", "--stem", "imagenet"]
    argv += ["--epochs", "1", "--batch-size", "8", "--moco-k", "16", "--bn-splits", "2", "--device", "cpu"]
    argv += ["--workers", "0", "--knn-every", "1", "--out", str(out)]
    with pytest.warns(UserWarning, match="(?s)kNN features \\(eval\\): left out 2 of 10 .*0000a_trunc.jpg"):
        assert main(argv) == 0
    assert "test/airplane/0000b_junk1.jpg: not a readable image" in caplog.text  # the header check's
    summary = json.loads((out / "summary.json").read_text())
    assert read_metrics(out)[-1]["knn_top1"] == summary["final_knn_top1"]
    capsys.readouterr()
    knn_argv = ["knn", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(fresh_root), "--device", "cpu"]
    with pytest.warns(UserWarning, match="0000a_trunc.jpg"):  # the header check let it through: named here
        assert main([*knn_argv, "--workers", "0", "--features", "both"]) == 0
    printed = capsys.readouterr().out
    k = summary["knn_k"]  # the train split is smaller than the default k=200
    assert f"(backbone, k={k}, t=0.1): {summary['final_knn_top1']:.2f}%" in printed, printed
    assert f"(head, k={k}, t=0.1): {summary['final_knn_head_top1']:.2f}%" in printed, printed
    # exactly the decodable images: the same number as on a copy that never had the bad files
    model, cfg = load_model(out / "checkpoint.pt", "cpu")
    splits = load_splits(str(clean))
    assert len(splits.eval) == 8
    assert k == len(splits.train)  # the k used: every decodable train image, not the listed ones
    cpu = torch.device("cpu")
    for net, key in ((model.backbone(), "final_knn_top1"), (model.encoder_q, "final_knn_head_top1")):
        ref, *_ = knn_score(net, splits.train, splits.eval, cfg.data.aug, cpu, workers=0)
        assert summary[key] == pytest.approx(ref, abs=1e-6)


def test_a_run_without_an_eval_split_says_how_to_get_its_knn(tiny_root, tmp_path, capsys):
    # --data with no eval split (here train/ alone; a .beton or shards alike): the final kNN is
    # skipped, no summary.json is written, and the last lines say how to get the figure
    argv = ["train", "--data", str(tiny_root / "train"), "--preset", "cifar", "--arch", "resnet18", "--epochs", "1"]
    argv += ["--batch-size", "8", "--moco-k", "16", "--bn-splits", "2", "--device", "cpu", "--workers", "0"]
    assert main([*argv, "--image-size", "16", "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "run" / "summary.json").exists()
    assert f"`moco-fast knn --checkpoint {tmp_path / 'run' / 'checkpoint.pt'} --data ROOT`" in printed, printed


@pytest.mark.parametrize("fails", [False, True])
def test_train_puts_back_the_callers_cudnn_benchmark_mode(tiny_root, tmp_path, monkeypatch, fails):
    # train sets torch.backends.cudnn.benchmark (process-wide) for its fixed shapes: a program that
    # called trainer.train and went on (a notebook) kept it on, whether the training returned or raised
    import moco_fast.trainer as trainer

    def failing_epoch(*args, **kwargs):  # an error in the epoch, after the mode was set (a loader's)
        raise RuntimeError("the epoch failed")

    if fails:
        monkeypatch.setattr(trainer, "_run_epoch", failing_epoch)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = tiny_config(tiny_root, tmp_path / "run", **{"optim.epochs": 1, "runtime.final_knn": False})
    if fails:
        with pytest.raises(RuntimeError, match="the epoch failed"):
            train(cfg)
    else:
        assert train(cfg)["epoch"] == 1
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.parametrize("whose", ["train's", "the caller's"])
def test_a_failed_train_ends_the_process_group_it_made_and_no_other(tiny_root, tmp_path, monkeypatch, held_port, whose):
    # torchrun's variables for one process: train joins a 1-process gloo group. A train that raised left
    # the group it made up: the caller's next train in the process (a notebook) ran in it and left it up
    import torch.distributed as dist
    from distributed_helpers import torchrun_env

    import moco_fast.trainer as trainer

    def failing_run(*args, **kwargs):  # an error after the join (a loader's, an epoch's)
        raise RuntimeError("the run failed")

    torchrun_env(monkeypatch, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(held_port))
    monkeypatch.setattr(trainer, "_train_held", failing_run)
    try:
        if whose == "the caller's":
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{held_port}", rank=0, world_size=1)
        with pytest.raises(RuntimeError, match="the run failed"):
            train(tiny_config(tiny_root, tmp_path / "run"))
        assert dist.is_initialized() is (whose == "the caller's")
    finally:
        if dist.is_initialized():  # the next tests run without it, whatever failed here
            dist.destroy_process_group()


@pytest.mark.parametrize("fails", [False, True])
def test_train_on_a_rank_past_0_puts_back_the_callers_log_level(tiny_root, tmp_path, monkeypatch, fails):
    # ranks past 0 log warnings alone while they train; the caller's level of the `moco_fast` logger
    # stayed WARNING after train returned or raised (a notebook's rank 1 went on with its INFO silenced)
    import moco_fast.distributed as dist_utils
    import moco_fast.trainer as trainer

    levels = []

    def held(cfg, out, device, amp_dtype, world, rank, owns_group, setup_warnings, *rest):
        levels.append(logging.getLogger("moco_fast").level)
        setup_warnings.release(show=False)  # as the run's agree() does
        if fails:
            raise RuntimeError("the run failed")
        return {"epoch": 1}

    monkeypatch.setattr(dist_utils, "rank", lambda: 1)
    monkeypatch.setattr(trainer, "_train_held", held)
    logger = logging.getLogger("moco_fast")
    before = logger.level
    logger.setLevel(logging.DEBUG)  # setLevel, not the attribute: it clears the logger's level cache
    try:
        if fails:
            with pytest.raises(RuntimeError, match="the run failed"):
                train(tiny_config(tiny_root, tmp_path / "run"))
        else:
            assert train(tiny_config(tiny_root, tmp_path / "run")) == {"epoch": 1}
        assert levels == [logging.WARNING]  # the run's own: quiet
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(before)


def test_a_stderr_gone_after_a_trainings_last_sync_stops_the_next_training(tiny_root, tmp_path, monkeypatch):
    # stderr's reader went away after a training's last sync (its final kNN, a sweep setting's
    # evaluation): stderr was pointed at /dev/null there, but the mark was dropped as the training
    # returned, so the next training in the process (a sweep's next setting) ran whole without a word
    # or a stop, where one whose reader goes away during its steps saves and stops (exit status 141)
    import os
    import signal

    from moco_fast import closed_stdout

    monkeypatch.setattr(closed_stdout, "_stderr_gone", False)  # put back after the test, for the others
    read, write = os.pipe()
    os.close(read)
    with open(write, "w") as gone, closed_stdout.closed_stderr_stops():  # the earlier training
        assert closed_stdout.stderr_went_away(gone)
    cfg = tiny_config(tiny_root, tmp_path / "run", **{"optim.epochs": 1, "runtime.log_every": 1})
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(cfg)
    assert stopped.value.signum == signal.SIGPIPE
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 0 and state["step"] >= 1  # saved within the epoch, at a sync
