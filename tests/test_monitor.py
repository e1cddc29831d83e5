"""`train.monitor`: DeepSpeed's own TensorBoard and CSV monitors receive the numbers metrics.jsonl
records, and a bad monitor config is one line."""

from __future__ import annotations

import csv
import importlib.util

import pytest

from sparse_lm.config import load_config
from sparse_lm.errors import UserError
from sparse_lm.train.monitor import deepspeed_monitor_config
from tests.cli_runs import REFERENCE_VARIANTS, records, run_cli, write_config


@pytest.fixture(scope="module")
def watched(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("watched")
    monitor = {"tensorboard": str(tmp / "tb"), "csv": str(tmp / "csv")}
    sections = REFERENCE_VARIANTS["topkast"] | {"train": {"monitor": monitor}}
    config = write_config(tmp, data_dir, "run", **sections)
    run_cli("pretrain", "--config", str(config))
    return tmp


def _tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_the_metrics(watched):
    pytest.importorskip("tensorboard")
    scalars = _tensorboard_scalars(watched / "tb")
    run = watched / "run"

    def expect(tag: str, kind: str, field: str) -> None:
        wanted = [(r["step"], r[field]) for r in records(run, kind)]
        assert wanted, (kind, field)
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in wanted], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in wanted], rel=1e-6), tag

    expect("step/loss", "step", "loss")
    expect("step/lr", "step", "lr")
    expect("step/grad_norm", "step", "grad_norm")
    expect("heldout/loss", "heldout", "loss")
    expect("throughput/tokens_per_s", "throughput", "tokens_per_s")
    expect("throughput/peak_rss_bytes", "throughput", "peak_rss_bytes")
    expect("reselect/changed_a", "reselect", "changed_a")
    expect("reselect/changed_b", "reselect", "changed_b")
    density = records(run, "density")
    layer = next(iter(density[0]["layers"]))
    got = scalars[f"density/layers/{layer}"]
    assert [s for s, _ in got] == [r["step"] for r in density] and len(got) >= 3
    assert [v for _, v in got] == pytest.approx([r["layers"][layer] for r in density], rel=1e-6)
    (summary,) = records(run, "summary")
    assert scalars["summary/model_state_bytes"] == [(summary["steps"], pytest.approx(summary["model_state_bytes"]))]


def test_csv_holds_the_losses(watched):
    (path,) = (watched / "csv").glob("step_loss.csv")
    with path.open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["step", "loss"]
    wanted = [(r["step"], r["loss"]) for r in records(watched / "run", "step")]
    assert [int(s) for s, _ in rows[1:]] == [s for s, _ in wanted]
    assert [float(v) for _, v in rows[1:]] == pytest.approx([v for _, v in wanted], rel=1e-6)


@pytest.mark.parametrize("monitor, expected", [
    ("{tensorbord: runs/tb}", "config field train.monitor.tensorbord: expected one of tensorboard, csv, wandb"),
    ("{tensorboard: ''}", "config field train.monitor.tensorboard: expected a directory for TensorBoard"),
    ("{csv: 3}", "config field train.monitor.csv: expected a directory for CSV files"),
    ("runs/tb", "config field train.monitor: expected a mapping"),
])
def test_bad_monitor_config_is_one_line(monitor, expected):
    with pytest.raises(UserError) as err:
        load_config(None, [f"train.monitor={monitor}"])
    assert expected in str(err.value) and "\n" not in str(err.value), err.value


def test_monitor_without_its_package_is_one_line():
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(UserError, match="train.monitor.wandb: needs the wandb package"):
        deepspeed_monitor_config({"wandb": "my-project"})
    assert deepspeed_monitor_config({"csv": "out/csv"}) == {
        "csv_monitor": {"enabled": True, "output_path": "out/csv", "job_name": ""}}
