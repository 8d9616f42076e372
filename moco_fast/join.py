"""Joining the process group that torchrun, `--gpus N` or a manual env:// launch describes in the
environment, with a join timeout of its own and one line naming what to check when it fails."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

import moco_fast

# How long a collective may wait for the slowest rank. Rank 0 alone runs the kNN monitor while the
# others wait at a barrier, which can take longer than the 10-minute NCCL default on large sets. A
# rank that dies does not wait this long: torchrun / `--gpus` end the job as soon as a worker exits.
COLLECTIVE_TIMEOUT = timedelta(hours=1)

# How long the processes of a launch wait for each other to join the process group. A manual env://
# launch (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by hand or by a scheduler) whose peer never
# comes, or comes to another address, would otherwise wait COLLECTIVE_TIMEOUT, an hour, without a
# word: torch's join uses the collectives' timeout. Overridden by JOIN_TIMEOUT_ENV (seconds).
# torchrun's and --gpus's workers join at once: their launcher gathered them first.
JOIN_TIMEOUT = timedelta(minutes=10)
JOIN_TIMEOUT_ENV = "MOCO_FAST_JOIN_TIMEOUT"

# How often a rank > 0 of a manual launch knocks at rank 0's address while it waits for it
# (wait_for_rank_0): rank 0's store is found at most this long after it starts.
KNOCK_INTERVAL = 0.5

log = logging.getLogger("moco_fast")


def describes_group() -> bool:
    """RANK and WORLD_SIZE are both set: init_from_env joins a group (a WORLD_SIZE alone, as some
    shells and schedulers export, starts none: the run is one process)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_world_size() -> int:
    """The processes of the group init_from_env would join: WORLD_SIZE where describes_group(), else 1
    (also for a WORLD_SIZE that is not a number, which init_from_env refuses when the run starts)."""
    world = os.environ.get("WORLD_SIZE", "")
    return int(world) if describes_group() and world.strip().isdigit() else 1


def init_from_env(device: str = "auto") -> bool:
    """Join the process group that torchrun (or `--gpus N`) described in the environment, if any.

    Returns True when this call created the group (the caller then owns `destroy()`). The join waits
    at most join_timeout(); the group's collectives then wait COLLECTIVE_TIMEOUT.
    """
    if not describes_group() or dist.is_initialized():
        return False
    from moco_fast.config import ConfigError

    rank, world, addr, port = check_group_env()
    timeout = join_timeout()
    manual = not moco_fast.launched_by_torchrun()  # torchrun's and --gpus's workers: gathered already
    if not manual:  # before the join: a launcher gone by then stops its worker now, not at the join's timeout
        stop_with_the_launcher(moco_fast.STARTED_BY)  # read now: a forked process records its own
    if manual and rank == "0":  # it may wait a while
        log.info("waiting for WORLD_SIZE=%s processes to join at %s:%s (at most %s)", world, addr, port, _span(timeout))
    left = timeout
    if manual and rank != "0":
        started = time.monotonic()
        if (why := wait_for_rank_0(addr, int(port), timeout)) is not None:
            raise ConfigError(join_failed("", rank, world, addr, port, timeout, why))
        # rank 0 is up: the rest of the join (the other ranks) within what is left
        left = max(timeout - timedelta(seconds=time.monotonic() - started), timedelta(seconds=1))
    try:
        # torch's own join (init_process_group's env:// rendezvous), with a timeout of its own
        store, _, _ = next(dist.rendezvous("env://", timeout=left))
    except dist.DistError as e:
        raise ConfigError(join_failed(str(e), rank, world, addr, port, timeout)) from None
    store.set_timeout(COLLECTIVE_TIMEOUT)
    backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
    dist.init_process_group(
        backend,
        store=dist.PrefixStore("default_pg", store),  # as init_process_group wraps the store it makes
        rank=int(rank),
        world_size=int(world),
        timeout=COLLECTIVE_TIMEOUT,
    )
    return True


# prctl(2)'s options (linux/prctl.h) for the parent-death signal
PR_SET_PDEATHSIG, PR_GET_PDEATHSIG = 1, 2


def _prctl():
    """libc's prctl(2) (Linux)."""
    import ctypes

    return ctypes.CDLL(None).prctl


