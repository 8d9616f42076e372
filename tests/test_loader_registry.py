"""A loader a library user registers (`@register_loader`): create_loader and trainer.train take it
in that process; a built-in name, or one that another function holds, is refused as it is registered."""

import contextlib
import json
import logging
import sys
import types
from dataclasses import replace

import pytest
from moco_fast.loaders import (
    _LOADERS,
    _MODULES,
    available_loaders,
    check_loader,
    create_loader,
    import_loader_module,
    register_loader,
    registered_by,
)
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


def one_epoch_with_mine(out, loader="mine"):
    """A CPU run of one epoch with loader "mine" (a user's, registered by the test), into `out`."""
    fields = {"data.loader": loader, "data.synthetic_steps": 2, "optim.epochs": 1, "optim.batch_size": 8}
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
        f"`import {__name__}` (which registers it), then `moco_fast.cli.main({argv!r})`"
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


def test_a_users_loaders_resume_under_torchrun_says_how_to_run_it_there_on_rank_0(
    registry, tmp_path, capsys, monkeypatch
):
    # under torchrun every rank said to run moco_fast.cli.main(...), which from Python alone resumes in
    # one process: rank 0 names the torchrun command for the script, the other ranks leave it to rank 0
    from distributed_helpers import torchrun_env

    from moco_fast.cli import main

    out = trained_with_mine(tmp_path)
    _LOADERS.pop("mine")
    argv = ["train", "--resume", "--out", str(out), "--epochs", "2", "--print-config"]
    torchrun_env(monkeypatch, RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", TORCHELASTIC_RUN_ID="t")
    assert main(argv) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    run = f"`moco_fast.cli.main({argv[:-1]!r})`"  # the line runs, not --print-config
    assert said.endswith(
        f"then {run} in a SCRIPT.py that torchrun starts as it did this command: "
        "`torchrun --standalone --nproc_per_node 2 SCRIPT.py`"
    ), said
    monkeypatch.setenv("RANK", "1")
    assert main(argv) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.endswith("which this command cannot know: it runs no code of yours"), said


def test_print_config_names_the_users_loaders_module_as_the_run_records_it(registry, tmp_path, capsys):
    # --print-config printed data.loader_module null for a run whose config.json records the module
    from moco_fast.cli import main

    register_loader("mine")(users_loader)
    argv = ["train", "--loader", "mine", "--device", "cpu", "--out", str(tmp_path / "run"), "--print-config"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["data"]["loader_module"] == __name__


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
        f"then `moco_fast.cli.main({argv!r})`"
    )
    # with --gpus, a @register_loader run again in a notebook or python -c failed in every spawned worker
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the GPUs the line asks for (else refused first)
    assert main([*argv, "--gpus", "2"]) == 2  # a run of the CPU's: its line asks for --device cuda too
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.endswith(
        "Resume it from Python: import the module that registers it (or register it again at a script's top "
        f"level: --gpus's workers run it), then `moco_fast.cli.main({[*argv[:4], '--device', 'cuda', '--gpus', '2', *argv[4:]]!r})`"
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


# A library user's module that registers loader "theirs" as it is imported.
USERS_MODULE = """
from moco_fast.loaders import create_loader, register_loader


@register_loader("theirs")
def theirs(args):
    return create_loader("synthetic", args)
"""


@pytest.fixture
def users_module(registry, tmp_path, monkeypatch):
    """The name of a module of the user's (USERS_MODULE) that this process can import, not imported yet."""
    name = "users_loaders_for_workers"
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / f"{name}.py").write_text(USERS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "users"))
    yield name
    sys.modules.pop(name, None)


def as_a_worker(cfg):
    """What a `--gpus` worker runs (launch._train_worker), in this process: no CUDA here to launch one."""
    from moco_fast.launch import _train_worker

    return _train_worker(cfg, types.SimpleNamespace(taken=contextlib.nullcontext), logging.getLogger("moco_fast").level)


def with_module(cfg, module):
    return replace(cfg, data=replace(cfg.data, loader_module=module))


