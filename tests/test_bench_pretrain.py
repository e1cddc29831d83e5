"""tools/bench_pretrain.py end to end at the smallest shape: real `sparse-lm pretrain` runs, timed
from their own step records, and a complete report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_pretrain.py"


def test_bench_pretrain_tiny(tmp_path, data_dir):
    out, table = tmp_path / "pretrain.json", tmp_path / "pretrain.md"
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--data", str(data_dir), "--d-model", "64", "--layers", "1", "--seq-len", "32",
         "--micro-batch", "2", "--steps", "6", "--warmup", "2", "--reselect-every", "2", "--threads", "1",
         "--variants", "dense", "topkast-block16", "--json", str(out), "--markdown", str(table)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"cpu", "cpu_count", "threads", "torch"} <= report["environment"].keys()
    results = report["results"]
    assert list(results) == ["dense", "topkast-block16"]
    assert results["dense"]["over_dense"] == 1.0
    for r in results.values():
        assert r["steps"] == 4 and r["seconds"] > 0 and r["peak_rss_bytes"] > 0
        assert r["tokens"] == 4 * 2 * 32 and r["tokens_per_s"] == r["tokens"] / r["seconds"]
    sparse = results["topkast-block16"]
    assert sparse["over_dense"] == sparse["tokens_per_s"] / results["dense"]["tokens_per_s"]
    assert "| topkast-block16 |" in table.read_text()


def test_bench_pretrain_names_missing_data(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), "--data", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and f"--data {tmp_path}: no prepared data there" in proc.stderr
