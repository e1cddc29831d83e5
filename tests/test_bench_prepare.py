"""tools/bench_prepare.py end to end at a tiny size: it runs, checks that 1 and 2 processes write
the same token files, and reports every configuration beside the bare tokenizer's speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_prepare.py"


def test_bench_prepare_tiny(tmp_path):
    out, table = tmp_path / "prepare.json", tmp_path / "prepare.md"
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--mb", "0.3", "--vocab-size", "512", "--json", str(out), "--markdown", str(table)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"python", "platform", "cpu", "cpu_count", "sentencepiece", "datasets", "load_average_at_start",
            "load_average_at_end"} <= report["environment"].keys()
    assert 300_000 <= report["text_bytes"] < 400_000 and report["documents"] > 1
    assert report["bare_encode_mb_s"] > 0 and report["bare_encode_s"] > 0
    runs = {(r["corpus"], r["num_proc"]): r for r in report["results"]}
    assert sorted(runs) == [("big.txt", 1), ("big.txt", 2), ("many.jsonl", 1), ("many.jsonl", 2)]
    for r in runs.values():
        assert r["seconds"] > 0 and abs(r["mb_s"] - report["text_bytes"] / 1e6 / r["seconds"]) < 1e-9
    assert table.read_text() in proc.stdout and "| bare sentencepiece `encode`" in proc.stdout
