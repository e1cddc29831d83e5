"""Plain-text corpora in `prepare-data`: documents cut at separator lines, other codecs, the tail
heldout split of corpora with few documents, and one big document tokenised in parallel parts
with exactly the ids of encoding it whole."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparse_lm.data import prepare as prepare_module
from sparse_lm.data.packed import PackedSplit, load_meta
from sparse_lm.data.prepare import prepare_data, tail_cut
from sparse_lm.data.sources import CorpusStats, TextFormat, iter_documents, parse_corpus
from sparse_lm.data.tokenizer import ENCODE_SEAM, Tokenizer, split_for_encoding, train_tokenizer
from sparse_lm.errors import UserError
from tests.test_data import make_docs, read_splits

VOCAB = 384
ROOT = Path(__file__).resolve().parents[1]
# One big document: code (tabs, blank lines, `#` lines: line ends that BPE pieces span) and prose.
BIG = "".join(make_docs(160, seed=3))


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "text.model"
    train_tokenizer(make_docs(48), path, VOCAB)
    return path


def documents(path: Path, **fmt) -> list[str]:
    return [text for text, _ in iter_documents(parse_corpus([str(path)], text_format=TextFormat(**fmt)), CorpusStats())]


# --------------------------------------------------------------------------------------------------
# Separators and codecs
# --------------------------------------------------------------------------------------------------


def test_separator_lines_cut_a_file_into_documents(tmp_path):
    """`%` lines (trailing blanks and CRLF allowed) and runs of blank lines separate documents; the
    separator lines are dropped, empty documents skipped; without a separator a file is one."""
    fortunes = tmp_path / "fortunes.txt"
    fortunes.write_bytes(b"first\nsaying\n%\nsecond %\n%  \r\n%\nthird\n%")
    assert documents(fortunes, doc_separator="%") == ["first\nsaying\n", "second %\n", "third\n"]
    assert documents(fortunes) == [fortunes.read_bytes().decode()]
    dictionary = tmp_path / "dict.txt"
    dictionary.write_bytes(b"\nA\n  an article\n\n \t\n\r\nAb\nabbr.\n\nAbacus\n")
    assert documents(dictionary, doc_separator="blank") == ["A\n  an article\n", "Ab\nabbr.\n", "Abacus\n"]


def test_other_codecs_and_replaced_bytes(tmp_path):
    """--encoding decodes .txt and .jsonl files; a strict UTF-8 failure names the way on;
    --errors replace turns undecodable bytes into U+FFFD."""
    path = tmp_path / "latin.txt"
    path.write_bytes("café crème\n".encode("latin-1"))
    assert documents(path, encoding="latin-1") == ["café crème\n"]
    assert documents(path, errors="replace") == ["caf\ufffd cr\ufffdme\n"]
    with pytest.raises(UserError, match=r"latin\.txt: not UTF-8 text \(invalid byte at offset 3\); .*--encoding "
                                        r"\(e\.g\. latin-1\) .*--errors replace"):
        documents(path)
    lines = tmp_path / "latin.jsonl"
    lines.write_bytes('{"text": "naïve"}\n'.encode("latin-1"))
    assert documents(lines, encoding="latin-1") == ["naïve"]
    utf16 = tmp_path / "wide.txt"
    utf16.write_bytes("wide text\n".encode("utf-16"))
    assert documents(utf16, encoding="utf-16") == ["wide text\n"]


@pytest.mark.parametrize(
    "fmt, match",
    [
        ({"encoding": "no-such-codec"}, r"--encoding 'no-such-codec': not a text codec Python knows"),
        ({"encoding": "base64"}, r"--encoding 'base64': not a text codec"),
        ({"errors": "ignore"}, r"--errors 'ignore': expected one of strict, replace"),
        ({"doc_separator": " "}, r"--doc-separator ' ': expected the text of a separator line"),
        ({"doc_separator": "a\nb"}, r"--doc-separator"),
    ],
)
def test_bad_text_options_are_one_line_errors(tmp_path, fmt, match):
    path = tmp_path / "a.txt"
    path.write_text("text\n", encoding="utf-8")
    with pytest.raises(UserError, match=match):
        prepare_data([str(path)], tmp_path / "out", VOCAB, 0.1, **fmt)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Tail heldout split
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, target, whole, expected",
    [
        (b"aa\nbb\ncc\n", 5, False, (6, True)),  # nearest line start
        (b"aa\nbb\ncc\n", 4, False, (3, True)),
        (b"aa\nbb\ncc\n", 1, True, (0, True)),  # the whole document, when allowed
        (b"aa\nbb\ncc\n", 1, False, (3, True)),
        (b"aa\nbb\n\n\n", 7, False, (3, True)),  # never a whitespace-only tail
        (b"\n\nab\ncd", 0, False, (5, True)),  # nor a whitespace-only head
        (b"abcdef", 2, False, (2, False)),  # no line start: a character boundary
        ("aé€".encode(), 2, False, (3, False)),  # never inside a character
        (b"x", 0, False, None),
        (b"  x  ", 2, False, None),
    ],
)
def test_tail_cut(data, target, whole, expected):
    assert tail_cut(data, target, whole) == expected


def test_few_documents_hold_out_the_corpus_tail(tmp_path, tok_model, capsys):
    """Three documents at fraction 0.1 (< 1 document): heldout is the last ~10% of the bytes from a
    line start; train + heldout, in order, is the corpus; the printed line says so."""
    docs = make_docs(3, seed=5)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i}.txt").write_text(doc, encoding="utf-8")
    meta = prepare_data([str(folder)], tmp_path / "out", VOCAB, 0.1, tokenizer=str(tok_model))
    splits = read_splits(tmp_path / "out")
    assert "".join(splits["train"] + splits["heldout"]) == "".join(docs)
    assert splits["heldout"] and splits["train"]
    total = sum(len(d.encode()) for d in docs)
    held = meta["splits"]["heldout"]["bytes"]
    assert held == len("".join(splits["heldout"]).encode()) == meta["heldout_tail"]["bytes"]
    longest_line = max(len(line.encode()) for d in docs for line in d.splitlines(keepends=True))
    assert abs(held - 0.1 * total) <= longest_line
    assert "".join(splits["train"]).endswith("\n")  # a line start
    out = capsys.readouterr().out
    assert "heldout: 3 documents too few to hold out whole ones at --heldout-fraction 0.1" in out
    assert f"the last {held:,} of {total:,} bytes" in out
    assert meta["split_rule"].startswith("used when documents * heldout_fraction < 1")


# --------------------------------------------------------------------------------------------------
# One big document in parallel parts
# --------------------------------------------------------------------------------------------------


def test_parts_are_cut_at_encoding_seams(tok_model):
    """Parts join to the text, each cut is a line end before a letter, digit or space, and encoding
    the parts gives exactly the ids of encoding the whole (at several part sizes)."""
    tok = Tokenizer(tok_model)
    whole = tok.encode(BIG)
    for chars in (500, 1999, 10_000):
        parts = split_for_encoding(BIG, chars)
        assert "".join(parts) == BIG and len(parts) > 3
        assert all(ENCODE_SEAM.match(a[-1] + b[0]) for a, b in itertools.pairwise(parts))
        assert [i for part in parts for i in tok.encode(part)] == whole, chars
    assert split_for_encoding("no seam\n\tanywhere\n", 3) == ["no seam\n\tanywhere\n"]


def test_big_document_tokens_do_not_depend_on_num_proc(tmp_path, tok_model, monkeypatch):
    """A single-document file tokenised in ~30 parts by 1 and by 2 processes: identical token
    files, and each split's document is exactly the encoding of its text plus one EOS."""
    monkeypatch.setattr(prepare_module, "ENCODE_PART_CHARS", len(BIG) // 30)
    path = tmp_path / "big.txt"
    path.write_text(BIG, encoding="utf-8")
    tok = Tokenizer(tok_model)
    outputs = []
    for num_proc in (1, 2):
        out = tmp_path / f"out{num_proc}"
        meta = prepare_data([str(path)], out, VOCAB, 0.05, tokenizer=str(tok_model), num_proc=num_proc)
        outputs.append({name: (out / name).read_bytes() for name in ("train.bin", "heldout.bin", "train.idx.npy",
                                                                     "heldout.idx.npy")})
        cut = meta["heldout_tail"]["offset"]
        data = BIG.encode()
        for split, text in (("train", data[:cut].decode()), ("heldout", data[cut:].decode())):
            packed = PackedSplit(out, split)
            assert packed.n_docs == 1
            assert packed.document(0).tolist() == tok.encode(text) + [tok.eos_id], (num_proc, split)
    assert outputs[0] == outputs[1]


def test_tokenizer_trains_on_whole_documents_however_they_are_encoded(tmp_path, monkeypatch):
    """Documents cut into parts for encoding reach the tokenizer trainer whole, as with no parts
    (a part boundary would be a sentence break the trainer learns from): the same sample, every item
    one train-split document, and the same tokenizer.model."""
    docs = ["".join(make_docs(24, seed=10 + i)) for i in range(10)]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i}.txt").write_text(doc, encoding="utf-8")
    samples = []

    def recording_train_tokenizer(texts, path, vocab_size):
        samples.append(list(texts))
        return train_tokenizer(samples[-1], path, vocab_size)

    monkeypatch.setattr(prepare_module, "train_tokenizer", recording_train_tokenizer)
    models = []
    for chars in (prepare_module.ENCODE_PART_CHARS, 300):
        monkeypatch.setattr(prepare_module, "ENCODE_PART_CHARS", chars)
        out = tmp_path / f"out{chars}"
        prepare_data([str(folder)], out, VOCAB, 0.2)
        models.append((out / "tokenizer.model").read_bytes())
    assert max(len(d) for d in docs) > 3 * 300  # the second build cuts every document into parts
    assert samples[0] == samples[1]
    assert sorted(samples[1]) == sorted(read_splits(tmp_path / "out300")["train"])
    assert models[0] == models[1]


