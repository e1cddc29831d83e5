"""`sparse-lm plan` answers for the model `pretrain` builds: where the data is prepared, its
tokenizer's vocabulary (not `data.vocab_size`), resolved by pretrain's own preflight."""

from __future__ import annotations

import pytest

from sparse_lm.config import load_config
from sparse_lm.errors import UserError
from sparse_lm.plan.cli import format_report, plan
from sparse_lm.train.preflight import check_run
from tests.cli_runs import REPO


def _config(data_path, tmp_path, *overrides):
    return load_config(REPO / "configs/tiny.yaml", [f"data.path={data_path}", "data.vocab_size=32000",
                                                    f"train.out_dir={tmp_path / 'run'}", *overrides])


def test_the_plan_sizes_the_vocabulary_as_pretrain_does(data_dir, tmp_path):
    report = plan(_config(data_dir, tmp_path))
    pretrained = _config(data_dir, tmp_path)
    check_run(pretrained)  # what pretrain resolves before it builds the model
    assert report["vocabulary"]["source"] == "data"
    assert report["model"]["vocab_size"] == report["vocabulary"]["size"] == pretrained.model.vocab_size < 32000
    assert f"vocabulary: {pretrained.model.vocab_size} from the tokenizer of the prepared data" in format_report(report)


def test_without_prepared_data_the_plan_says_it_used_data_vocab_size(tmp_path):
    report = plan(_config(tmp_path / "not-prepared", tmp_path))
    assert report["vocabulary"]["source"] == "data.vocab_size" and report["vocabulary"]["size"] == 32000
    assert "holds no prepared data yet" in format_report(report)


def test_a_model_vocabulary_below_the_tokenizers_is_one_line(data_dir, tmp_path):
    with pytest.raises(UserError, match="model.vocab_size: expected at least the tokenizer's 512, got 100"):
        plan(_config(data_dir, tmp_path, "model.vocab_size=100"))


@pytest.mark.parametrize("granularity, says", [("element", "element mode runs the dense tile path"),
                                               ("block", "16x16 blocks run the Triton block kernels")])
def test_the_plan_says_what_a_gpu_runs(tmp_path, granularity, says):
    report = plan(_config(tmp_path, tmp_path, f"sparsity.granularity={granularity}", "sparsity.block_size=16"))
    assert f"on a GPU: {says}" in format_report(report)
