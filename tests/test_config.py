"""Configs: presets override the dataclass defaults, flags override presets, round trips are exact."""

import json
import math

import pytest
import torch

from moco_fast.augment import MOCO_CIFAR, MOCO_V1, MOCO_V2
from moco_fast.backbone import build_head, resolve_stem
from moco_fast.cli import build_parser, main
from moco_fast.commands.train import config_from_args
from moco_fast.config import ConfigError, build_config, from_dict, to_dict
from moco_fast.trainer import base_lr, lr_at


def parse(*argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_presets():
    v1, v2 = build_config("v1"), build_config("v2")
    assert (v1.model.mlp, v1.moco.t, v1.optim.schedule, v1.data.aug) == (False, 0.07, "step", MOCO_V1)
    assert (v2.model.mlp, v2.moco.t, v2.optim.schedule, v2.data.aug) == (True, 0.2, "cosine", MOCO_V2)
    assert MOCO_V1.blur_prob == 0 and MOCO_V2.blur_prob == 0.5
    with pytest.raises(ConfigError):
        build_config("v3")


def run_values(preset: str) -> dict:
    """What a one-process run of `preset` trains with, in the official scripts' terms: the lr at its
    batch, and that of each epoch."""
    cfg = parse("--data", "x", "--preset", preset)
    base = base_lr(cfg, world=1)
    lrs = [lr_at(cfg, e, base) for e in range(cfg.optim.epochs)]
    m, o = cfg.moco, cfg.optim
    return {
        "arch": cfg.model.arch,
        "mlp": cfg.model.mlp,
        "dim": cfg.model.dim,
        "K, m, T": (m.k, m.m, m.t),
        "mechanism, symmetric, shuffle BN, splits": (m.mechanism, m.symmetric, m.shuffle_bn, m.bn_splits),
        "epochs, batch, lr": (o.epochs, o.batch_size, pytest.approx(base)),
        "sgd momentum, wd": (o.momentum, o.weight_decay),
        "schedule": o.schedule,
        "lr by epoch": pytest.approx(lrs),
        "knn k, t": (cfg.runtime.knn_k, cfg.runtime.knn_t),
    }


# main_moco.py's defaults (v1; v2 adds --mlp --aug-plus --cos --moco-t 0.2) and the CIFAR-10 demo's
# (moco_cifar10_demo.ipynb: lr 0.06 at batch 512, cos; the kNN monitor's k 200, t 0.1). main_moco.py
# has neither split BN nor a kNN monitor: v1's and v2's 8 splits stand for its 8 GPUs of 32 images
# (one process shuffles BN over them), and their kNN settings are the demo's.
OFFICIAL = {
    "v1": {
        "arch": "resnet50",
        "mlp": False,
        "dim": 128,
        "K, m, T": (65536, 0.999, 0.07),
        "mechanism, symmetric, shuffle BN, splits": ("moco", False, True, 8),
        "epochs, batch, lr": (200, 256, 0.03),
        "sgd momentum, wd": (0.9, 1e-4),
        "schedule": "step",
        "lr by epoch": [0.03 * 0.1 ** ((e >= 120) + (e >= 160)) for e in range(200)],  # --schedule 120 160
        "knn k, t": (200, 0.1),
    },
}
OFFICIAL["v2"] = {
    **OFFICIAL["v1"],
    "mlp": True,
    "K, m, T": (65536, 0.999, 0.2),
    "schedule": "cosine",
    "lr by epoch": [0.03 * 0.5 * (1 + math.cos(math.pi * e / 200)) for e in range(200)],
}
OFFICIAL["cifar"] = {
    **OFFICIAL["v2"],
    "arch": "resnet18",
    "mlp": False,
    "K, m, T": (4096, 0.99, 0.1),
    "epochs, batch, lr": (200, 512, 0.06),
    "sgd momentum, wd": (0.9, 5e-4),
    "lr by epoch": [0.06 * 0.5 * (1 + math.cos(math.pi * e / 200)) for e in range(200)],
}


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_the_presets_train_with_the_official_recipes(preset):
    assert run_values(preset) == OFFICIAL[preset]
    cfg = parse("--data", "x", "--preset", preset)
    width = 512 if preset == "cifar" else 2048  # ResNet-18's and ResNet-50's pooled features
    head = build_head(width, cfg.model.dim, cfg.model.mlp)
    # v2's MLP: a hidden layer as wide as the backbone (2048-d), then ReLU; v1 and the demo: one fc
    layers = [(m.in_features, m.out_features) for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert layers == ([(width, width)] if cfg.model.mlp else []) + [(width, 128)]
    assert any(isinstance(m, torch.nn.ReLU) for m in head.modules()) == cfg.model.mlp
    assert resolve_stem(cfg.model.stem, cfg.data.aug.image_size) == ("cifar" if preset == "cifar" else "imagenet")


def test_the_lr_scales_with_the_global_batch():
    # --lr is for a global batch of 256, --batch-size in each process times the processes
    # (docs/distributed.md): 4 processes of 64 train at --lr, one of 64 at a quarter of it
    cfg = parse("--data", "x", "--preset", "v2", "--batch-size", "64", "--lr", "0.03")
    assert base_lr(cfg, world=4) == pytest.approx(0.03)
    assert base_lr(cfg, world=1) == pytest.approx(0.03 / 4)


def test_the_demos_augmentation_is_the_notebooks():
    # RandomResizedCrop(32) at torchvision's default scale, flip, jitter (0.4, 0.4, 0.4, 0.1) p 0.8,
    # grayscale 0.2, no blur; Normalize with the notebook's CIFAR statistics
    a = MOCO_CIFAR
    assert (a.image_size, a.crop_scale, a.crop_ratio, a.flip_prob) == (32, (0.08, 1.0), (3 / 4, 4 / 3), 0.5)
    assert (a.jitter_prob, a.brightness, a.contrast, a.saturation, a.hue, a.gray_prob) == (0.8, 0.4, 0.4, 0.4, 0.1, 0.2)
    assert (a.blur_prob, a.mean, a.std) == (0.0, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


def test_flags_override_presets_and_unset_flags_do_not():
    cfg = parse("--data", "x", "--preset", "cifar", "--moco-k", "123", "--no-shuffle-bn")
    assert (cfg.model.arch, cfg.moco.k, cfg.moco.shuffle_bn, cfg.moco.m) == ("resnet18", 123, False, 0.99)


def test_default_preset_depends_on_data():
    assert parse().preset == "demo" and parse().data.aug.image_size == 32
    assert parse("--data", "x").preset == "v2" and parse("--data", "x").data.aug.image_size == 224
    assert parse("--data", "x", "--image-size", "96").data.aug.image_size == 96


def test_the_demo_sets_size_given_again_keeps_its_statistics():
    # `--preset v2` on the demo set trains at its 32 px with its CIFAR statistics; --image-size 32,
    # the same size given, normalised with ImageNet's (another run than the one left to its default)
    left, given = parse("--preset", "v2"), parse("--preset", "v2", "--image-size", "32")
    assert given.data.aug == left.data.aug and left.data.aug.mean != MOCO_V2.mean
    assert parse("--preset", "v2", "--image-size", "64").data.aug == left.data.aug.with_size(64)  # the data's
    assert parse("--data", "x", "--image-size", "32").data.aug == MOCO_V2.with_size(32)  # other data: the preset's


def test_round_trip():
    cfg = parse("--data", "x", "--preset", "v1", "--loader-option", "a=1")
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_a_config_saved_by_the_first_moco_fast_still_loads():
    # from_dict checks each saved value's type (f26cb24); no field has changed its type or shape since
    # the first version (git log -p moco_fast/config.py), whose configs lack the fields added since:
    # as torch.save keeps them (tuples) and as config.json writes them (lists)
    saved = to_dict(build_config("v1"))
    del saved["moco"]["shuffle_exchange"], saved["data"]["loader_options"], saved["data"]["loader_module"]
    for name in ("cuda_graph", "force", "save_every"):
        del saved["runtime"][name]
    for form in (saved, json.loads(json.dumps(saved))):
        assert from_dict(form) == build_config("v1")


def test_bad_loader_option_and_help(capsys):
    assert main(["train", "--loader-option", "novalue", "--print-config"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--moco-k" in capsys.readouterr().out


@pytest.mark.parametrize(("loader", "blocked"), [("dali", "nvidia.dali"), ("ffcv", "ffcv")])
def test_a_missing_optional_backend_is_a_clear_error(monkeypatch, tmp_path, capsys, loader, blocked):
    # As on a machine without the extra: importing the backend fails on its dependency.
    import sys

    from moco_fast import loaders

    monkeypatch.setitem(sys.modules, blocked, None)
    monkeypatch.delitem(loaders._LOADERS, loader, raising=False)
    for mod in [m for m in sys.modules if m.startswith(f"moco_fast.loaders.{loader}")]:
        monkeypatch.delitem(sys.modules, mod)
    args = ["train", "--device", "cpu", "--loader", loader, "--epochs", "1", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"pip install 'moco-fast[{loader}]'" in err and "Traceback" not in err


def test_convert_to_ffcv_without_ffcv_fails_before_reading_images(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "ffcv", None)
    (tmp_path / "src" / "c").mkdir(parents=True)  # no images: the FFCV check must come first
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "x.beton"), "--format", "ffcv"]) == 2
    assert "moco-fast[ffcv]" in capsys.readouterr().err


@pytest.mark.parametrize("loader", ["torch", "synthetic"])
def test_a_loader_without_options_refuses_them(loader, tmp_path, capsys):
    args = ["train", "--device", "cpu", "--loader", loader, "--loader-option", "threads=4", "--out", str(tmp_path)]
    assert main(args) == 2
    assert f"the {loader} loader takes no --loader-option (got threads=4)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--loader", "dali", "--loader-option", "no_such_key=1"], "unknown DALI loader option 'no_such_key'"),
        (["--loader", "dali", "--loader-option", "hw_decoder_load=2"], "hw_decoder_load must be within 0-1, got 2"),
        # DALI's refusals name the value given (decoder=CPU read "must be auto, mixed or cpu")
        (["--loader", "dali", "--loader-option", "decoder=CPU"], "decoder must be auto, mixed or cpu, got 'CPU'"),
        (
            ["--loader", "dali", "--loader-option", "threads=-2"],
            "threads must be 0 (the resolved --workers) or a count, got -2",
        ),
        (
            ["--loader", "dali", "--loader-option", "shuffle_buffer=0"],
            "option shuffle_buffer must be at least 1 (got 0)",
        ),
        (["--loader", "dali", "--loader-option", "prefetch=0"], "option prefetch must be at least 1 (got 0)"),
        # DALI started a million threads where --workers past 8 a core is refused
        (
            ["--loader", "dali", "--loader-option", "threads=1000000"],
            "--loader-option threads 1000000: this machine has",
        ),
        (["--loader", "ffcv", "--loader-option", "decode=thrice"], "decode must be once or twice"),
        (["--loader", "ffcv", "--loader-option", "batches_ahead=0"], "batches_ahead must be at least 1 (got 0)"),
        # 10**9 went on to FFCV, which sizes its buffers for batches_ahead + 2 batches: a traceback
        (
            ["--loader", "ffcv", "--loader-option", "batches_ahead=1000000000"],
            "error: ffcv loader option batches_ahead must be at most 32 (got 1000000000)",
        ),
        # and DALI's prefetch, which went on to DALI's queue, a buffer set per batch
        (
            ["--loader", "dali", "--loader-option", "prefetch=1000000000"],
            "error: DALI loader option prefetch must be at most 32 (got 1000000000)",
        ),
        # a boolean names the spellings it takes: it said "os_cache='2': expected a bool"
        (
            ["--loader", "ffcv", "--loader-option", "os_cache=2"],
            "error: ffcv loader option os_cache must be one of 1, true, yes (on) or 0, false, no (off), got '2'",
        ),
        (["--loader", "resident", "--loader-option", "size=x"], "size='x': expected an int"),
        (["--loader", "torch", "--loader-option", "a=1"], "the torch loader takes no --loader-option"),
        (["--loader", "synthetic", "--loader-option", "a=1"], "the synthetic loader takes no --loader-option"),
        (["--loader", "nosuch"], "unknown loader 'nosuch'"),
        # the last was taken without a word
        (
            ["--loader", "dali", "--loader-option", "threads=2", "--loader-option", "threads=4"],
            "error: --loader-option threads is given twice (threads=2, threads=4): give it once",
        ),
    ],
)
def test_print_config_refuses_the_loader_options_the_run_refuses(capsys, flags, said):
    # the same one line and exit status as the run, without building the loader or importing DALI/FFCV
    assert main(["train", *flags, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1, err


def test_loader_options_are_checked_for_every_registered_loader():
    from moco_fast.loaders import _MODULES, check_loader

    for name in _MODULES:  # a backend added without its options here would be a KeyError
        check_loader(name, {})


@pytest.mark.parametrize(("loader", "blocked"), [("dali", "nvidia.dali"), ("ffcv", "ffcv")])
def test_print_config_checks_options_where_the_backend_is_not_installed(monkeypatch, capsys, loader, blocked):
    # a config printed here for a machine that has DALI or FFCV: its options checked, its library not needed
    import sys

    from moco_fast import loaders

    monkeypatch.setitem(sys.modules, blocked, None)
    monkeypatch.delitem(loaders._LOADERS, loader, raising=False)
    for mod in [m for m in sys.modules if m.startswith(f"moco_fast.loaders.{loader}")]:
        monkeypatch.delitem(sys.modules, mod)
    args = ["train", "--data", "x", "--loader", loader, "--print-config"]
    assert main([*args, "--loader-option", "no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    good = {"dali": "prefetch=3", "ffcv": "batches_ahead=2"}[loader]
    assert main([*args, "--loader-option", good]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["loader_options"] == dict([good.split("=")])


def test_a_loader_option_given_twice_with_the_same_value_is_taken(capsys):
    flags = ["--loader", "ffcv", "--loader-option", "batches_ahead=2", "--loader-option", "batches_ahead=2"]
    assert main(["train", *flags, "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["loader_options"] == {"batches_ahead": "2"}


def test_the_run_checks_dali_threads_for_each_of_its_processes(monkeypatch):
    # threads=16 passed on 2 cores (16 for one process) though 8 processes each start 16 threads, where
    # --workers is checked for all of them
    from moco_fast import cores
    from moco_fast.trainer import check_workers

    monkeypatch.setattr(cores, "available_cores", lambda: 2)
    from moco_fast.loaders import check_loader

    threads = check_loader("dali", {"threads": "16"})
    check_workers(1, 1, threads)
    with pytest.raises(ConfigError, match=r"^--loader-option threads 16 .*use at most 2 "):
        check_workers(1, 8, threads)
    check_workers(1, 8, check_loader("torch", {}))


def test_a_saved_option_refused_below_its_bound_is_replaced_by_its_default_not_the_bound():
    # the fix of a saved option named prefetch=32 for any refused prefetch: a saved prefetch=0 too
    from moco_fast.loaders.options import replaced_options

    assert [r[:3] for r in replaced_options("dali", {"prefetch": "0"}, {})] == [("prefetch", "0", "2")]
    assert [r[:3] for r in replaced_options("ffcv", {"batches_ahead": "64"}, {})] == [("batches_ahead", "64", "32")]
    assert [r[:3] for r in replaced_options("ffcv", {"os_cache": "on"}, {})] == [("os_cache", "on", "1")]  # a bool's


def test_a_field_of_the_augmentations_is_set_by_its_dotted_name():
    # build_config(preset, {"data.aug.image_size": 16}), the dotted name --print-config shows, ended in
    # FrozenInstanceError's traceback: the AugSpec is frozen (the presets share it)
    from moco_fast.augment import AUG_PRESETS

    cfg = build_config("cifar", {"data.aug.image_size": 16, "data.aug.blur_prob": 0.5})
    assert (cfg.data.aug.image_size, cfg.data.aug.blur_prob) == (16, 0.5)
    assert (AUG_PRESETS["cifar"].image_size, AUG_PRESETS["cifar"].blur_prob) == (32, 0.0)  # the preset's own
