"""The study's tuning protocol (tools/study_grid.py): grids, slices, edges and their extension."""

from __future__ import annotations

import math
import sys

import pytest

from tests.cli_runs import REPO

sys.path.insert(0, str(REPO / "tools"))
import study_grid  # noqa: E402


def test_expand_and_name_points():
    points = study_grid.expand({"train.lr": [1e-3, 3e-3], "sparsity.supar": [False, True]})
    assert points == [{"train.lr": 1e-3, "sparsity.supar": False}, {"train.lr": 1e-3, "sparsity.supar": True},
                      {"train.lr": 3e-3, "sparsity.supar": False}, {"train.lr": 3e-3, "sparsity.supar": True}]
    assert study_grid.slug(points[1]) == "lr=0.001,supar=on"
    assert study_grid.nested(points[1]) == {"train": {"lr": 1e-3}, "sparsity": {"supar": True}}
    assert study_grid.expand({}) == [{}]
    with pytest.raises(ValueError, match="grid axis 'lr'"):
        study_grid.expand({"lr": [1]})


def test_each_slice_is_tuned_and_edges_are_extended_geometrically():
    grid = study_grid.expand({"train.lr": [1e-3, 3e-3, 1e-2], "train.lr_mult_hidden": [0.1, 0.3],
                              "sparsity.supar": [False, True]})
    # off: best at lr 1e-2 (upper edge), hidden 0.1 (lower edge); on: best at 3e-3, 0.3 (interior in lr)
    def loss(p):
        if p["sparsity.supar"]:
            return abs(math.log(p["train.lr"] / 3e-3)) + abs(p["train.lr_mult_hidden"] - 0.3)
        return -p["train.lr"] + p["train.lr_mult_hidden"]
    losses = [loss(p) for p in grid]
    picks = study_grid.selections(grid, losses)
    off, on = grid[picks[(("sparsity.supar", False),)]], grid[picks[(("sparsity.supar", True),)]]
    assert off == {"train.lr": 1e-2, "train.lr_mult_hidden": 0.1, "sparsity.supar": False}
    assert study_grid.edges(off, grid) == ["train.lr", "train.lr_mult_hidden"]
    assert study_grid.edges(on, grid) == ["train.lr_mult_hidden"]  # 0.3 is the largest hidden multiplier tried
    new = study_grid.extensions(grid, losses)
    assert {"train.lr": pytest.approx(1e-2 * 1e-2 / 3e-3), "train.lr_mult_hidden": 0.1, "sparsity.supar": False} in new
    assert {"train.lr": 1e-2, "train.lr_mult_hidden": pytest.approx(0.1 / 3), "sparsity.supar": False} in new
    assert {"train.lr": 3e-3, "train.lr_mult_hidden": pytest.approx(0.9), "sparsity.supar": True} in new
    assert len(new) == 3


def test_refinement_is_half_steps_around_the_best_point_on_each_numeric_axis():
    grid = study_grid.expand({"train.lr": [1e-3, 1e-2, 1e-1], "train.lr_mult_hidden": [0.1, 0.3],
                              "sparsity.supar": [True], "sparsity.reselect_every": [10, 20]})
    def loss(p):  # best: lr 1e-2 (interior), hidden 0.1 (lower edge), reselect_every 20 (upper edge)
        return abs(math.log10(p["train.lr"]) + 2) + p["train.lr_mult_hidden"] - p["sparsity.reselect_every"] / 100
    new = study_grid.refinements(grid, [loss(p) for p in grid])
    best = {"train.lr": 1e-2, "train.lr_mult_hidden": 0.1, "sparsity.supar": True, "sparsity.reselect_every": 20}
    assert new == [{**best, "train.lr": pytest.approx(10 ** -2.5)}, {**best, "train.lr": pytest.approx(10 ** -1.5)},
                   {**best, "train.lr_mult_hidden": pytest.approx(math.sqrt(0.03))},
                   {**best, "sparsity.reselect_every": 14}]  # √200 rounded: an integer axis stays integer
    assert study_grid.refinements(grid + new, [loss(p) for p in grid + new]) != new  # a second round halves again
    assert study_grid.refinements([{"train.lr": 1e-3}], [1.0]) == []  # a one-point line has no neighbour
    assert study_grid.refinements(grid, [math.inf] * len(grid)) == []  # nothing finite to refine around


def test_selection_loss_is_the_mean_of_the_last_steps_and_divergence_is_never_chosen():
    steps = {s: float(s) for s in range(1, 101)}
    assert study_grid.selection_loss(steps, 100, 0.1) == sum(range(91, 101)) / 10
    assert study_grid.selection_loss({**steps, 95: math.nan}, 100, 0.1) == math.inf
    assert study_grid.selection_loss({s: v for s, v in steps.items() if s != 100}, 100, 0.1) == math.inf
    assert study_grid.best([{}, {}, {}], [math.inf, 2.0, math.nan]) == 1
    assert study_grid.best([{}], [math.inf]) is None


def test_an_extension_past_a_fields_range_is_not_run_and_the_edge_is_marked_a_limit(tmp_path):
    """Study.tune on a mask-freezing fraction whose best is its largest value, 0.75: the next point
    (0.75² / 0.5 = 1.125) is not a valid `sparsity.freeze_masks_after`, so it is not trained and the
    selection's edge is reported as the range's limit; the learning-rate axis still extends."""
    import argparse

    import study

    spec = {"base": {"model": {"d_model": 64, "n_layers": 2, "n_heads": 4}, "sparsity": {"method": "topkast"},
                     "data": {"path": str(tmp_path)}, "train": {"steps": 10}},
            "variants": {"freeze": {"grid": {"sparsity.freeze_masks_after": [0.5, 0.75], "train.lr": [1e-3, 3e-3]}}}}
    tuner = study.Study(argparse.Namespace(config=tmp_path / "s.yaml", out=tmp_path), spec, spec["base"], 128)
    trained = []

    def run(name, overrides, point, seed, phase, train, tag=True, extra=None):  # loss falls with both fields
        trained.append(point)
        loss = -point["sparsity.freeze_masks_after"] + abs(math.log(point["train.lr"] / 3e-3))
        return {"selection_loss": loss, "perplexity": math.exp(loss), "lr_groups": {}, "tree": {}}

    tuner.run = run
    tuner.tune("freeze", train=True)
    assert all(p["sparsity.freeze_masks_after"] <= 1 for p in trained)
    assert {"sparsity.freeze_masks_after": 0.75, "train.lr": pytest.approx(9e-3)} in trained  # lr's edge extended
    chosen = tuner.selected["freeze"]
    assert chosen["setting"] == {"sparsity.freeze_masks_after": 0.75, "train.lr": 3e-3}
    assert chosen["on_edge"] == ["sparsity.freeze_masks_after (range limit)"]
