"""tools/bench_step.py end to end on the smallest setting: it runs and writes a complete report."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_step.py"


def test_bench_step_tiny(tmp_path):
    out, table = tmp_path / "step.json", tmp_path / "step.md"
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--d-models", "64", "--modes", "element", "block16", "--densities", "1", "0.1",
         "--tokens", "32", "--layers", "1", "--hidden-mult", "2", "--repeat", "2", "--threads", "1",
         "--json", str(out), "--markdown", str(table)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"cpu", "cpu_count", "threads", "torch", "rule"} <= report["environment"].keys()
    assert report["environment"]["compiled_kernels"] is True
    assert [(r["mode"], r["density"]) for r in report["results"]] == [
        ("element", 1.0), ("element", 0.1), ("block16", 1.0), ("block16", 0.1)]
    for r in report["results"]:
        assert len(r["step_dense_s"]) == len(r["step_sparse_s"]) == 2
        assert r["step_speedup_min"] > 0 and r["forward_speedup_median"] > 0
        assert r["forward_path"] == ("in_place" if r["density"] == 0.1 else "tiles")  # elements, too
        assert len(r["reselect_s"]) == 2 and r["reselect_every"] == 100
        assert r["reselect_amortised_fraction"] == pytest.approx(
            statistics.median(r["reselect_s"]) / (100 * statistics.median(r["step_sparse_s"])))
    assert "| d_model | mode |" in table.read_text() and table.read_text() in proc.stdout


def test_bench_step_refuses_a_device_it_cannot_use():
    proc = subprocess.run([sys.executable, str(TOOL), "--device", "tpu0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--device tpu0: expected cpu, cuda or cuda:N" in proc.stderr.splitlines()[-1]
