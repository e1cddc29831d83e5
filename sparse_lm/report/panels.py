"""The numbers each panel of `sparse-lm report` draws, read from a run's metrics.jsonl: kept apart
from the drawing so what a figure shows can be checked against the run's own records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparse_lm.errors import UserError


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every well-formed record of `<run_dir>/metrics.jsonl` (a line torn by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"run directory {run_dir}: no metrics.jsonl (expected a pretraining run's train.out_dir)")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "kind" in record:
            out.append(record)
    return out


def _series(records: list[dict], kind: str, x: str, y: str) -> tuple[list[float], list[float]]:
    rows = [r for r in records if r["kind"] == kind and r.get(x) is not None and r.get(y) is not None]
    return [r[x] for r in rows], [r[y] for r in rows]


def panels(records: list[dict[str, Any]], source: str = "metrics.jsonl") -> dict[str, dict[str, Any]]:
    """{panel: {series name: (xs, ys)} plus labels}, for the panels of the report:

    loss — training and held-out loss against tokens seen; throughput — tok/s against step;
    memory — model state per rank against the dense model's (from the run's summary); churn — the
    fraction of A and of B that changed at each reselection; density — each sparse layer's forward
    density against step."""
    steps = [r for r in records if r["kind"] == "step"]
    if not steps:
        raise UserError(f"{source}: no training steps recorded yet")
    tokens_at = {r["step"]: r["tokens"] for r in steps}
    heldout = [r for r in records if r["kind"] == "heldout" and r["step"] in tokens_at]
    out: dict[str, dict[str, Any]] = {
        "loss": {"xlabel": "tokens", "ylabel": "loss",
                 "train": ([r["tokens"] for r in steps], [r["loss"] for r in steps]),
                 "held-out": ([tokens_at[r["step"]] for r in heldout], [r["loss"] for r in heldout])},
        "throughput": {"xlabel": "step", "ylabel": "tokens / s", "tok/s": _series(records, "throughput", "step",
                                                                                 "tokens_per_s")},
        "churn": {"xlabel": "step", "ylabel": "fraction changed per reselection",
                  "A": _series(records, "reselect", "step", "changed_a"),
                  "B": _series(records, "reselect", "step", "changed_b")},
    }
    summary = next((r for r in reversed(records) if r["kind"] == "summary"), None)
    memory: dict[str, Any] = {"xlabel": "", "ylabel": "model state per rank (MiB)"}
    if summary and summary.get("model_state_bytes") and summary.get("dense_model_state_bytes"):
        memory["bars"] = (["this run", "dense"], [summary["model_state_bytes"] / 2**20,
                                                  summary["dense_model_state_bytes"] / 2**20])
    out["memory"] = memory
    density: dict[str, Any] = {"xlabel": "step", "ylabel": "forward density |A| / blocks"}
    for record in (r for r in records if r["kind"] == "density"):
        for layer, value in record["layers"].items():
            xs, ys = density.setdefault(layer, ([], []))
            xs.append(record["step"])
            ys.append(value)
    out["density"] = density
    return out
