"""tools/corpus_beyond.py: the documents a `--max-bytes` cut left out, located from meta.json alone."""

from __future__ import annotations

import json
import sys

from sparse_lm.data.prepare import prepare_data
from tests.cli_runs import REPO

sys.path.insert(0, str(REPO / "tools"))
import corpus_beyond  # noqa: E402


def _corpus(root, n=12):
    docs = [f"def f{i}(x):\n    return x * {i} + {'y' * (40 + 7 * i)!r}\n" for i in range(n)]
    root.mkdir()
    for i, text in enumerate(docs):
        (root / f"doc{i:02d}.txt").write_text(text)
    return docs


def test_writes_exactly_the_documents_after_the_cut(tmp_path):
    docs = _corpus(tmp_path / "src")
    sizes = [len(d.encode()) for d in docs]
    cut = sum(sizes[:7]) + sizes[7] // 2  # document 7 would cross the limit: it and the rest are left out
    prepare_data([str(tmp_path / "src")], tmp_path / "data", vocab_size=300, heldout_fraction=0.2, max_bytes=cut)
    out = tmp_path / "beyond.jsonl"
    assert corpus_beyond.main(["--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == docs[7:]


def test_a_changed_corpus_or_an_uncut_one_is_refused(tmp_path, capsys):
    docs = _corpus(tmp_path / "src")
    prepare_data([str(tmp_path / "src")], tmp_path / "whole", vocab_size=300, heldout_fraction=0.2)
    assert corpus_beyond.main(["--data", str(tmp_path / "whole"), "--out", str(tmp_path / "a.jsonl")]) == 2
    assert "prepared whole" in capsys.readouterr().err
    prepare_data([str(tmp_path / "src")], tmp_path / "cut", vocab_size=300, heldout_fraction=0.2,
                 max_bytes=sum(len(d.encode()) for d in docs[:5]))
    (tmp_path / "src" / "doc03.txt").write_text("changed\n")
    assert corpus_beyond.main(["--data", str(tmp_path / "cut"), "--out", str(tmp_path / "b.jsonl")]) == 2
    assert "sources.sha256 differs" in capsys.readouterr().err
    assert not (tmp_path / "b.jsonl").exists()
