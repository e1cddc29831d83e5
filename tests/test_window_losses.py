"""tools/window_losses.py: per-window losses agree with `sparse-lm eval`, the trained/fresh split is
the sampler's, and a comparison is the paired difference of two checkpoints on the same windows."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from sparse_lm.data.packed import PackedSplit
from sparse_lm.eval.cli import evaluate
from sparse_lm.train.batches import WindowSampler
from tests.cli_runs import REPO

sys.path.insert(0, str(REPO / "tools"))
import window_losses  # noqa: E402


def _score(run, tmp_path, name, capsys, *extra):
    out = tmp_path / f"{name}.json"
    assert window_losses.main(["score", "--checkpoint", str(run / "checkpoints"), "--out", str(out),
                               "--trained", "10", "--fresh", "30", *extra]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


def _mean(scores, name):
    s = scores["sets"][name]
    return float(np.dot(s["loss"], s["tokens"]) / np.sum(s["tokens"]))


def test_scores_match_eval_and_the_samplers_split(reference_runs, data_dir, tmp_path, capsys):
    run = reference_runs("dense")
    corpus = tmp_path / "extra.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def g{i}(a, b):\n    return a * {i} - b\n"}) + "\n"
                              for i in range(40)))
    scores = _score(run, tmp_path, "dense", capsys, "--corpus", f"extra={corpus}")
    for name, spec in (("heldout", "heldout"), ("extra", str(corpus))):
        ref = evaluate(str(run / "checkpoints"), [spec], context=32, stride=32, batch_size=4, data_dir=None,
                       progress=False)
        assert _mean(scores, name) == pytest.approx(ref["loss"], abs=1e-6)
        assert sum(scores["sets"][name]["tokens"]) == ref["tokens"]

    split = PackedSplit(data_dir, "train")
    sampler = WindowSampler(split, 32, seed=scores["seed"])
    assert scores["samples_seen"] == 12 * 4
    consumed = [sampler.sample(g).tobytes() for g in range(scores["samples_seen"])]
    trained, fresh = scores["sets"]["trained"], scores["sets"]["fresh"]
    assert len(trained["windows"]) == 10 and len(fresh["windows"]) == 30
    assert all(sampler.window(w).tobytes() in consumed for w in trained["windows"])
    assert not any(sampler.window(w).tobytes() in consumed for w in fresh["windows"])
    offsets = list(split.doc_offsets)
    doc_of = [max(d for d in range(split.n_docs) if offsets[d] <= w * 32) for w in range(sampler.windows)]
    mask = sampler.trained_on(scores["samples_seen"])
    expected_before = ["first" if w == 0 or doc_of[w - 1] != doc_of[w] else "trained" if mask[w - 1] else "fresh"
                       for w in range(sampler.windows)]
    assert window_losses.document_seen(split, 32, mask)[1].tolist() == expected_before
    assert {"first", "trained", "fresh"} <= set(expected_before)
    for w, seen, before in zip(fresh["windows"], fresh["doc_seen"], fresh["before"]):
        same_doc = [v for v in range(sampler.windows) if doc_of[v] == doc_of[w]]
        assert seen == pytest.approx(sum(mask[v] for v in same_doc) / len(same_doc))
        assert before == expected_before[w]


def test_compare_is_the_paired_difference_on_the_same_windows(reference_runs, tmp_path, capsys):
    a = _score(reference_runs("topkast"), tmp_path, "a", capsys)
    b = _score(reference_runs("dense"), tmp_path, "b", capsys)
    table = window_losses.compare(a, b)
    for name in ("trained", "fresh", "heldout"):
        line = next(row for row in table.splitlines() if row.startswith(f"| {name} |"))
        diff = float(line.split("|")[5].split("±")[0])
        assert diff == pytest.approx(_mean(a, name) - _mean(b, name), abs=1e-4)
    assert sum("fresh, document" in row for row in table.splitlines()) >= 2
    assert any(row.startswith("| fresh, the window before") for row in table.splitlines())

    b["seq_len"] = 16
    with pytest.raises(window_losses.UserError, match=r"^seq_len: 32 in the first file, 16 in the second"):
        window_losses.compare(a, b)


def test_bad_arguments_and_files_are_one_line(reference_runs, tmp_path, capsys):
    argv = ["score", "--checkpoint", str(reference_runs("dense") / "checkpoints"), "--out", str(tmp_path / "x.json")]
    assert window_losses.main([*argv, "--corpus", "heldout=foo.jsonl"]) == 2
    assert "--corpus heldout=foo.jsonl: expected NAME=PATH with a new NAME" in capsys.readouterr().err
    assert window_losses.main([*argv, "--every", "0"]) == 2
    assert "--every 0: expected an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    (tmp_path / "half.json").write_text('{"sets": ')
    assert window_losses.main(["compare", str(tmp_path / "half.json"), str(tmp_path / "x.json")]) == 2
    assert "half.json: cannot read a score file (JSONDecodeError)" in capsys.readouterr().err
