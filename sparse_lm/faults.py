"""Fault injection for recovery tests: `SPARSE_LM_FAULTS="nan_loss@5-7,kill_in_save@12,kill_rank1@3"`.

The guarantees that matter most for week-long runs — a non-finite step is skipped, a run killed
mid-save resumes exactly — can only be shown by causing those faults in a real training process.
This variable is the one way to do that; unset (always, outside tests) every check is a set lookup.

* `nan_loss@A-B` — the training loss of steps A..B (1-based, inclusive) becomes NaN on every rank.
* `kill_in_save@S` — the process SIGKILLs itself while saving step S, after writing its shards
  into the temporary directory and before the checkpoint is published.
* `disk_full_in_save@S` — writing step S's checkpoint fails as a full disk would (ENOSPC), after
  the model shard is written.
* `kill_rankR@S` — rank R SIGKILLs itself as step S starts (the others must not hang).
* `stall_rankR@S` — rank R stops responding (sleeps, alive) as step S starts: the others must
  give up within `parallel.timeout_s`.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import time

from sparse_lm.errors import UserError

ENV = "SPARSE_LM_FAULTS"


@functools.lru_cache(maxsize=1)
def _faults() -> dict[str, set[int]]:
    faults: dict[str, set[int]] = {"nan_loss": set(), "kill_in_save": set(), "disk_full_in_save": set(),
                                   "kill_rank": set(), "stall_rank": set()}
    for item in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        name, _, steps = item.partition("@")
        first, _, last = steps.partition("-")
        for per_rank in ("kill_rank", "stall_rank"):
            if name.startswith(per_rank) and name[len(per_rank):].isdigit():
                if name[len(per_rank):] != os.environ.get("RANK", "0"):
                    name = ""  # another rank's fault
                    break
                name = per_rank
        if not name:
            continue
        if name not in faults or not first.isdigit() or (last and not last.isdigit()):
            raise UserError(f"{ENV}: expected items like nan_loss@5-7, kill_in_save@12, kill_rank1@3 or "
                            f"stall_rank1@3, got {item!r}")
        faults[name].update(range(int(first), int(last or first) + 1))
    return faults


def nan_loss(step: int) -> bool:
    return step in _faults()["nan_loss"]


def maybe_kill_in_save(step: int) -> None:
    if step in _faults()["kill_in_save"]:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_fill_disk_in_save(step: int, where) -> None:
    if step in _faults()["disk_full_in_save"]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))


def maybe_fail_rank(step: int) -> None:
    if step in _faults()["kill_rank"]:
        os.kill(os.getpid(), signal.SIGKILL)
    if step in _faults()["stall_rank"]:
        while True:
            time.sleep(3600)
