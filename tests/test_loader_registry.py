"""A loader a library user registers (`@register_loader`): create_loader and trainer.train take it
in that process; a built-in name, or one that another function holds, is refused as it is registered."""

import json
from dataclasses import replace

import pytest
from moco_fast.loaders import _LOADERS, _MODULES, available_loaders, check_loader, create_loader, register_loader
from moco_fast.loaders.options import PARSERS
from run_helpers import rows as read_metrics

from moco_fast.config import ConfigError, build_config
from moco_fast.trainer import train


@pytest.fixture
def registry():
    """The registry as it was, back after the test: a user's loader does not leak into other tests."""
    held = dict(_LOADERS)
    yield
    _LOADERS.clear()
    _LOADERS.update(held)


def test_a_registered_loader_trains_from_python(registry, tmp_path):
    built = []

    @register_loader("mine")
    def mine(args):
        built.append(dict(args.options))
        return create_loader("synthetic", replace(args, options={}))

    assert "mine" in available_loaders()
    check_loader("mine", {"any": "thing"})  # its options are its own to read
    cfg = build_config(
        "cifar",
        {
            "data.loader": "mine",
            "data.loader_options": {"size": "3"},
            "data.synthetic_steps": 2,
            "optim.epochs": 1,
            "optim.batch_size": 8,
            "moco.k": 32,
            "moco.bn_splits": 2,
            "data.workers": 0,
            "runtime.device": "cpu",
            "runtime.out": str(tmp_path / "run"),
            "runtime.final_knn": False,
            "runtime.knn_baseline": False,
        },
    )
    train(cfg)
    assert built == [{"size": "3"}]
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == [1]


def test_an_unregistered_name_is_still_refused():
    with pytest.raises(ConfigError, match="unknown loader 'nosuch'"):
        check_loader("nosuch", {})


@pytest.mark.parametrize("name", ["torch", "ffcv"])
def test_a_built_in_name_is_refused(registry, name):
    with pytest.raises(ValueError, match=f"{name} is a built-in loader"):

        @register_loader(name)
        def mine(args):
            raise AssertionError


def test_a_name_another_function_holds_is_refused_and_the_same_one_again_replaces_it(registry):
    def first(args):
        return 1

    register_loader("mine")(first)
    with pytest.raises(ValueError, match=r"the name is .*first's already"):

        @register_loader("mine")
        def second(args):
            return 2

    def again(args):
        return 3

    again.__qualname__ = first.__qualname__  # defined anew: a reloaded module, a cell run twice
    register_loader("mine")(again)
    assert _LOADERS["mine"] is again


def test_each_built_in_loader_has_its_options_parser():
    assert set(_MODULES) == set(PARSERS)


def one_epoch_with_mine(out):
    """A CPU run of one epoch with loader "mine" (a user's, registered by the test), into `out`."""
    fields = {"data.loader": "mine", "data.synthetic_steps": 2, "optim.epochs": 1, "optim.batch_size": 8}
    fields |= {"moco.k": 32, "moco.bn_splits": 2, "data.workers": 0, "runtime.device": "cpu"}
    fields |= {"runtime.out": str(out), "runtime.final_knn": False, "runtime.knn_baseline": False}
    return build_config("cifar", fields)


def users_loader(args):
    """Loader "mine", a user's as a test registers it: the synthetic one under another name."""
    return create_loader("synthetic", args)


def trained_with_mine(tmp_path):
    """The folder of one_epoch_with_mine's run, "mine" registered (users_loader) for it."""
    register_loader("mine")(users_loader)
    out = tmp_path / "run"
    train(one_epoch_with_mine(out))
    return out


