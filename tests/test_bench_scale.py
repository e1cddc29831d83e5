"""tools/bench_scale.py on a reduced shape: the same code path as the 1.1B / 13B / 70B cases (fresh
rank processes, real DeepSpeed engines, gloo for tensor 2, checkpoint save/load, export-hf), its
report complete, and the measured model state within 5% of `sparse-lm plan`'s."""

from __future__ import annotations

import copy
import json
import sys

import pytest

from tests.cli_runs import REPO

sys.path.insert(0, str(REPO / "tools"))
import bench_scale  # noqa: E402

RANK_FIELDS = ("kernels_load_s", "build_s", "init_s", "engine_s", "build_init_s", "step_s", "recompute_step_s",
               "recompute_over_kept",
               "reselect_s", "model_state_bytes", "model_state_parts", "plan_model_state_bytes",
               "model_state_over_plan", "peak_rss_bytes", "baseline_rss_bytes", "plan_total_bytes",
               "peak_rss_over_plan_total", "step_peak_rss_bytes", "plan_peak_bytes",
               "step_peak_over_plan_peak", "allocated_step_bytes", "plan_step_bytes", "allocated_step_over_plan",
               "phases", "checkpoint_save_s", "checkpoint_load_s", "checkpoint_bytes")


@pytest.fixture(scope="module")
def report(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("bench_scale")
    code = bench_scale.main([
        "--config", str(REPO / "configs/tiny.yaml"), "--worlds", "1", "2", "--steps", "1", "--seq-len", "32",
        "--set", "sparsity.granularity=block", "sparsity.block_size=16", "parallel.zero_stage=1",
        "--tokenizer", str(data_dir / "tokenizer.model"), "--threads", "2",
        "--json", str(out / "scale.json"), "--markdown", str(out / "scale.md")])
    assert code == 0
    return json.loads((out / "scale.json").read_text()) | {"markdown": (out / "scale.md").read_text()}


def test_report_has_every_field_and_the_plan_holds(report):
    assert set(report["environment"]) >= {"cpu", "cpu_count", "threads", "torch", "load_average_at_end"}
    cases = {c["case"]: c for c in report["cases"]}
    assert set(cases) == {"tp1", "tp2"} and [len(cases[k]["ranks"]) for k in ("tp1", "tp2")] == [1, 2]
    for case in cases.values():
        for r in case["ranks"]:
            assert set(r) >= set(RANK_FIELDS), set(RANK_FIELDS) - set(r)
            assert r["model_state_over_plan"] == pytest.approx(1, abs=0.05), (case["case"], r["rank"])
            assert r["peak_rss_bytes"] >= r["baseline_rss_bytes"] > 0
            assert r["allocated_step_bytes"] > r["model_state_parts"]["gradients"]  # they are allocated anew
            assert r["checkpoint_bytes"] > r["model_state_parts"]["parameters"]
    # tensor 2 splits the sparse linears and the vocabulary: each rank holds less than the whole
    assert cases["tp2"]["ranks"][0]["model_state_bytes"] < cases["tp1"]["ranks"][0]["model_state_bytes"]
    export = cases["tp1"]["export"]
    assert export["bytes"] > 0 and export["seconds"] > 0 and "exported step" in export["line"]
    assert cases["tp2"]["export"] is None
    assert "| tp2 | 1 |" in report["markdown"]
    assert bench_scale.plan_disagreements(report) == []


def test_a_plan_missing_a_part_is_caught(report):
    """The check can fail: a plan that forgot Adam's moments is > 5% off the engine's tensors."""
    case = copy.deepcopy(report["cases"][0])
    rank = case["ranks"][0]
    parts = dict(case["plan"]["parts"], optimizer_moments=0)
    rank["plan_model_state_bytes"] = bench_scale.planned_state(parts)
    rank["model_state_over_plan"] = rank["model_state_bytes"] / rank["plan_model_state_bytes"]
    problems = bench_scale.plan_disagreements({"cases": [case]})
    assert len(problems) == 1 and "tp1 rank 0" in problems[0]