def test_a_gpus_worker_imports_the_module_that_registered_the_users_loader(users_module, tmp_path):
    # a --gpus worker is spawned: it knew a user's loader only where the launcher's script registered
    # it at its top level, and every rank failed with "unknown loader" (a loader registered in an
    # imported module, in a notebook, python -c...). It imports the module that the launcher recorded
    assert "theirs" not in available_loaders()
    out = tmp_path / "run"
    as_a_worker(with_module(one_epoch_with_mine(out, "theirs"), users_module))
    assert registered_by("theirs") == users_module
    assert json.loads((out / "config.json").read_text())["data"]["loader_module"] == users_module
    assert [r["epoch"] for r in read_metrics(out)] == [1]


def test_the_gpus_launcher_records_the_users_loaders_module(users_module, tmp_path, monkeypatch):
    # the launcher handed its workers the config without data.loader_module (train() records it, in
    # each worker): they had no module to import. 2 pretend GPUs, no worker started
    import importlib

    import torch

    from moco_fast import launch
    from moco_fast.cli import main

    importlib.import_module(users_module)  # as the user's script does, before moco_fast.cli.main
    handed = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(launch, "run_workers", lambda fn, args, n, where=None: handed.append(args) or [{}])
    argv = ["train", "--loader", "theirs", "--arch", "resnet18", "--image-size", "16", "--dim", "16"]
    argv += ["--batch-size", "8", "--moco-k", "32", "--epochs", "1", "--workers", "0", "--no-final-knn"]
    assert main([*argv, "--device", "auto", "--gpus", "2", "--out", str(tmp_path / "run")]) == 0
    ((cfg, *_),) = handed
    assert cfg.data.loader_module == users_module


@pytest.mark.parametrize(
    "source, cause",
    [
        (None, "ModuleNotFoundError: No module named 'users_loaders_for_workers'"),  # not on the worker's path
        ("raise RuntimeError('no licence for this machine')\n", "RuntimeError: no licence for this machine"),
        # a message of several lines: its first (numpy's and CUDA libraries' say more below)
        ("raise ImportError('libfoo.so: cannot open\\n\\nsee its docs')\n", "ImportError: libfoo.so: cannot open"),
        ("raise ImportError\n", "ImportError"),
        # a sys.exit() at its top level (a script's guard for a missing licence or GPU): each rank's
        # traceback of SystemExit, or a worker ended with its status and no word of why
        ("import sys\nsys.exit('needs a licence')\n", "SystemExit: needs a licence"),
        ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
    ],
)
def test_a_users_loaders_module_that_a_worker_cannot_import_is_one_line(
    users_module, tmp_path, monkeypatch, caplog, source, cause
):
    # each rank's traceback of "unknown loader 'theirs'": the launcher's CLI says one line, from the
    # workers' report (launch._reported), naming the loader, its module and why it failed
    from moco_fast.launch import USER_ERROR_EXIT, _reported, _train_worker

    users = tmp_path / "users" / f"{users_module}.py"
    if source is None:
        users.unlink()
    else:
        users.write_text(source)
    monkeypatch.delenv("RANK", raising=False)
    cfg = with_module(one_epoch_with_mine(tmp_path / "run", "theirs"), users_module)
    reports = tmp_path / "reports"
    reports.mkdir()
    hold = types.SimpleNamespace(taken=contextlib.nullcontext)
    with pytest.raises(SystemExit) as e:
        _reported(_train_worker, str(reports), None, cfg, hold, logging.getLogger("moco_fast").level)
    assert e.value.code == USER_ERROR_EXIT
    line = (
        f"loader 'theirs': its module {users_module} (data.loader_module), which registers it, cannot be imported "
        f"in a --gpus worker: {cause}"
    )
    assert [(p.name, p.read_text()) for p in reports.iterdir()] == [("0", line)]
    # the cause stays chained, and its traceback is a DEBUG line (--verbose)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, "moco_fast"), pytest.raises(ConfigError) as e:
        import_loader_module("theirs", users_module)
    assert str(e.value) == line and type(e.value.__cause__).__name__ == cause.partition(":")[0]
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [type(e.value.__cause__)]