def stop_with_the_launcher(launcher: int) -> None:
    """A SIGTERM to this process when its parent ends: a torchrun worker stops (its step saved, as on
    `kill`) when torchrun is killed without warning (SIGKILL), instead of training on to its last
    epoch, an orphan holding the run folder (torchrun starts its workers in sessions of their own,
    with no such signal). A `--gpus` worker had SIGINT for it until here (torch's spawn): one stop.
    PR_SET_PDEATHSIG fires when the thread that started the process ends: the launcher's main thread.
    It fires on an end after it is set only: `launcher`, the parent this process had before (moco_fast.STARTED_BY),
    gone by then, sends the same SIGTERM now. Set for the training alone: trainer.train puts back what
    was before as it returns or raises (parent_death_signal_kept)."""
    if sys.platform.startswith("linux"):
        _prctl()(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != launcher:  # the launcher ended before (this process was handed to another)
            os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def parent_death_signal_kept() -> Iterator[None]:
    """The parent-death signal of this process as it was (none, but for a caller's own), put back on the
    way out of a train() whose init_from_env set it (stop_with_the_launcher): a script under torchrun
    that went on after its training (an evaluation, another run) kept it, and was SIGTERMed when
    torchrun ended, later. Linux only, as the signal."""
    if not sys.platform.startswith("linux"):
        yield
        return
    import ctypes

    before = ctypes.c_int()
    _prctl()(PR_GET_PDEATHSIG, ctypes.byref(before))
    try:
        yield
    finally:
        _prctl()(PR_SET_PDEATHSIG, before.value)


def check_group_env() -> tuple[str, str, str, str]:
    """(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) of the group the environment describes, or the
    ConfigError of what no join could mend: the run's check before it joins, and --print-config's
    (a config printed for an environment that the run refuses said "fine" to a run that stops)."""
    from moco_fast.config import ConfigError

    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(
            f"RANK and WORLD_SIZE are set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
            "a manual launch sets MASTER_ADDR and MASTER_PORT (rank 0's address and a free port) in every "
            "process; or start the processes with torchrun"
        )
    rank, world, addr, port = (os.environ[v] for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    numbers = "RANK, WORLD_SIZE and MASTER_PORT must be numbers"
    if not all(v.strip().isdigit() for v in (rank, world, port)):  # before a wait that would be in vain
        raise ConfigError(f"{numbers} (RANK={rank}, WORLD_SIZE={world}, MASTER_PORT={port})")
    # a RANK past the group (RANK=2 WORLD_SIZE=2) waited the join timeout for a rank 0 that nobody
    # started; WORLD_SIZE=0 and a MASTER_PORT past 65535 were "must be numbers" from torch's errors
    if not int(rank) < int(world):
        raise ConfigError(
            f"RANK={rank} with WORLD_SIZE={world}: the ranks of a group of WORLD_SIZE processes are 0 to "
            "WORLD_SIZE - 1; start each process with its own RANK and the same WORLD_SIZE (at least 1)"
        )
    # MASTER_PORT=0: rank 0's store takes any free port, which no other process can know (rank 1 waited
    # the join timeout and printed torch's C++ stack; rank 0 waited for it); one process needs none
    if int(port) > 65535 or (int(port) == 0 and int(world) > 1):
        raise ConfigError(f"MASTER_PORT={port} is not a port: give a free port of rank 0's machine (1 to 65535)")
    return rank, world, addr, port


def wait_for_rank_0(addr: str, port: int, timeout: timedelta) -> str | None:
    """Waits until rank 0's address accepts a connection (its store is up), at most `timeout`; None
    then, else why the last try failed ("Connection refused": nothing listens there yet).

    torch's client waits for it too, but each of its tries that fails logs a C++ error with its
    stack (47 lines above the one line for a join of two tries), and it tries again after a random
    delay: a join bounded at 3 s gave up after 8 s, at 30 s after 76 s. A plain socket waits in
    silence, for the timeout. Its connection, closed at once, is not a client that joined."""
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        try:
            # at most 5 s a try: an address that drops packets would hold one until the end
            left = deadline - time.monotonic()
            with socket.create_connection((addr, port), timeout=min(max(left, 0.1), 5.0)):
                return None
        except OSError as e:  # refused, unreachable, timed out, a name not known (yet: a pod's DNS entry)
            why = e.strerror or str(e) or type(e).__name__
        if (left := deadline - time.monotonic()) <= 0:
            return why
        time.sleep(min(KNOCK_INTERVAL, left))  # the last try at the deadline


def _span(t: timedelta) -> str:
    seconds = t.total_seconds()
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def join_timeout() -> timedelta:
    """JOIN_TIMEOUT, or the seconds that JOIN_TIMEOUT_ENV gives."""
    raw = os.environ.get(JOIN_TIMEOUT_ENV)
    if raw is None:
        return JOIN_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < math.inf:
        from moco_fast.config import ConfigError

        raise ConfigError(f"{JOIN_TIMEOUT_ENV}={raw}: give the seconds to wait for the processes to join")
    return timedelta(seconds=seconds)


def join_failed(
    cause: str, rank: str, world: str, addr: str, port: str, timeout: timedelta, why: str | None = None
) -> str:
    """The one line for a join that did not complete: how many joined where rank 0 knows, why rank 0
    could not be reached where known (wait_for_rank_0), and what to check.

    Rank 0 starts the store (its server socket) and then connects to it at MASTER_ADDR as a client,
    within the join timeout. Only the server's failure is the port's (taken, or not ours to take);
    the client's is the address's (not rank 0's machine) or the timeout's: a timeout too short for
    the connection (MOCO_FAST_JOIN_TIMEOUT=0.001) was blamed on MASTER_PORT. "Reach", not "connect":
    a client that connected may still wait past so short a timeout for its store's answer (torch's
    "wait timeout after 1ms, keys: init/")."""
    joined = re.search(r"(\d+)/(\d+) clients joined", cause)
    if rank == "0" and not joined:
        first = cause.splitlines()[0]
        if "server socket" in first:  # torch's "The server socket has failed to listen ..."
            return f"rank 0 could not listen at {addr}:{port} ({first}): choose a free MASTER_PORT"
        return (
            f"rank 0 could not reach its own store at {addr}:{port} within {_span(timeout)} ({first}): "
            f"set MASTER_ADDR to an address of rank 0's machine, or wait longer ({JOIN_TIMEOUT_ENV}=SECONDS)"
        )
    if joined:
        what = f"{joined[1]} of the {world} processes joined at {addr}:{port} within {_span(timeout)}"
    else:
        what = f"rank {rank} could not reach rank 0 at {addr}:{port} within {_span(timeout)}"
        what += f" ({why})" if why else ""
    return (
        f"{what}: start all {world} processes (RANK 0 to {int(world) - 1}) with the same WORLD_SIZE, "
        f"MASTER_ADDR and MASTER_PORT, check that every machine reaches rank 0's address and port, "
        f"or wait longer ({JOIN_TIMEOUT_ENV}=SECONDS)"
    )
