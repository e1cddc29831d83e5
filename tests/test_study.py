"""tools/study.py end to end on a tiny study (few steps): every artefact is produced and parses,
the small dense model matches the sparse one's non-zeros, seeds are aggregated, finished runs are
skipped on re-run."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import yaml

from tests.cli_runs import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run_study(study: dict, tmp_path) -> tuple[list[str], object, dict]:
    """Run tools/study.py on `study`; (its command, its output folder, its results.json)."""
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study, sort_keys=False))
    out = tmp_path / "results"
    command = [sys.executable, str(REPO / "tools" / "study.py"), "--config", str(config), "--out", str(out)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return command, out, json.loads((out / "results.json").read_text())


def _base(data_dir, steps: int, eval_every: int) -> dict:
    """A study's base run: a tiny model for `steps` steps, checkpointed at the end."""
    return {"model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 32},
            "data": {"path": str(data_dir)},
            "train": {"steps": steps, "seq_len": 32, "micro_batch": 4, "eval_every": eval_every, "eval_batches": 2,
                      "warmup_steps": 1},
            "checkpoint": {"every": steps, "keep": 1}}


def _beyond_corpus(tmp_path):
    """A few documents the runs never trained on, as `extra_eval` scores them."""
    path = tmp_path / "beyond.jsonl"
    sources = sorted((REPO / "sparse_lm" / "data").glob("*.py"))[:3]
    path.write_text("".join(json.dumps({"text": p.read_text()[:3000]}) + "\n" for p in sources))
    return path


def test_study_pipeline_produces_every_artefact(data_dir, tmp_path):
    study = {
        "base": _base(data_dir, steps=4, eval_every=2),
        "seeds": [7, 8],
        "variants": {"dense": {},
                     "topkast-75": {"sparsity": {"method": "topkast", "density": 0.25, "exploration": 0.25,
                                                 "reselect_every": 2}},
                     "small-dense-75": {"small_dense": "topkast-75"}},
    }
    command, out, report = _run_study(study, tmp_path)
    results = report["results"]
    assert list(results) == ["dense", "topkast-75", "small-dense-75"]
    for name, r in results.items():
        assert r["perplexity"]["mean"] > 1 and r["bits_per_byte"]["mean"] > 0, name
        assert r["perplexity"]["n"] == 2 and r["perplexity"]["sd"] > 0, name  # two seeds, not one run twice
        assert [step for step, _ in r["heldout_curve"]] == [2, 4], name
        assert r["tokens"] == results["dense"]["tokens"]  # same token budget
    runs = report["runs"]
    assert [(r["name"], r["seed"]) for r in runs] == [(n, s) for s in (7, 8) for n in results]
    for r in runs:
        assert {"method", "seed", "steps", "tokens", "perplexity", "bits_per_byte", "overrides"} <= set(r), r["name"]
        assert r["steps"] == 4 and r["tokens"] == 4 * 4 * 32
    first = [r["perplexity"] for r in runs if r["name"] == "dense"]
    assert results["dense"]["perplexity"]["mean"] == sum(first) / 2
    assert results["topkast-75"]["train_flops_per_token"] < results["dense"]["train_flops_per_token"]
    sparse, small = results["topkast-75"], results["small-dense-75"]
    assert sparse["forward_nonzeros"] < results["dense"]["forward_nonzeros"]
    assert abs(small["parameters"] - sparse["forward_nonzeros"]) < 0.1 * sparse["forward_nonzeros"]
    assert small["overrides"]["model"]["d_model"] < 64
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in results)
    for png in ("loss_vs_tokens.png", "loss_vs_flops.png", "ppl_vs_density.png"):
        assert (out / png).read_bytes()[:8] == PNG_SIGNATURE
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "training" not in again.stdout  # finished runs are skipped
    # a finished run is never reported under a config it did not train with
    study["variants"]["topkast-75"]["sparsity"]["exploration"] = 0.5
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    changed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert changed.returncode != 0 and "training" not in changed.stdout
    assert "topkast-75/seed7/config.yaml: this run was started with another config" in changed.stderr
    assert yaml.safe_load((out / "runs" / "topkast-75" / "seed7" / "config.yaml").read_text())[
        "sparsity"]["exploration"] == 0.25


