"""tools/bench_memory.py end to end on a tiny model: the memory promises of the sparse kernels,
read from the profiler's record of one training step (bytes, not times, so they can be asserted):
block mode allocates nothing of a weight's dense size, element mode at most one layer's dense weight,
and sparse model state is a fraction of dense."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.cli_runs import REPO


def test_bench_memory_keeps_the_kernel_promises(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_memory.py"), "--json", str(out), "--d-model", "256",
         "--layers", "1", "--vocab", "256", "--seq", "16", "--batch", "1", "--steps", "2", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    smallest, largest = report["smallest_linear_dense_weight_bytes"], report["largest_linear_dense_weight_bytes"]
    assert smallest == 256 * 256 * 4 and largest == 256 * 704 * 4  # attention projections, the FFN (SwiGLU 704)
    assert report["dense_step_peak_bytes"] > 0
    for variant in ("topkast_block16", "topkast_block32"):
        r = report[variant]
        # the largest is B's value gradient (|B| = 0.2 of the FFN weight): below any dense weight
        assert 0 < r["largest_kernel_allocation_bytes"] < smallest, (variant, r["largest_kernel_allocation_op"])
        assert r["ratio"] < 0.5 and r["step_peak_bytes"] > 0
    element = report["topkast_element"]
    assert element["largest_kernel_allocation_bytes"] <= largest + 64  # a dense tile (above f = 0.25) at most
    assert element["ratio"] < 0.5
