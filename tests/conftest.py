"""Session fixtures shared by the CLI tests."""

from pathlib import Path

import pytest

from sparse_lm.data.prepare import prepare_data


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A small prepared stdlib dataset (vocab 512, ~400 kB of text)."""
    out = tmp_path_factory.mktemp("data") / "stdlib"
    prepare_data(["stdlib"], out, vocab_size=512, heldout_fraction=0.05, max_bytes=400_000)
    return out