def test_a_grid_is_tuned_by_training_loss_and_extended_off_its_edge(data_dir, tmp_path):
    """A 2-point learning-rate grid whose best is its larger rate gets a point beyond it, then half
    steps around its best (`refine`); the selection is the lowest mean training loss over the last
    steps; a variant inherits a field of another's selection; the seeds phase repeats the selected
    setting only; the long horizon runs each selection once more and compares it with dense at equal
    tokens and at equal training FLOPs."""
    study = {
        "base": _base(data_dir, steps=6, eval_every=6),
        "seeds": [7, 8],
        "horizon": {"train": {"steps": 8, "eval_every": 2}},
        "extra_eval": {"corpora": {"beyond": str(_beyond_corpus(tmp_path))}, "phases": ["horizon"], "stride": 16},
        "select_fraction": 0.5,
        "max_extensions": 1,
        "variants": {"dense": {"grid": {"train.lr": [1.0e-4, 3.0e-4]}, "refine": True},
                     "static-75": {"sparsity": {"method": "static", "density": 0.25},
                                   "inherit": {"dense": ["train.lr"]}, "grid": {"sparsity.supar": [False, True]}}},
    }
    _, out, report = _run_study(study, tmp_path)
    grid = [r for r in report["runs"] if r["name"] == "dense" and r["phase"] == "grid"]
    assert [r["setting"]["train.lr"] for r in grid[:3]] == [1.0e-4, 3.0e-4, 9.0e-4]  # one step beyond the edge
    coarse = min(grid[:3], key=lambda r: r["selection_loss"])["setting"]["train.lr"]  # then half steps around it
    halves = [(coarse * other) ** 0.5 for other in {1.0e-4: [3.0e-4], 3.0e-4: [1.0e-4, 9.0e-4]}.get(coarse, [3.0e-4])]
    assert [r["setting"]["train.lr"] for r in grid[3:]] == pytest.approx(halves, rel=1e-9)
    for r in grid:  # the selection loss is the mean of the last half of the steps' training losses
        steps = [json.loads(line) for line in (out / "runs" / "dense" / f"lr={r['setting']['train.lr']:g}" / "seed7"
                                                / "metrics.jsonl").read_text().splitlines()]
        losses = [s["loss"] for s in steps if s["kind"] == "step" and s["step"] > 3]
        assert r["selection_loss"] == sum(losses) / 3
        assert r["lr_groups"]["embedding"] == r["setting"]["train.lr"] and r["seeds"] == [7]
    chosen = min(grid, key=lambda r: r["selection_loss"])
    dense = report["results"]["dense"]
    assert dense["setting"] == chosen["setting"] and dense["seeds"] == [7, 8]
    assert ("train.lr" in dense["on_edge"]) == (chosen["setting"]["train.lr"] == 9.0e-4)
    static = report["results"]["static-75"]
    assert set(static["slices"]) == {"supar off", "supar on"}
    statics = [r for r in report["runs"] if r["name"] == "static-75" and r["phase"] != "horizon"]
    assert all(r["overrides"]["train"]["lr"] == chosen["setting"]["train.lr"] for r in statics)  # inherited
    assert sorted((r["phase"], r["seed"]) for r in statics) == [("grid", 7), ("grid", 7), ("seed", 8)]
    # static-75 minus dense seed by seed, from the runs at the two selected settings
    selected = {(r["name"], r["seed"]): r for r in report["runs"] if r["phase"] in ("grid", "seed")
                and r["setting"] == report["results"][r["name"]]["setting"]}
    differences = [selected["static-75", s]["eval"]["loss"] - selected["dense", s]["eval"]["loss"] for s in (7, 8)]
    paired = static["paired"]
    assert paired["against"] == "dense" and paired["seeds"] == [7, 8] and "paired" not in dense
    assert paired["heldout_loss"]["mean"] == pytest.approx(sum(differences) / 2, abs=1e-12)
    assert paired["heldout_loss"]["sd"] == pytest.approx(abs(differences[0] - differences[1]) / 2 ** 0.5, abs=1e-12)
    assert paired["ahead"] == sum(d < 0 for d in differences)
    table = (out / "results.md").read_text()
    assert "| dense |" in table and "★" in table and "| static-75 | supar on |" in table
    assert f"| static-75 | 2 | {paired['heldout_loss']['mean']:+.4f} ± {paired['heldout_loss']['sd']:.4f} |" in table
    # the horizon: each selection once more, longer, at the first seed
    long = {r["name"]: r for r in report["runs"] if r["phase"] == "horizon"}
    assert list(long) == ["dense", "static-75"]
    for name, r in long.items():
        assert (r["seed"], r["steps"], r["setting"]) == (7, 8, report["results"][name]["setting"])
        assert [step for step, _ in r["heldout_curve"]] == [2, 4, 6, 8]
    horizon = report["horizon"]["static-75"]
    assert horizon["equal_tokens"]["heldout_loss"] == pytest.approx(
        long["static-75"]["eval"]["loss"] - long["dense"]["eval"]["loss"], abs=1e-12)
    step = 8 * long["static-75"]["train_flops_per_token"] / long["dense"]["train_flops_per_token"]
    curve = dict(long["dense"]["heldout_curve"])
    below = max(s for s in curve if s <= step)  # dense's loop held-out loss when it had spent static's FLOPs
    above = min(s for s in curve if s >= step)
    at = curve[below] + (curve[above] - curve[below]) * ((step - below) / (above - below) if above > below else 0)
    flops = horizon["equal_flops"]
    assert flops["reference_step"] == pytest.approx(step) and flops["reference_loop_loss"] == pytest.approx(at)
    assert flops["loop_loss_delta"] == pytest.approx(long["static-75"]["heldout_curve"][-1][1] - at)
    assert f"| static-75 | 8 | {horizon['tokens'] / 1e6:.2f}M |" in (out / "results.md").read_text()
    # extra_eval: only the horizon runs are scored on the extra corpus, with the stride asked for
    assert all(r["extra_eval"] == {} for r in report["runs"] if r["phase"] != "horizon")
    scored = {name: json.loads((out / "runs" / name / "horizon" / "eval-beyond.json").read_text()) for name in long}
    for name, r in long.items():
        assert r["extra_eval"]["beyond"] == scored[name] and scored[name]["stride"] == 16
        assert scored[name]["loss"] != r["eval"]["loss"]  # another corpus than the held-out split
    assert horizon["equal_tokens"]["beyond_loss"] == pytest.approx(
        scored["static-75"]["loss"] - scored["dense"]["loss"], abs=1e-12)
    assert f"| {scored['static-75']['perplexity']:.2f} | {horizon['equal_tokens']['beyond_loss']:+.4f} |" in (
        out / "results.md").read_text()


