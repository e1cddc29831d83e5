"""Where every `sparse-lm convert` subcommand writes: a temporary sibling of `--to`, renamed into
place when complete (`atomic.publish_dir`), so an interrupted convert never leaves a half-written
output and a failed write is one line.

An existing non-empty `--to` is replaced only when it is an earlier output of the same subcommand
(its marker file is there), never a directory of something else, and never an import or re-shard
root that training has since added steps to.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from sparse_lm.errors import UserError


def _fsync_tree(root: Path) -> None:
    """publish_dir syncs the top level only; an import root also has a step directory."""
    from sparse_lm.atomic import fsync_dir, fsync_file

    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            fsync_file(path)
        elif path.is_dir():
            fsync_dir(path)


@contextlib.contextmanager
def staged_output(out: Path, marker: str, what: str) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block succeeds. `what` (import,
    re-shard, export) names the direction in messages; an earlier output's marker may record the
    step it wrote (`step`, default 0): any other step under `out` is training progress since."""
    from sparse_lm.atomic import publish_dir, staging_dir
    from sparse_lm.checkpoint.store import WRITE_ERRORS, step_dir_name

    if out.exists() and not out.is_dir():
        raise UserError(f"--to {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / marker).is_file():
            raise UserError(f"--to {out}: exists, is not empty and is not an earlier `sparse-lm convert` output "
                            f"(no {marker}); choose a new directory or remove it")
        try:
            written = step_dir_name(int(json.loads((out / marker).read_text()).get("step", 0)))
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
            raise UserError(f"--to {out}: {marker} is not the JSON an earlier `sparse-lm convert` wrote; "
                            "choose a new directory or remove it") from None
        later = sorted(p.name for p in out.rglob("step_*") if p.name != written)
        if later or (out / "metrics.jsonl").exists():
            raise UserError(f"--to {out}: holds training progress made after the {what} "
                            f"({later[-1] if later else 'metrics.jsonl'}); refusing to overwrite it")
    tmp = None
    try:
        tmp = staging_dir(out)
        yield tmp
        _fsync_tree(tmp)
        publish_dir(tmp, out)
    except WRITE_ERRORS as exc:  # full disk, quota, no permission: `out` is as it was (publish_dir)
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
        raise UserError(f"--to {out}: writing the {what} failed ({reason}); nothing there was changed") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
