"""Crash-safe file writes: write to a temporary name, fsync, rename.

A reader then sees either the old file or the complete new one, never a torn write. Used for
checkpoints, prepared data, converted models, metrics summaries and eval results alike. The
temporaries live beside their target: `.NAME.tmp-PID` for a file (`write_bytes`), `.tmp-NAME-PID`
for a directory (`staging_dir`). `to_json` writes standard JSON, here and in metrics.jsonl.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from sparse_lm.errors import UserError


def check_writable(path: str | Path, field: str, is_file: bool = False) -> None:
    """Fail at start-up, in one line, for an output that cannot be written — not at the first
    checkpoint hours in, nor after an evaluation. A directory is created and a file written in it;
    for an output file (`is_file`) that is done to its directory, and the file may not be one."""
    path = Path(path)
    folder = path.parent if is_file else path
    try:
        if is_file and path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{field} {path}: cannot write there ({exc.strerror or exc})") from None


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX needs the directory itself synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def write_bytes(path: str | Path, data: bytes) -> None:
    """A failed write (full disk) leaves `path` as it was and removes its temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_file():
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def to_json(obj: Any, **options: Any) -> str:
    """`json.dumps`, but standard JSON: a non-finite float (a held-out loss of nan, a word
    perplexity of inf) is written as null, since NaN and Infinity are Python's, not JSON's."""
    return json.dumps(_finite(obj), allow_nan=False, **options)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, to_json(obj, indent=2, sort_keys=True) + "\n")


def staging_name(final: Path, shared: bool = False) -> Path:
    """The hidden temporary name beside `final` (the same file system, so renaming it into place is
    atomic): `.tmp-NAME-PID`, or `.tmp-NAME` when `shared` — several processes (the ranks saving one
    checkpoint) then name it alike, and a writer killed mid-way leaves it for the next to remove."""
    return final.with_name(f".tmp-{final.name}" if shared else f".tmp-{final.name}-{os.getpid()}")


def staging_dir(final: Path, shared: bool = False) -> Path:
    """Create `staging_name(final, shared)` empty (a leftover under that name is removed), and
    `final`'s parent with it, for `publish_dir` to move into place once written."""
    stage = staging_name(final, shared)
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written, fsynced temporary directory to its final name.

    An existing `final` (e.g. a re-saved step) is moved aside to `.NAME.old-PID` first and deleted
    only after the new one is in place. Between the two renames `final` does not exist: a failed
    second rename moves the old one back, and a crash there leaves the old one aside, which
    `recover_dir` (called here and by readers of `final`) moves back.
    """
    for child in tmp.iterdir():
        if child.is_file():
            fsync_file(child)
    fsync_dir(tmp)
    recover_dir(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Put back a directory `publish_dir` moved aside when a crash kept its replacement from
    taking its place (`final` missing, `.NAME.old-PID` present)."""
    if final.exists():
        return
    aside = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if aside:
        os.replace(aside[-1], final)
        fsync_dir(final.parent)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