def test_extra_eval_is_checked_before_any_training(data_dir, tmp_path):
    study = {"base": _base(data_dir, steps=2, eval_every=2), "variants": {"dense": {}},
             "extra_eval": {"corpora": {"beyond": str(tmp_path / "missing.jsonl")}}}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "study.py"), "--config", str(config), "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "extra_eval.corpora.beyond" in proc.stderr and "not found" in proc.stderr
    assert not (tmp_path / "out" / "runs").exists()


def test_a_finished_run_with_the_same_config_is_taken_not_trained_again(data_dir, tmp_path):
    """A study that re-tunes another's selection (`reuse`) takes that study's finished run where
    the config is the same (a number written as an integer in one and a float in the other
    included, as the config check compares them), and a point two of its own variants share is
    trained once; a run whose config differs (here the rate) is trained."""
    base = _base(data_dir, steps=4, eval_every=4)
    base["train"].update(lr=0.003, lr_mult_hidden=1.0)
    first = tmp_path / "first"
    first.mkdir()
    _, first_out, first_report = _run_study({"base": base, "variants": {"dense": {}}}, first)
    base = copy.deepcopy(base)
    base["train"]["lr_mult_hidden"] = 1
    second = {"base": base, "reuse": [str(first_out)], "max_extensions": 0,
              "variants": {"dense-lr": {"grid": {"train.lr": [0.003, 0.006]}},
                           "dense-high": {"grid": {"train.lr": [0.006]}}}}
    config = tmp_path / "second.yaml"
    config.write_text(yaml.safe_dump(second, sort_keys=False))
    out = tmp_path / "second"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "study.py"), "--config", str(config), "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(": training") == 1  # only the 0.006 point, once for both variants
    runs = {(r["name"], r["setting"]["train.lr"]): r for r in json.loads((out / "results.json").read_text())["runs"]}
    taken, trained, shared = runs["dense-lr", 0.003], runs["dense-lr", 0.006], runs["dense-high", 0.006]
    reference = first_report["runs"][0]
    assert taken["same_as"].endswith("first/results/runs/dense") and trained["same_as"] is None
    assert taken["selection_loss"] == reference["selection_loss"] and taken["perplexity"] == reference["perplexity"]
    assert shared["same_as"].endswith("second/runs/dense-lr/lr=0.006")
    assert shared["selection_loss"] == trained["selection_loss"] != taken["selection_loss"]
    assert not (out / "runs" / "dense-lr" / "lr=0.003").exists() and not (out / "runs" / "dense-high").exists()

    second["reuse"] = [str(tmp_path / "nowhere")]
    config.write_text(yaml.safe_dump(second, sort_keys=False))
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "study.py"), "--config", str(config), "--out",
                          str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "reuse:" in bad.stderr and "nowhere has no runs/ folder" in bad.stderr
