"""SIGTERM as an exception, so a stopped process says why in one line instead of vanishing.

The deepspeed launcher SIGTERMs every surviving rank (and SIGKILLs it 30 s later) as soon as one
exits with an error, often while the survivors are themselves noticing the dead peer and tearing
down their process groups; a scheduler does the same when a job is cancelled. Python's default
action ends the process without a word, so the guard spans the whole command *and* the printing
of its error: a SIGTERM that lands while a failure is being reported must not cut the report off.
"""

from __future__ import annotations

import signal
import threading


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so no `except Exception` on the way
    up swallows it."""


def stopped_by_sigterm(rank: int | str) -> str:
    """What a SIGTERM becomes in the one error line."""
    return (
        f"rank {rank}: stopped by SIGTERM, which the deepspeed launcher sends to every rank when one fails "
        "(another rank probably died or stalled; its own output says why) and a scheduler when the job is "
        "cancelled"
    )


class SigtermGuard:
    """While entered, the first SIGTERM raises `Terminated` in the main thread; later ones, and any
    after `quiet()`, do nothing (the launcher's SIGKILL still ends a process that truly hangs).
    Off the main thread, where Python cannot install handlers, it does nothing at all."""

    def __init__(self) -> None:
        self._armed = False
        self._previous = None

    def __enter__(self) -> SigtermGuard:
        if threading.current_thread() is threading.main_thread():
            self._armed = True
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def quiet(self) -> None:
        """The process is reporting a failure already: let a SIGTERM not interrupt it."""
        self._armed = False

    def _handler(self, signum, frame) -> None:
        if self._armed:
            self._armed = False
            raise Terminated()
