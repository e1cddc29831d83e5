"""tools/bench_reselect.py end to end on tiny sizes: it runs, checks itself, and reports per-rank
collective bytes that depend on the rank count only, never on the layer size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_reselect.py"
SIZES = (20000, 50000)
RANKS = (1, 2)


def test_bench_reselect_tiny(tmp_path):
    out = tmp_path / "reselect.json"
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--sizes", *map(str, SIZES), "--ranks", *map(str, RANKS), "--repeat", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"python", "torch", "cpu_count", "platform", "threads"} <= report["environment"].keys()

    selects = {(r["n"], r["ranks"]): r for r in report["results"] if r["kind"] == "select_topk_positions"}
    assert sorted(selects) == sorted((n, w) for n in SIZES for w in RANKS)
    for n in SIZES:
        assert selects[(n, 1)]["bytes_per_rank"] == 0
        assert selects[(n, 2)]["bytes_per_rank"] > 0
        assert selects[(n, 2)]["bytes_per_rank"] == selects[(n, 2)]["bytes_exchanged"]
    assert selects[(SIZES[0], 2)]["bytes_per_rank"] == selects[(SIZES[1], 2)]["bytes_per_rank"]

    layers = [r for r in report["results"] if r["kind"] == "layer_reselect"]
    assert len(layers) == len(SIZES) and all(r["median_s"] > 0 for r in layers)
    assert "| N | ranks |" in proc.stdout  # the Markdown table
