"""Session fixtures shared by the CLI tests."""

from pathlib import Path

import pytest

from sparse_lm.data.prepare import prepare_data
from tests.cli_runs import REFERENCE_VARIANTS, run_cli, write_config


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A small prepared stdlib dataset (vocab 512, ~400 kB of text)."""
    out = tmp_path_factory.mktemp("data") / "stdlib"
    prepare_data(["stdlib"], out, vocab_size=512, heldout_fraction=0.05, max_bytes=400_000)
    return out


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory, data_dir):
    """`reference_runs(variant)`: the run directory of one single-process `sparse-lm pretrain` of
    `cli_runs.REFERENCE_VARIANTS[variant]`, trained on first use and shared by every test file that
    compares a resumed, relaunched or parallel run with it."""
    done: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in done:
            tmp = tmp_path_factory.mktemp(variant)
            config = write_config(tmp, data_dir, "ref", **REFERENCE_VARIANTS[variant])
            proc = run_cli("pretrain", "--config", str(config), "--summary-json", str(tmp / "ref" / "summary.json"))
            assert "held-out loss" in proc.stdout
            done[variant] = tmp / "ref"
        return done[variant]

    return get
