"""Run a function on N real gloo ranks from inside a pytest test (no mocks, no launcher).

    from tests.distributed import run_distributed

    def _body(rank, world_size, n):          # module level, so spawned children can import it
        ...                                  # torch.distributed is initialised (gloo) here
        return something_picklable

    def test_it():
        results = run_distributed(_body, 4, 1000)   # one result per rank, in rank order

Each rank is a fresh `spawn`ed process (a fork would inherit pytest's threads and torch state),
with the usual rendezvous env (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) and one OpenMP
thread, so four ranks do not fight over a two-core CI machine. A rank that raises makes the
parent raise the same exception (when it pickles) chained to that rank's traceback text; the
other ranks, likely stuck in a collective, are killed. A run past `timeout` kills every rank.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

__all__ = ["RankError", "run_distributed"]

_CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
_ATTEMPTS = 3  # launches tried when the rendezvous port turns out to be taken
_GRACE_S = 2.0  # after a first failure, how long the other ranks may take to report theirs


class RankError(RuntimeError):
    """A rank failed in a way that cannot be re-raised as its own exception (or died silently)."""


class _RemoteTraceback(Exception):
    """Carries a child's formatted traceback as the `__cause__` of the re-raised exception."""

    def __str__(self) -> str:
        return self.args[0]


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120, **kwargs: Any) -> list:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` gloo ranks; results in rank order.

    `fn`, the arguments and the results must pickle (`fn` defined at module level). The process
    group is the default (world) group, created before `fn` runs and destroyed after it.
    """
    for attempt in range(_ATTEMPTS):
        try:
            return _launch(fn, world_size, args, kwargs, timeout)
        except Exception as exc:
            # The free port can be taken between our probe and rank 0 binding it: try another.
            if attempt + 1 == _ATTEMPTS or "address already in use" not in str(exc.__cause__ or exc).lower():
                raise
    raise AssertionError("unreachable")


def _launch(fn: Callable[..., Any], world_size: int, args: tuple, kwargs: dict, timeout: float) -> list:
    ctx = mp.get_context("spawn")
    results: queue.Queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, rank, world_size, port, timeout, args, kwargs, results))
        for rank in range(world_size)
    ]
    try:
        saved = {name: os.environ.get(name) for name in _CHILD_ENV}
        os.environ.update(_CHILD_ENV)  # spawned children copy the parent's environment at start()
        try:
            for proc in procs:
                proc.start()  # pickles fn and the arguments: a lambda fails here, in the parent
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        return _collect(procs, results, world_size, timeout)
    finally:
        started = [proc for proc in procs if proc.pid is not None]
        for proc in started:
            if proc.is_alive():
                proc.kill()
        for proc in started:
            proc.join(5)
        results.close()


def _collect(procs: list, results: queue.Queue, world_size: int, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    done: dict[int, tuple[str, Any, str]] = {}
    first_failure: float | None = None
    while len(done) < world_size:
        now = time.monotonic()
        if first_failure is not None and now - first_failure > _GRACE_S:
            break
        if now > deadline:
            missing = [rank for rank in range(world_size) if rank not in done]
            raise TimeoutError(
                f"run_distributed: rank(s) {missing} of {world_size} still running after {timeout:g} s "
                "(a collective waiting on a rank that never joined?); all ranks killed"
            )
        try:
            rank, status, payload, text = results.get(timeout=0.1)
        except queue.Empty:
            for rank, proc in enumerate(procs):
                if rank not in done and proc.exitcode is not None and proc.exitcode != 0 and _empty(results):
                    done[rank] = ("died", None, f"rank {rank} exited with code {proc.exitcode} without reporting")
                    first_failure = first_failure or time.monotonic()
            continue
        done[rank] = (status, payload, text)
        if status != "ok" and first_failure is None:
            first_failure = time.monotonic()
    failures = [(rank, report) for rank, report in done.items() if report[0] != "ok"]  # in order of arrival
    failures.sort(key=lambda failure: failure[1][0] != "died")  # a crashed rank explains its peers' errors
    if failures:
        _raise(failures, world_size)
    return [pickle.loads(done[rank][1]) for rank in range(world_size)]


def _empty(results: queue.Queue) -> bool:
    """A rank that exited may still have its report in the pipe; give it a moment."""
    time.sleep(0.2)
    return results.empty()


def _raise(failures: list, world_size: int) -> None:
    """Re-raise the first failure: a rank that died, else the first report to arrive (the others
    are usually peers whose collective broke when it left); every failing rank's text goes in
    the cause."""
    text = "\n".join(f"--- rank {rank} of {world_size} ---\n{tb}" for rank, (_, _, tb) in failures)
    rank, (status, payload, _) = failures[0]
    exc = None
    if status == "raised" and payload is not None:
        try:
            exc = pickle.loads(payload)
        except Exception:  # noqa: BLE001 — an exception type that does not round-trip
            exc = None
    if isinstance(exc, BaseException):
        exc.add_note(f"(raised on rank {rank} of {world_size} in run_distributed; see the remote traceback above)")
        raise exc from _RemoteTraceback(text)
    raise RankError(f"rank {rank} of {world_size} failed:\n{text}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(fn, rank, world_size, port, timeout, args, kwargs, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        report = ("ok", pickle.dumps(fn(rank, world_size, *args, **kwargs)), "")
    except BaseException as exc:  # noqa: BLE001 — everything goes back to the parent
        try:
            payload = pickle.dumps(exc)
        except Exception:  # noqa: BLE001 — unpicklable: the traceback text still goes back
            payload = None
        report = ("raised", payload, traceback.format_exc())
    results.put((rank, *report))  # report first: the parent must not wait on our teardown
    if dist.is_initialized():
        dist.destroy_process_group()