# --------------------------------------------------------------------------------------------------
# The dictionary story, through the command line
# --------------------------------------------------------------------------------------------------


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparse_lm", "prepare-data", "--vocab-size", "300", "--num-proc", "2", *args],
        check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_latin1_dictionary_from_the_command_line(tmp_path):
    """A latin-1 dictionary: refused with a way on under UTF-8; with --encoding latin-1 and
    --doc-separator blank, many entries split by hash; as one document, the printed tail split."""
    entries = [f"Entr{'é' * (i % 3)}e{i}\n  n. a wörd of {i % 7} sënses; see {i * 7 % 300}.\n" for i in range(300)]
    path = tmp_path / "dict.txt"
    path.write_bytes("\n".join(entries).encode("latin-1"))

    refused = run_cli(tmp_path, "--corpus", str(path), "--out", "refused")
    error = refused.stderr.strip().splitlines()[-1]  # after the scan's progress bar
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert error.startswith("sparse-lm prepare-data: error: ") and "dict.txt: not UTF-8 text" in error
    assert "--encoding" in error and "--errors replace" in error

    split = run_cli(tmp_path, "--corpus", str(path), "--out", "entries", "--encoding", "latin-1",
                    "--doc-separator", "blank", "--heldout-fraction", "0.1")
    assert split.returncode == 0, split.stderr[-3000:]
    meta = load_meta(tmp_path / "entries")
    assert meta["sources"]["documents"] == 300 and "heldout_tail" not in meta
    assert meta["splits"]["heldout"]["documents"] > 0 and "heldout:" not in split.stdout
    texts = read_splits(tmp_path / "entries")
    assert sorted(texts["train"] + texts["heldout"]) == sorted(entries)

    whole = run_cli(tmp_path, "--corpus", str(path), "--out", "whole", "--encoding", "latin-1",
                    "--heldout-fraction", "0.1")
    assert whole.returncode == 0, whole.stderr[-3000:]
    lines = [line for line in whole.stdout.splitlines() if line.startswith("heldout: ")]
    assert len(lines) == 1 and "1 document too few" in lines[0] and "from a line start in document 1" in lines[0]
    meta = load_meta(tmp_path / "whole")
    assert meta["splits"]["heldout"]["documents"] == 1 and meta["splits"]["heldout"]["tokens"] > 1
    texts = read_splits(tmp_path / "whole")
    assert "".join(texts["train"] + texts["heldout"]) == "\n".join(entries)
    assert json.loads((tmp_path / "whole" / "meta.json").read_text())["params"]["encoding"] == "latin-1"
    assert np.load(tmp_path / "whole" / "heldout.idx.npy").tolist()[-1] == meta["splits"]["heldout"]["tokens"]
