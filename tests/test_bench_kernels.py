"""tools/bench_kernels.py end to end on a tiny layer: it runs every path (elements and blocks),
each matches the dense products, and the report is complete."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.cli_runs import REPO


def test_bench_kernels_tiny(tmp_path):
    out, table = tmp_path / "kernels.json", tmp_path / "kernels.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_kernels.py"), "--shape", "128", "64", "--tokens", "40",
         "--blocks", "1", "16", "32", "--fractions", "0.25", "0.5", "--repeat", "1", "--threads", "1",
         "--json", str(out), "--markdown", str(table)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["compiled_kernels"] is True
    assert [(r["block"], r["fraction"]) for r in report["results"]] == [
        (1, 0.25), (1, 0.5), (16, 0.25), (16, 0.5), (32, 0.25), (32, 0.5)]
    for r in report["results"]:
        assert set(r["products"]) == {"forward", "input_grad", "value_grad"}
        for product in r["products"].values():  # elements (b = 1) have no gathered path
            assert set(product) == {"dense", "in_place", "tiles"} | ({"gathered"} if r["block"] > 1 else set())
            assert all(p["max_abs_error"] < 1e-4 and p["speedup_median"] > 0 for p in product.values())
    assert report["max_abs_error"] < 1e-4 and "| b | f |" in table.read_text() and table.read_text() in proc.stdout


def test_bench_kernels_rejects_a_shape_blocks_do_not_split():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_kernels.py"), "--shape", "100", "64",
                           "--blocks", "32"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--shape 100 64 does not split into blocks of 32" in proc.stderr
