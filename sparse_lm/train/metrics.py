"""Progress lines for people and JSONL metrics for machines, written by rank 0 only."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from sparse_lm.atomic import to_json, write_text
from sparse_lm.train.monitor import scalar_events


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def layer_densities(model) -> dict[str, float]:
    """Each sparse linear's forward density |A| / blocks, by canonical name (the shard's, for a
    tensor-parallel layer), as this rank holds them."""
    from sparse_lm.parallel.layout import canonical_name
    from sparse_lm.sparsity.storage import SparseLinear

    return {canonical_name(name): round(float(m.forward_mask.sum()) / m.n_blocks, 6)
            for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class MetricsLog:
    """Appends one JSON object per event to `<out_dir>/metrics.jsonl` (line-buffered, survives a kill).

    A run starting at step S (S = 0 unless resumed) first drops the records of steps after S, which
    an earlier attempt logged before it was killed: it is about to log those steps again, and the
    file keeps one record per step, from the attempt that continues.
    """

    def __init__(self, path: str | Path, enabled: bool, start_step: int, monitor=None):
        """`monitor`: DeepSpeed's (`engine.monitor`) to send each record's numbers to as well."""
        self.enabled = enabled
        self.monitor = monitor
        self._handle = None
        if enabled:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                _drop_after(path, start_step)
            self._handle = open(path, "a", buffering=1)

    def write(self, kind: str, **fields: Any) -> None:
        if self._handle is not None:
            self._handle.write(to_json({"kind": kind, "time": round(time.time(), 3), **fields}) + "\n")
            if self.monitor is not None:
                events = scalar_events(kind, fields)
                if events:
                    self.monitor.write_events(events)

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _drop_after(path: Path, step: int) -> None:
    """Rewrite `path` (atomically) without records of steps after `step`, nor a line torn by a kill."""
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not (isinstance(record, dict) and record.get("step", 0) > step):
            kept.append(line + "\n")
    if len(kept) < len(lines):
        write_text(path, "".join(kept))