def test_a_users_loaders_module_that_does_not_register_it_when_imported_is_one_line(users_module, tmp_path):
    # its @register_loader under `if __name__ == "__main__":`: the import registered nothing, and the
    # worker went on to "unknown loader 'theirs'", which named no module
    (tmp_path / "users" / f"{users_module}.py").write_text(
        f'if __name__ == "__main__":\n{USERS_MODULE}'.replace("\n", "\n    ")
    )
    with pytest.raises(ConfigError) as e:
        import_loader_module("theirs", users_module)
    assert str(e.value) == (
        f"loader 'theirs': a --gpus worker imported its module {users_module} (data.loader_module), which did not "
        "register it: register it at a script's top level or in an importable module"
    )


def test_a_library_function_registered_in_the_users_module_records_that_module(registry, tmp_path, monkeypatch):
    # registered_by named the loader function's module: a function imported from a library and
    # registered in the user's module recorded the library, whose import in a --gpus worker registers
    # nothing ("... which did not register it")
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / "library_of_loaders.py").write_text(
        "from moco_fast.loaders import create_loader\n\n\ndef their_loader(args):\n"
        '    return create_loader("synthetic", args)\n'
    )
    (libs / "users_registrations.py").write_text(
        "from library_of_loaders import their_loader\nfrom moco_fast.loaders import register_loader\n\n"
        'register_loader("libs")(their_loader)\n'
    )
    monkeypatch.syspath_prepend(str(libs))
    try:
        import users_registrations  # noqa: F401

        assert registered_by("libs") == "users_registrations"
        # a worker, a new process, imports it and has the loader
        _LOADERS.pop("libs")
        del sys.modules["users_registrations"]
        import_loader_module("libs", "users_registrations")
        assert "libs" in available_loaders()
    finally:
        for name in ("library_of_loaders", "users_registrations"):
            sys.modules.pop(name, None)


def mp_mains_loader(args):
    """Loader "mine" as a spawned worker has it where the launcher's script registered it at its top level."""
    return create_loader("synthetic", args)


def registered_in(module: str, name: str, fn) -> None:
    """register_loader(name)(fn), run at the top level of a module named `module` (__main__; __mp_main__,
    the name a spawned process gives its launcher's script): the module that registers it."""
    exec("register_loader(name)(fn)", {"__name__": module, "register_loader": register_loader, "name": name, "fn": fn})


def test_a_users_loader_registered_in_main_trains_in_a_worker_only_from_a_scripts_top_level(registry, tmp_path):
    # a spawned worker runs its launcher's script's top level as __mp_main__: a loader registered there
    # is the worker's, and it records __main__, as the launcher did (it recorded __mp_main__); one
    # registered elsewhere in __main__ (a notebook, python -c, `if __name__ == "__main__":`, a package's
    # __main__.py run by `python -m PKG`, of which multiprocessing runs nothing in a spawned worker) is
    # not, and no worker can import __main__ by name: one line that says where to register it
    cfg = with_module(one_epoch_with_mine(tmp_path / "run", "mine"), "__main__")
    with pytest.raises(ConfigError) as e:
        as_a_worker(cfg)
    assert str(e.value) == (
        "loader 'mine' was registered in __main__ (a notebook, a REPL, python -c, a package's __main__.py run by "
        "python -m, or a script's `if __name__ == '__main__':` block or function), which a --gpus worker cannot "
        "import: register it at a script's top level or in an importable module"
    )
    registered_in("__mp_main__", "mine", mp_mains_loader)
    assert registered_by("mine") == "__main__"
    as_a_worker(cfg)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["loader_module"] == "__main__"


