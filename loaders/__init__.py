"""One loader registry. Every backend takes a `LoaderArgs` and yields `Batch`es: two augmented views
on the training device, in the trainer's dtype and memory format, plus labels and sample indices.

Backends register themselves with `@register_loader(name)`; `create_loader(name, args)` imports the
backend module on first use, so a missing optional dependency (DALI, FFCV) only matters when asked for.
A library user's `@register_loader("mine")` adds a loader that `create_loader` and `trainer.train`
(`data.loader = "mine"`) take in that Python process; the CLI, which runs none of the user's code,
knows the built-in ones only (a run trained with a user's loader records its module,
`data.loader_module`, which `train --resume` names). `--gpus N` run from Python (`moco_fast.cli.main`)
takes it where it is registered in an importable module or at a script's top level: the spawned workers
import that module (`import_loader_module`) or run that script's top level (not a package's `__main__.py`,
run by `python -m PKG`, of which they run nothing). A built-in name cannot be taken.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from typing import Any

from moco_fast.config import ConfigError

from .base import Batch, LoaderArgs, TrainLoader
from .options import check_loader_options

log = logging.getLogger("moco_fast")

_LOADERS: dict = {}
# Loader name -> the module whose code called register_loader for it (registered_by).
_REGISTRARS: dict[str, str | None] = {}
# Backend name -> module that registers it (imported lazily: DALI and FFCV are optional).
_MODULES = {
    "torch": ".torch_loader",
    "synthetic": ".synthetic",
    "dali": ".dali",
    "ffcv": ".ffcv",
    "resident": ".resident",
}

# Optional backends: what their extra installs.
_EXTRAS = {
    "dali": "NVIDIA DALI, nvidia-dali-cuda130",
    "ffcv": "FFCV and numba; FFCV builds against pkg-config, libopencv-dev and libturbojpeg0-dev",
}

# Backends that read an image folder (class subfolders, train/ and val/ or test/): the kNN monitor and
# the demo set work with them.
IMAGE_FOLDER_LOADERS = ("torch", "dali", "resident")


def register_loader(name: str):
    """Decorator: `fn(LoaderArgs) -> TrainLoader` is the loader `name`. A built-in name is refused
    (its module, imported on first use, would replace the user's loader or be replaced by it, as the
    order of imports fell); a name taken by another function too (one defined again under the same
    module and name, a reloaded module or a notebook cell run twice, replaces it). The module whose code
    registers it is recorded (registered_by), not the function's: a function imported from a library
    and registered in the user's module is registered by importing the user's module."""

    def named(fn) -> str:
        return f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', fn)}"

    def deco(fn):
        where = named(fn)
        if name in _MODULES and getattr(fn, "__module__", None) != importlib.util.resolve_name(
            _MODULES[name], __name__
        ):
            raise ValueError(
                f"register_loader({name!r}): {name} is a built-in loader; register {where} under another name"
            )
        held = _LOADERS.get(name)
        if held is not None and name not in _MODULES:
            was = named(held)
            if was != where:
                raise ValueError(
                    f"register_loader({name!r}): the name is {was}'s already; register {where} under another name"
                )
        _LOADERS[name] = fn
        # the frame that applied it: at a module's top level, the module whose import registers it again; in
        # a function, that function's module, whose import does not (a worker's import_loader_module says so)
        _REGISTRARS[name] = sys._getframe(1).f_globals.get("__name__")
        return fn

    return deco


def registered_by(name: str) -> str | None:
    """The module whose `register_loader` made loader `name`; None for a built-in one, or a name not
    registered. `__main__` for one registered at the top level of the script that started this process:
    a spawned `--gpus` worker imports that script as `__mp_main__`, and records what its launcher does."""
    module = None if name in _MODULES or name not in _LOADERS else _REGISTRARS.get(name)
    return "__main__" if module == "__mp_main__" else module


# where a --gpus worker, a new process, finds a user's loader: it runs the launching script's top level,
# and imports modules by name
_WHERE = "register it at a script's top level or in an importable module"


def check_main_reaches_workers(name: str, module: str | None) -> None:
    """In the --gpus launcher, before its workers are spawned: a ConfigError where loader `name` was
    registered in __main__ (`module`, registered_by's) and the workers run none of __main__'s code, as
    multiprocessing's spawn decides it: python -c, a REPL or a notebook (no __main__.__file__), a
    package's __main__.py (`python -m PKG`): said once here, where each worker's import_loader_module
    would say it only after all of them had started. A script's `if __name__ == "__main__":` block is
    not told apart here: its workers say it."""
    if module != "__main__" or name in _MODULES:
        return
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if spec_name is not None:  # python -m: spawn runs the module again, a package's __main__.py not
        if spec_name != "__main__" and not spec_name.endswith(".__main__"):
            return
        what = f"{spec_name}, a package's __main__.py run by python -m, of which"
    elif getattr(main, "__file__", None) is not None:  # a script: spawn runs its top level
        return
    else:
        what = "python -c, a REPL or a notebook (no script), of whose code"
    raise ConfigError(f"loader {name!r} was registered in __main__ ({what} a --gpus worker runs nothing): {_WHERE}")


def import_loader_module(name: str, module: str | None) -> None:
    """Registers loader `name` in this process, where it is not known, by importing `module`, the one that
    registered it where the run was configured (`data.loader_module`, registered_by's): a `--gpus` worker
    is spawned, and runs only what its launcher's script runs at its top level (imported as `__mp_main__`),
    not a REPL's, a notebook's, `python -c`'s or a function's registration, nor a package's `__main__.py`
    (`python -m PKG`: multiprocessing runs none of it in a spawned process). A ConfigError, one line, where
    that is `__main__` (which cannot be imported by name) or the module cannot be imported here (its error,
    a sys.exit() at its top level too, chained, its traceback a DEBUG line: --verbose) or does not
    register `name`."""
    if module is None or name in _MODULES or name in _LOADERS:
        return
    if module == "__main__":
        raise ConfigError(
            f"loader {name!r} was registered in __main__ (a notebook, a REPL, python -c, a package's __main__.py "
            f"run by python -m, or a script's `if __name__ == '__main__':` block or function), which a --gpus "
            f"worker cannot import: {_WHERE}"
        )
    try:
        importlib.import_module(module)
    except (Exception, SystemExit) as e:  # a module that calls sys.exit() at import too; not a Ctrl-C
        log.debug("importing %s, which registers loader %r", module, name, exc_info=True)
        said = str(e).strip().splitlines()  # its first line: the rest is in the traceback (--verbose)
        cause = f"{type(e).__name__}: {said[0]}" if said else type(e).__name__
        raise ConfigError(
            f"loader {name!r}: its module {module} (data.loader_module), which registers it, cannot be imported "
            f"in a --gpus worker: {cause}"
        ) from e
    if name not in _LOADERS:
        raise ConfigError(
            f"loader {name!r}: a --gpus worker imported its module {module} (data.loader_module), which did not "
            f"register it: {_WHERE}"
        )


def available_loaders() -> list[str]:
    """The built-in loaders' names and those registered in this process."""
    return sorted(set(_MODULES) | set(_LOADERS))


def check_loader(name: str, options: dict[str, str], cpu: bool = False) -> Any:
    """ConfigError for a --loader, or a --loader-option of it, that create_loader would refuse (on the
    CPU where `cpu`), without importing the backend (its library may be missing here: train --print-config).
    Returns the options parsed (options.check_loader_options: None for a user's loader)."""
    _check_name(name)
    return check_loader_options(name, options, cpu)


def unknown_loader(name: str) -> str:
    """What a loader name that no loader has is told: the names there are."""
    return f"unknown loader {name!r}; choose one of {available_loaders()}"


def _check_name(name: str) -> None:
    if name not in _MODULES and name not in _LOADERS:
        raise ConfigError(unknown_loader(name))


def create_loader(name: str, args: LoaderArgs) -> TrainLoader:
    _check_name(name)
    if name not in _LOADERS:
        try:
            importlib.import_module(_MODULES[name], __name__)  # FFCV's modules keep the thread counts
        except ModuleNotFoundError as e:
            if name not in _EXTRAS or (e.name or "").startswith("moco_fast"):
                raise
            raise ConfigError(
                f"--loader {name} needs the {e.name!r} module, which this Python lacks: "
                f"pip install 'moco-fast[{name}]' ({_EXTRAS[name]})"
            ) from e
    return _LOADERS[name](args)


__all__ = [
    "IMAGE_FOLDER_LOADERS",
    "Batch",
    "LoaderArgs",
    "TrainLoader",
    "available_loaders",
    "check_loader",
    "check_main_reaches_workers",
    "create_loader",
    "import_loader_module",
    "register_loader",
    "registered_by",
    "unknown_loader",
]
