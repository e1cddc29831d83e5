"""`sparse-lm report`: the figure is written, and every panel draws the run's own numbers."""

from __future__ import annotations

import sys

import pytest

from sparse_lm.cli import main
from sparse_lm.report.cli import report
from tests.cli_runs import records


def test_report_draws_the_runs_numbers(tmp_path, reference_runs):
    run = reference_runs("topkast")
    out, data = report(run, tmp_path / "report.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    steps = records(run, "step")
    tokens = {r["step"]: r["tokens"] for r in steps}
    assert data["loss"]["train"] == ([r["tokens"] for r in steps], [r["loss"] for r in steps])
    heldout = records(run, "heldout")
    assert len(heldout) == 2
    assert data["loss"]["held-out"] == ([tokens[r["step"]] for r in heldout], [r["loss"] for r in heldout])
    throughput = records(run, "throughput")
    assert data["throughput"]["tok/s"] == ([r["step"] for r in throughput], [r["tokens_per_s"] for r in throughput])
    reselect = records(run, "reselect")
    assert len(reselect) >= 2
    assert data["churn"]["A"] == ([r["step"] for r in reselect], [r["changed_a"] for r in reselect])
    assert data["churn"]["B"] == ([r["step"] for r in reselect], [r["changed_b"] for r in reselect])
    (summary,) = records(run, "summary")
    assert data["memory"]["bars"][1] == [summary["model_state_bytes"] / 2**20,
                                         summary["dense_model_state_bytes"] / 2**20]
    density = records(run, "density")
    steps_at = [0] + [r["step"] for r in reselect]  # at the start and after each reselection
    assert [r["step"] for r in density] == steps_at
    layers = sorted(density[0]["layers"])
    assert len(layers) == 2 * 7 and sorted(k for k in data["density"] if k not in ("xlabel", "ylabel")) == layers
    for layer in layers:
        assert data["density"][layer] == (steps_at, [r["layers"][layer] for r in density])
        assert all(0.15 < v < 0.3 for v in data["density"][layer][1])  # density 0.2, rounded up per layer


def test_report_as_html_through_the_cli(tmp_path, reference_runs, capsys):
    assert main(["report", str(reference_runs("topkast")), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64,iVBORw0KGgo" in page
    assert "report written to" in capsys.readouterr().out


def test_dense_run_says_what_it_did_not_record(tmp_path, reference_runs):
    _, data = report(reference_runs("dense"), tmp_path / "dense.png")
    assert data["churn"]["A"] == ([], []) and set(data["density"]) == {"xlabel", "ylabel"}


@pytest.mark.parametrize("case, expected", [
    ("no-run", "no metrics.jsonl"),
    ("bad-out", "expected a .png or .html file"),
    ("no-matplotlib", "report needs matplotlib"),
])
def test_report_errors_are_one_line(tmp_path, reference_runs, capsys, monkeypatch, case, expected):
    run = tmp_path / "nothing" if case == "no-run" else reference_runs("dense")
    out = tmp_path / ("r.pdf" if case == "bad-out" else "r.png")
    if case == "no-matplotlib":
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib then fails
    assert main(["report", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not out.exists() and not (tmp_path / "nothing").exists()