def test_a_run_trained_with_a_users_loader_names_its_module_on_a_resume_from_the_cli(registry, tmp_path, capsys):
    # the CLI runs none of the user's code: `train --resume` of such a run said "unknown loader 'mine'" alone
    from moco_fast.cli import main

    out = trained_with_mine(tmp_path)
    argv = ["train", "--resume", "--out", str(out), "--epochs", "2"]
    _LOADERS.pop("mine")  # as in a shell, where the module that registered it is not imported
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"moco-fast train: error: --resume: the run was trained with loader 'mine', registered by module {__name__} "
        "(@register_loader), which this command cannot know: it runs no code of yours. Resume it from Python: "
        f"`import {__name__}` (which registers it), then `moco_fast.cli.main({argv[:4]!r})`"
    )
    # a --loader given now that no loader has is that flag's error alone: it said "the run was trained
    # with loader 'nosuch', registered by module ..."; the run's own, given again, is the run's
    assert main([*argv, "--loader", "nosuch"]) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said == f"moco-fast train: error: unknown loader 'nosuch'; choose one of {available_loaders()}", said
    assert main([*argv, "--loader", "mine"]) == 2
    assert f"registered by module {__name__} (@register_loader)" in capsys.readouterr().err
    # the way it names: the loader registered in this process, the CLI's train resumes the run
    register_loader("mine")(users_loader)
    assert main(argv) == 0
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]


def test_a_run_resumed_with_a_built_in_loader_keeps_no_users_module(registry, tmp_path, caplog):
    # the module of the user's loader stayed in the config of a run resumed with --loader synthetic
    from moco_fast.cli import main

    out = trained_with_mine(tmp_path)
    assert json.loads((out / "config.json").read_text())["data"]["loader_module"] == __name__
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2", "--loader", "synthetic"]) == 0
    assert json.loads((out / "config.json").read_text())["data"]["loader_module"] is None
    said = [r.getMessage() for r in caplog.records if "changed" in r.getMessage()]
    assert said and "data.loader 'mine' -> 'synthetic'" in said[0] and "loader_module" not in said[0]


def test_a_users_loader_whose_module_the_run_did_not_record_is_resumed_from_python(
    registry, tmp_path, capsys, monkeypatch
):
    # a run saved before data.loader_module, resumed from the CLI, said "unknown loader 'mine'; choose
    # one of [...]" alone: it says too that a loader registered from Python is resumed from Python
    from moco_fast import trainer
    from moco_fast.cli import main

    with monkeypatch.context() as m:
        m.setattr(trainer, "registered_by", lambda name: None)  # as before the run recorded the module
        out = trained_with_mine(tmp_path)
    assert json.loads((out / "config.json").read_text())["data"]["loader_module"] is None
    _LOADERS.pop("mine")
    argv = ["train", "--resume", "--out", str(out), "--epochs", "2"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"moco-fast train: error: --resume: unknown loader 'mine'; choose one of {available_loaders()}. A loader "
        "registered from Python (@register_loader) is one which this command cannot know: it runs no code of "
        "yours. Resume it from Python: import the module that registers it (or run its @register_loader again), "
        f"then `moco_fast.cli.main({argv[:4]!r})`"
    )
    # a --loader given now that no loader has is that flag's error alone
    assert main([*argv, "--loader", "nosuch"]) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.endswith(f"unknown loader 'nosuch'; choose one of {available_loaders()}")


def test_a_sweep_resumes_a_setting_trained_with_a_users_loader(tmp_path):
    # train() records data.loader_module, which a setting's config is built without: a sweep run from
    # Python with a user's loader found its interrupted setting "trained with other settings"
    import torch

    from moco_fast.config import to_dict
    from moco_fast.sweep import Setting
    from moco_fast.sweep_plan import plan_setting

    cfg = build_config("cifar", {"data.loader": "mine", "runtime.out": str(tmp_path)})
    trained = replace(cfg, data=replace(cfg.data, loader_module="users_module"))
    torch.save({"config": to_dict(trained)}, tmp_path / "checkpoint.pt")
    setting = Setting(cfg.moco.mechanism, cfg.moco.k, cfg.moco.m, cfg.moco.shuffle_bn)
    assert plan_setting(cfg, setting, None, (0, 0.0)) == "resume"
