"""Configs: presets override the dataclass defaults, flags override presets, round trips are exact."""

import json

import pytest

from moco_fast.augment import MOCO_V1, MOCO_V2
from moco_fast.cli import build_parser, main
from moco_fast.commands.train import config_from_args
from moco_fast.config import ConfigError, build_config, from_dict, to_dict


def parse(*argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_presets():
    v1, v2 = build_config("v1"), build_config("v2")
    assert (v1.model.mlp, v1.moco.t, v1.optim.schedule, v1.data.aug) == (False, 0.07, "step", MOCO_V1)
    assert (v2.model.mlp, v2.moco.t, v2.optim.schedule, v2.data.aug) == (True, 0.2, "cosine", MOCO_V2)
    assert MOCO_V1.blur_prob == 0 and MOCO_V2.blur_prob == 0.5
    with pytest.raises(ConfigError):
        build_config("v3")


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
        (["--loader", "dali", "--loader-option", "hw_decoder_load=2"], "hw_decoder_load must be within 0-1"),
        (["--loader", "ffcv", "--loader-option", "decode=thrice"], "decode must be once or twice"),
        (["--loader", "ffcv", "--loader-option", "batches_ahead=0"], "batches_ahead must be at least 1 (got 0)"),
        (["--loader", "resident", "--loader-option", "size=x"], "size='x': expected an int"),
        (["--loader", "torch", "--loader-option", "a=1"], "the torch loader takes no --loader-option"),
        (["--loader", "synthetic", "--loader-option", "a=1"], "the synthetic loader takes no --loader-option"),
        (["--loader", "nosuch"], "unknown loader 'nosuch'"),
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