@pytest.mark.parametrize(
    "spec_name, file, said",
    [
        (None, None, "python -c, a REPL or a notebook (no script), of whose code"),
        (
            "tools.__main__",
            "/x/tools/__main__.py",
            "tools.__main__, a package's __main__.py run by python -m, of which",
        ),
        (None, "/x/users_script.py", None),  # a script: the workers run its top level
        ("users_script", "/x/users_script.py", None),  # python -m users_script: the workers run it again
    ],
)
def test_a_loader_registered_in_a_main_that_the_gpus_workers_do_not_run_is_refused_before_they_start(
    registry, tmp_path, monkeypatch, capsys, spec_name, file, said
):
    # each worker was spawned, refused the loader (import_loader_module) and ended; the launcher, which
    # knows from __main__ whether spawn runs any of it in a worker, says it once. 2 pretend GPUs
    import importlib.machinery

    import torch

    from moco_fast import launch
    from moco_fast.cli import main

    fake_main = types.ModuleType("__main__")
    fake_main.__spec__ = None if spec_name is None else importlib.machinery.ModuleSpec(spec_name, None)
    if file is not None:
        fake_main.__file__ = file
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    registered_in("__main__", "mine", mp_mains_loader)
    started = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(launch, "run_workers", lambda fn, args, n, where=None: started.append(n) or [{}])
    argv = ["train", "--loader", "mine", "--arch", "resnet18", "--image-size", "16", "--dim", "16", "--batch-size"]
    argv += ["8", "--moco-k", "32", "--epochs", "1", "--workers", "0", "--no-final-knn", "--out", str(tmp_path / "r")]
    rc = main([*argv, "--device", "auto", "--gpus", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    if said is None:
        assert (rc, started) == (0, [2])
        return
    assert (rc, started) == (2, [])
    assert err[-1] == (
        f"moco-fast train: error: loader 'mine' was registered in __main__ ({said} a --gpus worker runs nothing): "
        "register it at a script's top level or in an importable module"
    )


def test_a_resume_of_a_run_whose_loader_main_registered_says_where_its_workers_find_it(
    registry, tmp_path, capsys, monkeypatch
):
    # a --gpus resume's workers cannot import __main__: registering the loader again in a notebook or
    # python -c, as it said, failed in every worker
    from moco_fast.cli import main

    def in_main(args):
        return create_loader("synthetic", args)

    registered_in("__main__", "mine", in_main)
    out = tmp_path / "run"
    train(one_epoch_with_mine(out))
    _LOADERS.pop("mine")
    argv = ["train", "--resume", "--out", str(out)]
    assert main(argv) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "Resume it from Python: run its @register_loader again there (it was in a script or notebook: __main__),"
        in said
    )
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the GPUs the line asks for (else refused first)
    assert main([*argv, "--gpus", "2"]) == 2  # a run of the CPU's: its line asks for --device cuda too
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith(
            "Resume it from Python: register it again at a script's top level or in an importable module (--gpus's "
            f"workers import it), then `moco_fast.cli.main({[*argv, '--device', 'cuda', '--gpus', '2']!r})`"
        )
    )


# A user's script that registers loader "mine" at its top level and trains with --gpus 2 (pretend GPUs:
# the workers train on the CPU).
USERS_SCRIPT = """
import sys

import torch

torch.cuda.device_count = lambda: 2
from moco_fast.cli import main
from moco_fast.loaders import create_loader, register_loader


@register_loader("mine")
def mine(args):
    return create_loader("synthetic", args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # ~10 s: 2 spawned workers
def test_gpus_workers_train_with_a_loader_their_launchers_script_registers_at_its_top_level(tmp_path):
    # the workers, spawned, run the script's top level as __mp_main__: rank 0 recorded that module,
    # which is no module's name, where the launcher recorded __main__
    import os
    import subprocess

    from distributed_helpers import synthetic_args

    script = tmp_path / "users_script.py"
    script.write_text(USERS_SCRIPT)
    out = tmp_path / "run"
    args = [*synthetic_args(out), "--loader", "mine", "--device", "auto", "--gpus", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["data"]["loader_module"] == "__main__"


@pytest.mark.slow  # ~10 s: 2 spawned workers
def test_gpus_workers_import_the_users_loaders_module_that_python_c_imported(tmp_path):
    # python -c, as a notebook: the workers run none of the launcher's code, and import the module that
    # registered the loader, found on the launcher's sys.path (which a spawned worker starts with)
    import os
    import subprocess

    from distributed_helpers import synthetic_args

    users = tmp_path / "users"
    users.mkdir()
    (users / "users_loaders_for_workers.py").write_text(USERS_MODULE)
    code = f"import sys; sys.path.insert(0, {str(users)!r}); import users_loaders_for_workers; import torch; "
    code += "torch.cuda.device_count = lambda: 2; from moco_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "run"
    args = [*synthetic_args(out), "--loader", "theirs", "--device", "auto", "--gpus", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["data"]["loader_module"] == "users_loaders_for_workers"
