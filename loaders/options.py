"""Each backend's `--loader-option KEY=VALUE` settings, as a dataclass parsed and checked here.

This module imports neither torch nor a backend's library (DALI, FFCV), so that `train
--print-config` refuses what the run's loader would refuse on any machine, without building it.
Each backend's module docstring documents its options."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from moco_fast.config import ConfigError, check_at_least
from moco_fast.cores import workers_refused

T = TypeVar("T")

# a boolean option's spellings, true then false
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes"), ("0", "false", "no")


def parse_options(cls: type[T], options: dict[str, str], backend: str) -> T:
    """`--loader-option KEY=VALUE` strings -> a backend's options dataclass. Each value is parsed as
    the type of its field's default (bool accepts 1/0, true/false, yes/no, in any case); unknown keys and bad
    values are one-line errors. The backend checks ranges itself."""
    known = {f.name for f in fields(cls)}
    defaults = cls()
    values = {}
    for key, raw in options.items():
        if key not in known:
            if not known:
                raise ConfigError(f"the {backend} loader takes no --loader-option (got {key}={raw})")
            raise ConfigError(f"unknown {backend} loader option {key!r}; known: {', '.join(sorted(known))}")
        kind = type(getattr(defaults, key))
        if kind is bool:
            # as the other options' checks read: each spelling it takes (os_cache=2 said "expected a bool")
            if raw.lower() not in TRUE_WORDS + FALSE_WORDS:
                on, off = ", ".join(TRUE_WORDS), ", ".join(FALSE_WORDS)
                raise ConfigError(f"{backend} loader option {key} must be one of {on} (on) or {off} (off), got {raw!r}")
            values[key] = raw.lower() in TRUE_WORDS
            continue
        try:
            values[key] = kind(raw)
        except ValueError:
            raise ConfigError(
                f"{backend} loader option {key}={raw!r}: expected {'an' if kind is int else 'a'} {kind.__name__}"
            ) from None
    return cls(**values)


def option_flags(given: list[str]) -> dict[str, str]:
    """`--loader-option KEY=VALUE` flags (train's, bench/throughput.py's) -> {KEY: VALUE}. A key given
    twice with different values is refused (`threads=2 ... threads=4` took the last without a word);
    the same value again is taken (nothing is lost)."""
    options: dict[str, str] = {}
    for opt in given:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise ConfigError(f"--loader-option expects KEY=VALUE, got {opt!r}")
        if options.get(key, value) != value:
            raise ConfigError(
                f"--loader-option {key} is given twice ({key}={options[key]}, {key}={value}): give it once"
            )
        options[key] = value
    return options


@dataclass(frozen=True)
class NoOptions:
    """The options of a backend that has none: any --loader-option is an error, not ignored."""


@dataclass(frozen=True)
class DaliOptions:
    hw_decoder_load: float = 0.9
    threads: int = 0  # 0: the resolved --workers
    prefetch: int = 2
    decoder: str = "auto"
    shuffle_buffer: int = 1024

    @classmethod
    def parse(cls, options: dict[str, str]) -> DaliOptions:
        o = parse_options(cls, options, "DALI")
        # each names the value given, as ffcv's and resident's do ("decoder must be auto, mixed or cpu"
        # left `decoder=CPU` to be spotted; "threads must be >= 0, prefetch and shuffle_buffer >= 1"
        # named three options for one)
        if not 0 <= o.hw_decoder_load <= 1:
            raise ConfigError(f"DALI loader option hw_decoder_load must be within 0-1, got {o.hw_decoder_load:g}")
        if o.decoder not in ("auto", "mixed", "cpu"):
            raise ConfigError(f"DALI loader option decoder must be auto, mixed or cpu, got {o.decoder!r}")
        if o.threads < 0:
            raise ConfigError(
                f"DALI loader option threads must be 0 (the resolved --workers) or a count, got {o.threads}"
            )
        check_at_least("DALI loader option prefetch", o.prefetch, 1)
        # prefetch=10**9 went on to DALI, which allocates a buffer set per batch of its queue: as ffcv's
        # batches_ahead, a fixed bound (the memory depends on the images and the processes)
        if o.prefetch > MAX_BATCHES_AHEAD:
            raise ConfigError(
                f"DALI loader option prefetch must be at most {MAX_BATCHES_AHEAD} (got {o.prefetch}): "
                "each holds a batch's buffers in memory (default 2)"
            )
        check_at_least("DALI loader option shuffle_buffer", o.shuffle_buffer, 1)
        # threads=1000000 was taken, where --workers past WORKERS_PER_CORE a core is refused: DALI
        # starts them all. Bounded for one process here (no process count known); the run checks it
        # again for this machine's processes (trainer.check_workers), as --workers
        o.check_threads(1)
        return o

    def check_threads(self, processes: int) -> None:
        """A ConfigError where `threads` passes each of this machine's `processes` processes' share of
        WORKERS_PER_CORE a core (each starts its own)."""
        why = workers_refused(
            self.threads,
            processes,
            "0: the resolved --workers",
            "DALI threads a core only compete with each other and the step for them",
            flag="--loader-option threads",
        )
        if why is not None:
            raise ConfigError(why)

    def check_device(self, gpu: bool) -> None:
        if self.decoder == "mixed" and not gpu:
            raise ConfigError("--loader-option decoder=mixed needs a CUDA device")


# ffcv's batches_ahead, at most: FFCV holds the decode buffers of batches_ahead + 2 batches
MAX_BATCHES_AHEAD = 32
# each backend's option that MAX_BATCHES_AHEAD bounds: a run saved with more (before the bound) is
# resumed with MAX_BATCHES_AHEAD in its place (replaced_options names the --loader-option)
BATCHES_AHEAD = {"dali": "prefetch", "ffcv": "batches_ahead"}


@dataclass
class FFCVOptions:
    os_cache: bool = True
    batches_ahead: int = 3
    jitter_order: str = "sample"
    decode: str = "once"

    @classmethod
    def parse(cls, options: dict[str, str]) -> FFCVOptions:
        out = parse_options(cls, options, "ffcv")
        if out.jitter_order not in ("sample", "batch"):
            raise ConfigError(f"ffcv loader option jitter_order must be sample or batch, got {out.jitter_order!r}")
        if out.decode not in ("once", "twice"):
            raise ConfigError(f"ffcv loader option decode must be once or twice, got {out.decode!r}")
        check_at_least("ffcv loader option batches_ahead", out.batches_ahead, 1)
        # batches_ahead=10**9 went on to FFCV, which sizes its buffers for batches_ahead + 2 batches at
        # once: a traceback (an array too large) or the OOM killer, not a line. Batches prepared ahead
        # only absorb the jitter of the decode; FFCV's recipes use 3
        if out.batches_ahead > MAX_BATCHES_AHEAD:
            raise ConfigError(
                f"ffcv loader option batches_ahead must be at most {MAX_BATCHES_AHEAD} (got {out.batches_ahead}): "
                "each holds a batch's decode buffers in memory (default 3)"
            )
        return out


@dataclass(frozen=True)
class ResidentOptions:
    size: int = 0
    jitter_order: str = "sample"
    memory_fraction: float = 0.5

    @classmethod
    def parse(cls, options: dict[str, str]) -> ResidentOptions:
        o = parse_options(cls, options, "resident")
        if o.size < 0:
            raise ConfigError("resident loader option size must be 0 (automatic) or a side in pixels")
        if o.jitter_order not in ("sample", "batch"):
            raise ConfigError(f"resident loader option jitter_order must be sample or batch, got {o.jitter_order!r}")
        if not 0 < o.memory_fraction <= 1:
            raise ConfigError("resident loader option memory_fraction must be within (0, 1]")
        return o


# each built-in backend's options parser (loaders._MODULES names the same backends)
PARSERS = {
    "dali": DaliOptions.parse,
    "ffcv": FFCVOptions.parse,
    "resident": ResidentOptions.parse,
    "torch": lambda o: parse_options(NoOptions, o, "torch"),
    "synthetic": lambda o: parse_options(NoOptions, o, "synthetic"),
}


def parse_loader_options(name: str, options: dict[str, str]) -> Any:
    """Backend `name`'s `--loader-option` values, parsed and checked (its options dataclass). Its loader
    is built with what this returns and check_loader refuses what this refuses: one table, so that
    `train --print-config` cannot refuse an option that a backend came to take."""
    return PARSERS[name](options)


def check_loader_options(name: str, options: dict[str, str], cpu: bool = False) -> Any:
    """ConfigError for what backend `name` (a registered one: loaders.check_loader) would refuse in
    `options` (on the CPU where `cpu`), as its loader does when it is built; else the options parsed
    (parse_loader_options), which the run's later checks read (trainer.check_workers). None for a loader
    registered by a library user (register_loader), which reads its LoaderArgs.options itself, when it
    is built."""
    if name not in PARSERS:
        return None
    parsed = parse_loader_options(name, options)
    if isinstance(parsed, DaliOptions):
        parsed.check_device(gpu=not cpu)
    return parsed


def replaced_options(
    name: str, options: dict[str, str], given: dict[str, str], cpu: bool = False
) -> list[tuple[str, str, str, str]]:
    """A resumed run's saved options (in `options`, not replaced by one `given` now) that today's checks
    of backend `name` refuse (on the CPU where `cpu`: DALI's decoder=mixed), each as (key, its saved
    value, a value they take, their refusal): a `batches_ahead=64` saved before MAX_BATCHES_AHEAD bounded
    it (MAX_BATCHES_AHEAD then), else the option's default. All of them: naming the first alone, the
    line that continued the run met the second. None ([]): none is refused, or one is that no value
    replaces (an option the backend lacks)."""
    replaced = []
    for key, raw in options.items():
        if key in given:
            continue
        try:
            check_loader_options(name, {key: raw}, cpu)
        except ConfigError as e:
            if key == BATCHES_AHEAD.get(name) and raw.strip().isdigit() and int(raw) > MAX_BATCHES_AHEAD:
                value = str(MAX_BATCHES_AHEAD)  # past the bound: at most it (prefetch=0: the default)
            elif key in (default := asdict(parse_loader_options(name, {}))):
                value = ("1" if default[key] else "0") if isinstance(default[key], bool) else str(default[key])
            else:
                return []
            replaced.append((key, raw, value, str(e)))
    return replaced  # (each checked alone: no check of these options reads another)


def option_values(name: str, options: dict[str, str]) -> dict[str, Any]:
    """Backend `name`'s `options` as the values its loader reads, each one left out at its default: what
    a resumed run compares (resume.warn_changed), where `threads=02` is `threads=2` and `threads=0` given
    is none given. A value refused (a saved one past today's bound), an option the backend lacks and those of
    a loader registered by a library user stay as text."""
    if name not in PARSERS:
        return dict(options)
    values = asdict(parse_loader_options(name, {}))
    for key, raw in options.items():
        try:
            values[key] = getattr(parse_loader_options(name, {key: raw}), key)
        except ConfigError:
            values[key] = raw
    return values
