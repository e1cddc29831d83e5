"""The data pipeline (`sparse_lm.data`): tokenizer, sources, split rule, packing, rebuilds, errors.

Expectations are computed here from the inputs (document texts, their sha256, per-document encodes),
never read back from the code under test. Corpora are small files under tmp_path; no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparse_lm.data import sources as sources_module
from sparse_lm.data.packed import PackedSplit, load_meta
from sparse_lm.data.prepare import assign_heldout, prepare_data
from sparse_lm.data.tokenizer import CHUNK_BYTES, Tokenizer, _chunks, train_tokenizer
from sparse_lm.errors import UserError

VOCAB = 384
FRACTION = 0.25
OUTPUT_FILES = ("meta.json", "tokenizer.model", "train.bin", "heldout.bin", "train.idx.npy", "heldout.idx.npy")


# --------------------------------------------------------------------------------------------------
# Helpers: corpora, the split rule written out independently, reading a prepared dataset back
# --------------------------------------------------------------------------------------------------


def make_docs(n: int, seed: int = 0) -> list[str]:
    """`n` distinct documents cycling through code (spaces, tabs), prose, non-BMP/CJK text and
    whitespace edge cases (leading/trailing blanks, CRLF, blank lines)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(120)]

    def sentence(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    docs = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            body = "".join(
                f"def {rng.choice(words)}_{j}(x, y=1):\n    if x:\n\treturn x + y  # {sentence(3)}\n        pass\n\n"
                for j in range(rng.randint(2, 6))
            )
        elif kind == 1:
            body = "\n".join(sentence(rng.randint(4, 14)) + "." for _ in range(rng.randint(3, 10))) + "\n"
        elif kind == 2:
            body = f"{sentence(5)} 🙂🎉 汉字 日本語のテキスト 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 {sentence(4)}\nﬁ Ａ e\u0301 Å\n"
        else:
            body = f"   {sentence(6)}  \r\n\r\n\t{sentence(3)}\t\n\n\n"
        docs.append(f"{body}# doc {i}\n")
    return docs


DOCS = make_docs(48)
BLANKS = ["", "   \n\t\n", "\n"]  # skipped: empty or whitespace only


def hash_key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def expected_heldout_mask(texts: list[str], fraction: float) -> list[bool]:
    """SPLIT_RULE in plain Python integers, independent of `assign_heldout`."""
    keys = [hash_key(t) for t in texts]
    mask = [k < fraction * 2**64 for k in keys]
    if len(keys) >= 2 and not any(mask):
        mask = [k == min(keys) for k in keys]
    if all(mask):
        mask = [k != max(keys) for k in keys]
    if len(keys) >= 2 and not any(mask):
        mask = [False] * (len(keys) - 1) + [True]
    return mask


def expected_splits(texts: list[str], fraction: float) -> dict[str, list[str]]:
    """Non-blank documents of each split, in corpus order."""
    texts = [t for t in texts if t.strip()]
    mask = expected_heldout_mask(texts, fraction)
    return {
        "train": [t for t, held in zip(texts, mask) if not held],
        "heldout": [t for t, held in zip(texts, mask) if held],
    }


def read_split(out: Path, split: str) -> list[str]:
    """Decoded documents of a split, checking that each ends with (exactly one) EOS."""
    meta = load_meta(out)
    tok = Tokenizer(out / meta["tokenizer"])
    packed = PackedSplit(out, split)
    texts = []
    for i in range(packed.n_docs):
        doc = packed.document(i)
        assert doc[-1] == meta["eos_id"], f"{split} document {i} does not end with EOS"
        assert not (doc[:-1] == meta["eos_id"]).any(), f"{split} document {i} has an EOS inside"
        texts.append(tok.decode(doc[:-1]))
    return texts


def read_splits(out: Path) -> dict[str, list[str]]:
    return {split: read_split(out, split) for split in ("train", "heldout")}


def write_txt(folder: Path, docs: list[str], prefix: str = "doc") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"{prefix}{i:03d}.txt").write_bytes(doc.encode("utf-8"))
    return folder


def write_jsonl(path: Path, records: list, ensure_ascii: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records), encoding="utf-8")
    return path


def file_ids(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every output file: both change if a file is rewritten or replaced."""
    return {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in OUTPUT_FILES}


def leftovers(parent: Path) -> list[str]:
    """Hidden staging / moved-aside directories that a finished run must not leave behind."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory) -> Path:
    """A tokenizer trained once on DOCS, passed as `tokenizer=` where training is not under test."""
    path = tmp_path_factory.mktemp("tokenizer") / "given.model"
    train_tokenizer(DOCS, path, VOCAB)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """DOCS (plus blank files) as a .txt directory, prepared with a freshly trained tokenizer."""
    root = tmp_path_factory.mktemp("prepared")
    corpus = write_txt(root / "corpus", DOCS + BLANKS)
    prepare_data([str(corpus)], root / "out", VOCAB, FRACTION, num_proc=1)
    return root / "out"


# --------------------------------------------------------------------------------------------------
# 1. Tokenizer
# --------------------------------------------------------------------------------------------------

ROUND_TRIP_TEXTS = {
    "ascii": "Hello, world! 1234567890 ~`@#$%^&*()_+-=[]{}|;':\",./<>?",
    "code": "class A:\n    def f(self):\n\tif x:\n\t\treturn [i for i in range(10)]  \n\n\n    pass\n",
    "blanks": "   leading and trailing   \n\n\t \t\n",
    "crlf_and_controls": "a\r\nb\r\n\x0b\x0c\x1f end",
    "emoji": "🙂🎉👩‍👩‍👧 flags 🇯🇵 ok",
    "cjk": "汉字 日本語のテキスト 한국어 𠜎𠜱𠝹 (non-BMP CJK)",
    "unseen_non_bmp": "𓀀𓁐 𝄞 🜁",  # characters the tokenizer never saw: byte fallback only
    "not_normalised": "ﬁ Ａ e\u0301 A\u030a Å ½ \u00a0 x\u2028y",  # NFKC would change all of these
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_TEXTS))
def test_round_trip_is_lossless(tok_model, name):
    """decode(encode(text)) == text for any UTF-8 text, with no <unk> (byte fallback, identity
    normalisation, no dummy prefix, whitespace kept)."""
    tok = Tokenizer(tok_model)
    text = ROUND_TRIP_TEXTS[name]
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_unseen_characters_fall_back_to_utf8_bytes(tok_model):
    """A character absent from training becomes one token per UTF-8 byte, not <unk>."""
    tok = Tokenizer(tok_model)
    for char in ("𓀀", "𝄞", "🜁"):
        assert len(char.encode("utf-8")) == 4
        assert len(tok.encode(char)) == 4
        assert tok.decode(tok.encode(char)) == char


def test_identity_normalisation_keeps_distinct_forms_distinct(tok_model):
    """Compatibility forms are not folded: "ﬁ" != "fi", "Ａ" != "A", composed != decomposed."""
    tok = Tokenizer(tok_model)
    for a, b in (("ﬁ", "fi"), ("Ａ", "A"), ("\u00c5", "A\u030a")):
        assert tok.encode(a) != tok.encode(b)


def test_encode_batch_and_numpy_decode(tok_model):
    """encode_batch agrees with encode; decode accepts numpy uint16 slices as stored in .bin files."""
    tok = Tokenizer(tok_model)
    texts = list(ROUND_TRIP_TEXTS.values())
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    for text, ids in zip(texts, batch):
        assert tok.decode(np.array(ids, dtype=np.uint16)) == text


def test_tokenizer_special_ids(tok_model):
    """The trained model has the EOS that separates packed documents, distinct from unk/bos, and
    exactly the requested vocabulary size."""
    tok = Tokenizer(tok_model)
    assert tok.vocab_size == VOCAB
    assert tok.eos_id >= 0 and len({tok.eos_id, tok.bos_id, tok.unk_id}) == 3
    assert tok.sha256 == hashlib.sha256(tok_model.read_bytes()).hexdigest()


def test_training_chunks_are_lossless_and_bounded():
    """Training sentences never exceed CHUNK_BYTES (sentencepiece would silently drop them) and
    concatenate back to the document, long multi-byte lines included."""
    texts = [
        "x" * (3 * CHUNK_BYTES + 7),
        "汉" * (CHUNK_BYTES + 3) + "\nshort\n",
        "".join(f"line {i} 🙂\n" for i in range(2000)),
        "no newline at end",
    ]
    for text in texts:
        chunks = list(_chunks([text]))
        assert "".join(chunks) == text
        assert all(0 < len(c.encode("utf-8")) <= CHUNK_BYTES for c in chunks)


def test_tokenizer_file_errors(tmp_path):
    """A missing, corrupt or empty .model file is a UserError naming it."""
    missing = tmp_path / "missing.model"
    with pytest.raises(UserError, match="missing.model"):
        Tokenizer(missing)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"definitely not a protobuf \xff\x00" * 10)
    with pytest.raises(UserError, match="garbage.model.*not a valid sentencepiece"):
        Tokenizer(garbage)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty.model: not a valid sentencepiece"):
        Tokenizer(empty)


# --------------------------------------------------------------------------------------------------
# 2. Packing
# --------------------------------------------------------------------------------------------------


def test_packed_documents_decode_to_the_originals(prepared):
    """Each split holds exactly its documents, in corpus order, each decoding to the original text
    and ending with EOS."""
    assert read_splits(prepared) == expected_splits(DOCS + BLANKS, FRACTION)


def test_splits_are_disjoint_and_cover_every_non_empty_document(prepared):
    """No document is in both splits, none is lost, blank documents are dropped."""
    splits = read_splits(prepared)
    assert splits["train"] and splits["heldout"]
    assert not set(splits["train"]) & set(splits["heldout"])
    assert sorted(splits["train"] + splits["heldout"]) == sorted(DOCS)


def test_meta_counts_and_files_match_the_inputs(prepared):
    """meta.json's per-split documents/tokens/bytes, the dtype, the .bin sizes and the offsets all
    agree with per-document encodes of the inputs."""
    meta = load_meta(prepared)
    tok = Tokenizer(prepared / "tokenizer.model")
    assert meta["dtype"] == "uint16"
    assert meta["vocab_size"] == VOCAB and meta["tokenizer_trained"] is True
    assert meta["eos_id"] == tok.eos_id and meta["tokenizer_sha256"] == tok.sha256
    for split, texts in expected_splits(DOCS, FRACTION).items():
        lengths = [len(tok.encode(t)) + 1 for t in texts]
        info = meta["splits"][split]
        assert info["documents"] == len(texts)
        assert info["tokens"] == sum(lengths)
        assert info["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
        assert (prepared / info["file"]).stat().st_size == 2 * sum(lengths)
        packed = PackedSplit(prepared, split)
        assert packed.tokens.dtype == np.uint16
        assert packed.doc_offsets.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    stats = meta["sources"]
    assert stats["documents"] == len(DOCS)
    assert stats["bytes"] == sum(len(t.encode("utf-8")) for t in DOCS)
    assert stats["skipped_empty"] == len(BLANKS)
    assert stats["max_bytes_reached"] is False


def test_trained_build_is_reproducible(prepared, tmp_path):
    """Preparing the same corpus again from scratch gives byte-identical tokenizer and token files."""
    corpus = write_txt(tmp_path / "corpus", DOCS + BLANKS)
    prepare_data([str(corpus)], tmp_path / "out", VOCAB, FRACTION)
    for name in ("tokenizer.model", "train.bin", "heldout.bin", "train.idx.npy", "heldout.idx.npy"):
        assert (tmp_path / "out" / name).read_bytes() == (prepared / name).read_bytes(), name


def test_single_document_is_cut_into_train_and_heldout(tmp_path, tok_model):
    """A one-document corpus is cut in two: train keeps its head, heldout its tail (never empty)."""
    corpus = tmp_path / "one.txt"
    corpus.write_text("the only document\n", encoding="utf-8")
    meta = prepare_data([str(corpus)], tmp_path / "out", VOCAB, 0.99, tokenizer=str(tok_model))
    splits = read_splits(tmp_path / "out")
    assert splits["train"] and splits["heldout"]
    assert "".join(splits["train"] + splits["heldout"]) == "the only document\n"
    assert meta["splits"]["heldout"]["documents"] == 1 and meta["heldout_tail"]["document"] == 0


def test_corrupt_token_file_is_detected(tmp_path, tok_model):
    """PackedSplit refuses a truncated .bin and a missing meta.json with a UserError."""
    corpus = write_txt(tmp_path / "corpus", DOCS[:8])
    out = tmp_path / "out"
    prepare_data([str(corpus)], out, VOCAB, 0.5, tokenizer=str(tok_model))
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data[:-2])
    with pytest.raises(UserError, match="train.bin.*truncated"):
        PackedSplit(out, "train")
    with pytest.raises(UserError, match="meta.json: not found"):
        load_meta(tmp_path / "corpus")


# --------------------------------------------------------------------------------------------------
# 3. Split determinism
# --------------------------------------------------------------------------------------------------


def test_split_depends_only_on_document_content(tmp_path, tok_model):
    """One .jsonl in order, three .txt directories in reverse order, or a parquet file: every
    layout puts the same texts in heldout, the ones the hash rule picks."""
    docs = DOCS[:40]
    layouts = {
        "jsonl": [str(write_jsonl(tmp_path / "one.jsonl", [{"text": d} for d in docs]))],
        "reversed_txt": [
            str(write_txt(tmp_path / "part0", docs[::-1][:13])),
            str(write_txt(tmp_path / "part1", docs[::-1][13:27])),
            str(write_txt(tmp_path / "part2", docs[::-1][27:])),
        ],
        "shuffled_parquet": [str(tmp_path / "shuffled.parquet")],
    }
    shuffled = docs[:]
    random.Random(3).shuffle(shuffled)
    pq.write_table(pa.table({"text": shuffled}), tmp_path / "shuffled.parquet")
    expected = expected_splits(docs, FRACTION)
    assert expected["heldout"] and expected["train"]
    for name, corpus in layouts.items():
        out = tmp_path / f"out_{name}"
        prepare_data(corpus, out, VOCAB, FRACTION, tokenizer=str(tok_model))
        splits = read_splits(out)
        assert sorted(splits["heldout"]) == sorted(expected["heldout"]), name
        assert sorted(splits["train"]) == sorted(expected["train"]), name


def test_identical_documents_share_a_split(tmp_path, tok_model):
    """Copies of a document never straddle train and heldout (no leakage through duplicates)."""
    docs = DOCS[:12] * 3
    corpus = write_jsonl(tmp_path / "dups.jsonl", [{"text": d} for d in docs])
    prepare_data([str(corpus)], tmp_path / "out", VOCAB, 0.3, tokenizer=str(tok_model))
    splits = read_splits(tmp_path / "out")
    assert not set(splits["train"]) & set(splits["heldout"])
    assert all(splits["train"].count(d) + splits["heldout"].count(d) == 3 for d in DOCS[:12])


def test_assign_heldout_follows_the_rule_and_never_empties_a_split():
    """Random keys (with ties), extreme fractions: train is never empty, heldout never empty with
    >= 2 documents, and the mask equals SPLIT_RULE computed in Python integers."""
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 17, 100):
        for fraction in (1e-12, 0.02, 0.25, 0.5, 0.98, 1 - 1e-12):
            for duplicates in (False, True):
                keys = rng.integers(0, 2**64, size=n, dtype=np.uint64)
                if duplicates:
                    keys = rng.choice(keys[: max(1, n // 3)], size=n)
                mask = assign_heldout(keys, fraction)
                assert mask.dtype == bool and mask.shape == (n,)
                assert not mask.all()
                assert n < 2 or mask.any()
                plain = [int(k) < fraction * 2**64 for k in keys]
                if any(plain) and not all(plain):
                    assert mask.tolist() == plain
                for k in np.unique(keys):  # equal keys share a split unless all keys are equal
                    if len(np.unique(keys)) > 1:
                        assert len(set(mask[keys == k].tolist())) == 1


@pytest.mark.parametrize(
    "keys, fraction, expected",
    [
        ([5], 0.999, [False]),  # one document: train, even if its hash says heldout
        ([5, 9, 5, 7], 1e-30, [True, False, True, False]),  # nothing under the cut: smallest hash
        ([5, 9, 9, 7], 0.999, [True, False, False, True]),  # everything under it: largest go to train
        ([4, 4, 4], 1e-30, [False, False, True]),  # one distinct text: its last copy is heldout
        ([4, 4, 4], 0.999, [False, False, True]),
    ],
)
def test_assign_heldout_fallbacks(keys, fraction, expected):
    """The documented fallbacks of SPLIT_RULE, case by case."""
    assert assign_heldout(np.array(keys, dtype=np.uint64), fraction).tolist() == expected


def test_assign_heldout_ignores_order():
    """Permuting documents permutes the mask: the split never depends on corpus order."""
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 2**64, size=200, dtype=np.uint64)
    perm = rng.permutation(200)
    assert (assign_heldout(keys[perm], 0.1) == assign_heldout(keys, 0.1)[perm]).all()


# --------------------------------------------------------------------------------------------------
# 4. Rebuilds
# --------------------------------------------------------------------------------------------------


def test_rerun_with_same_inputs_is_a_no_op(tmp_path, capsys):
    """A second run with unchanged inputs rewrites nothing and says "up to date"."""
    corpus = write_txt(tmp_path / "corpus", DOCS[:20])
    out = tmp_path / "out"
    first = prepare_data([str(corpus)], out, VOCAB, FRACTION)
    before = file_ids(out)
    capsys.readouterr()
    second = prepare_data([str(corpus)], out, VOCAB, FRACTION, num_proc=2)  # num_proc is not an input
    assert "up to date" in capsys.readouterr().out
    assert file_ids(out) == before
    assert second == first
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("change", ["edit_file", "add_file", "heldout_fraction"])
def test_changed_inputs_trigger_a_rebuild(tmp_path, tok_model, capsys, change):
    """Editing or adding a source file, or changing a parameter, rebuilds with the new content."""
    docs = DOCS[:16]
    corpus = write_txt(tmp_path / "corpus", docs)
    out = tmp_path / "out"
    first = prepare_data([str(corpus)], out, VOCAB, FRACTION, tokenizer=str(tok_model))
    before = file_ids(out)
    fraction = FRACTION
    if change == "edit_file":
        docs[3] = "an edited document\n"
        (corpus / "doc003.txt").write_text(docs[3], encoding="utf-8")
    elif change == "add_file":
        docs.append("a new document\n")
        (corpus / "doc999.txt").write_text(docs[-1], encoding="utf-8")
    else:
        fraction = 0.6
    capsys.readouterr()
    second = prepare_data([str(corpus)], out, VOCAB, fraction, tokenizer=str(tok_model))
    assert "up to date" not in capsys.readouterr().out
    assert second["fingerprint"] != first["fingerprint"]
    assert load_meta(out)["fingerprint"] == second["fingerprint"]
    assert file_ids(out)["meta.json"] != before["meta.json"]
    assert read_splits(out) == expected_splits(docs, fraction)
    assert leftovers(tmp_path) == []


def test_damaged_output_is_rebuilt(tmp_path, tok_model, capsys):
    """A truncated token file is not "up to date": the next run rebuilds it."""
    corpus = write_txt(tmp_path / "corpus", DOCS[:10])
    out = tmp_path / "out"
    prepare_data([str(corpus)], out, VOCAB, 0.5, tokenizer=str(tok_model))
    (out / "heldout.bin").write_bytes((out / "heldout.bin").read_bytes()[:-1])
    capsys.readouterr()
    prepare_data([str(corpus)], out, VOCAB, 0.5, tokenizer=str(tok_model))
    assert "up to date" not in capsys.readouterr().out
    assert read_splits(out) == expected_splits(DOCS[:10], 0.5)
    for damaged in (b"", (out / "train.idx.npy").read_bytes()[:-3]):  # emptied, cut short
        (out / "train.idx.npy").write_bytes(damaged)
        with pytest.raises(UserError, match=r"train.idx.npy: missing or not a .npy array; run `sparse-lm prepare-data"):
            PackedSplit(out, "train")
        prepare_data([str(corpus)], out, VOCAB, 0.5, tokenizer=str(tok_model))
        assert "up to date" not in capsys.readouterr().out
        assert read_splits(out) == expected_splits(DOCS[:10], 0.5)


def test_failed_rebuild_keeps_the_previous_dataset(tmp_path, tok_model):
    """A build that fails midway (tokenizer training) leaves the old dataset untouched and no
    staging directories behind."""
    corpus = write_txt(tmp_path / "corpus", DOCS[:10])
    out = tmp_path / "out"
    prepare_data([str(corpus)], out, VOCAB, 0.5, tokenizer=str(tok_model))
    before = file_ids(out)
    with pytest.raises(UserError, match="cannot train a tokenizer with vocab size 60000"):
        prepare_data([str(corpus)], out, 60000, 0.5)
    assert file_ids(out) == before
    assert read_splits(out) == expected_splits(DOCS[:10], 0.5)
    assert leftovers(tmp_path) == []


def test_num_proc_does_not_change_the_output(tmp_path, tok_model):
    """num_proc=2 writes byte-identical token and index files to num_proc=1, on a corpus large
    enough to span several map and pack batches."""
    rng = random.Random(7)
    docs = [f"{i} " + " ".join(rng.choice(["def", "x", "  ", "\t", "🙂", "汉字", "\n"])
                               for _ in range(rng.randint(1, 12)))
            for i in range(5000)]
    corpus = write_jsonl(tmp_path / "many.jsonl", [{"text": d} for d in docs])
    outs = {}
    for num_proc in (1, 2):
        outs[num_proc] = tmp_path / f"out{num_proc}"
        prepare_data([str(corpus)], outs[num_proc], VOCAB, 0.1, tokenizer=str(tok_model), num_proc=num_proc)
    for name in ("train.bin", "heldout.bin", "train.idx.npy", "heldout.idx.npy"):
        assert (outs[1] / name).read_bytes() == (outs[2] / name).read_bytes(), name
    assert read_splits(outs[2]) == expected_splits(docs, 0.1)


# --------------------------------------------------------------------------------------------------
# 5. Sources
# --------------------------------------------------------------------------------------------------


def test_jsonl_with_text_field(tmp_path, tok_model):
    """.jsonl: the chosen field, other fields ignored, blank lines and empty texts skipped, \\u
    escapes (surrogate pairs included) decoded."""
    path = tmp_path / "c.jsonl"
    lines = [
        json.dumps({"id": 1, "body": "first 🙂 doc\n"}, ensure_ascii=True),
        "",
        json.dumps({"body": "second\tdoc", "text": "not this one"}),
        json.dumps({"body": "  "}),
        json.dumps({"body": "汉字 third"}, ensure_ascii=False),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = prepare_data([str(path)], tmp_path / "out", VOCAB, 0.5, tokenizer=str(tok_model), text_field="body")
    docs = ["first 🙂 doc\n", "second\tdoc", "汉字 third"]
    assert read_splits(tmp_path / "out") == expected_splits(docs, 0.5)
    assert meta["sources"]["skipped_empty"] == 1 and meta["params"]["text_field"] == "body"


def test_parquet_column(tmp_path, tok_model):
    """.parquet: the chosen string column across several row groups, nulls skipped."""
    texts = [f"parquet row {i} 🙂\n" if i % 5 else None for i in range(23)]
    pq.write_table(pa.table({"id": list(range(23)), "content": texts}), tmp_path / "c.parquet", row_group_size=4)
    meta = prepare_data([str(tmp_path / "c.parquet")], tmp_path / "out", VOCAB, 0.3,
                        tokenizer=str(tok_model), text_field="content")
    docs = [t for t in texts if t is not None]
    assert read_splits(tmp_path / "out") == expected_splits(docs, 0.3)
    assert meta["sources"]["skipped_empty"] == texts.count(None)


def test_directory_mixes_formats_in_sorted_path_order(tmp_path, tok_model):
    """A directory yields its .txt/.jsonl/.parquet files sorted by relative path; hidden files and
    directories and other extensions are ignored; several specs keep their order."""
    root = tmp_path / "corpus"
    (root / "a").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("from b.txt\n", encoding="utf-8")
    write_jsonl(root / "a" / "z.jsonl", [{"text": "from a/z.jsonl one"}, {"text": "from a/z.jsonl two"}])
    pq.write_table(pa.table({"text": ["from a/y.parquet"]}), root / "a" / "y.parquet")
    (root / "notes.md").write_text("ignored markdown\n", encoding="utf-8")
    (root / ".hidden.txt").write_text("ignored hidden file\n", encoding="utf-8")
    (root / ".git" / "x.txt").write_text("ignored hidden dir\n", encoding="utf-8")
    extra = tmp_path / "extra.txt"
    extra.write_text("from extra.txt\n", encoding="utf-8")
    docs = ["from a/y.parquet", "from a/z.jsonl one", "from a/z.jsonl two", "from b.txt\n", "from extra.txt\n"]
    meta = prepare_data([str(root), str(extra)], tmp_path / "out", VOCAB, 0.4, tokenizer=str(tok_model))
    assert read_splits(tmp_path / "out") == expected_splits(docs, 0.4)
    assert meta["sources"]["specs"] == [str(root.resolve()), str(extra.resolve())]


def test_max_bytes_keeps_the_leading_documents(tmp_path, tok_model):
    """max_bytes keeps the first documents that fit in total (an exact fit included) and stops at
    the first that does not, even if a later one would fit."""
    docs = ["a" * 10, "b" * 10, "c" * 3, "d" * 10, "e"]
    corpus = write_txt(tmp_path / "corpus", docs)
    for max_bytes in (23, 25):
        out = tmp_path / f"out{max_bytes}"
        meta = prepare_data([str(corpus)], out, VOCAB, 0.5, tokenizer=str(tok_model), max_bytes=max_bytes)
        assert sorted(sum(read_splits(out).values(), [])) == docs[:3]
        assert meta["sources"]["documents"] == 3 and meta["sources"]["bytes"] == 23
        assert meta["sources"]["max_bytes_reached"] is True
    with pytest.raises(UserError, match="--max-bytes 5: smaller than the first document"):
        prepare_data([str(corpus)], tmp_path / "out5", VOCAB, 0.5, tokenizer=str(tok_model), max_bytes=5)


def expected_stdlib_docs(max_bytes: int) -> list[str]:
    """The stdlib corpus written out: .py files under the stdlib root (no site-/dist-packages, no
    hidden files) by sorted relative path, UTF-8 without NUL, non-blank, up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages")]
        rel += [Path(folder, n).relative_to(root).as_posix()
                for n in names if n.endswith(".py") and not n.startswith(".")]
    docs, total = [], 0
    for name in sorted(rel):
        raw = (root / name).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if b"\0" in raw or not text.strip():
            continue
        if total + len(raw) > max_bytes:
            break
        docs.append(text)
        total += len(raw)
    return docs


def test_stdlib_corpus_with_max_bytes(tmp_path):
    """`stdlib` yields the leading standard-library files, tokenised losslessly by a trained model."""
    meta = prepare_data(["stdlib"], tmp_path / "out", 512, 0.1, max_bytes=300_000)
    docs = expected_stdlib_docs(300_000)
    assert len(docs) >= 3
    assert meta["sources"]["documents"] == len(docs)
    assert meta["sources"]["bytes"] == sum(len(d.encode("utf-8")) for d in docs) <= 300_000
    assert meta["sources"]["max_bytes_reached"] is True
    assert meta["vocab_size"] == 512
    assert read_splits(tmp_path / "out") == expected_splits(docs, 0.1)


def test_stdlib_skips_non_utf8_files(tmp_path, tok_model, monkeypatch):
    """In the stdlib corpus a non-UTF-8 or binary file is skipped and counted, not an error."""
    files = []
    for name, data in [("a.py", b"x = 1\n"), ("b.py", b"y = '\xff'\n"), ("c.py", b"\0\0"), ("d.py", b"z = 2\n")]:
        files.append(tmp_path / name)
        files[-1].write_bytes(data)
    monkeypatch.setattr(sources_module, "stdlib_files", lambda: files)
    meta = prepare_data(["stdlib"], tmp_path / "out", VOCAB, 0.5, tokenizer=str(tok_model))
    assert sorted(sum(read_splits(tmp_path / "out").values(), [])) == ["x = 1\n", "z = 2\n"]
    assert meta["sources"]["skipped_non_utf8"] == 2


# --------------------------------------------------------------------------------------------------
# 6. Errors
# --------------------------------------------------------------------------------------------------


def prepare(tmp_path: Path, corpus: list[str], **kwargs):
    kwargs = {"vocab_size": VOCAB, "heldout_fraction": FRACTION, **kwargs}
    return prepare_data(corpus, tmp_path / "out", **kwargs)


def test_whitespace_only_corpus_is_an_error(tmp_path):
    """A corpus with no non-blank document fails before anything is written."""
    corpus = write_txt(tmp_path / "blank", BLANKS)
    with pytest.raises(UserError, match=re.escape(f"corpus {corpus.resolve()}: no documents")):
        prepare(tmp_path, [str(corpus)])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.jsonl", None, r"missing\.jsonl: not found"),
        ("notes.md", b"hello\n", r"notes\.md: unsupported extension '\.md'"),
        ("field.jsonl", b'{"text": "ok"}\n{"body": "no text"}\n', r"field\.jsonl:2: no string field 'text'"),
        ("number.jsonl", b'{"text": 3}\n', r"number\.jsonl:1: no string field 'text'"),
        ("list.jsonl", b'["text"]\n', r"list\.jsonl:1: no string field 'text'"),
        ("broken.jsonl", b'{"text": "ok"}\n\n{"text": oops}\n', r"broken\.jsonl:3: not valid JSON"),
        ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"latin1\.jsonl:2: not UTF-8 text"),
        ("surrogate.jsonl", b'{"text": "ok"}\n{"text": "half \\ud83d emoji"}\n',
         r"surrogate\.jsonl:2: field 'text' has an unpaired surrogate"),
        ("latin1.txt", b"caf\xe9 au lait\n", r"latin1\.txt: not UTF-8 text \(invalid byte at offset 3\)"),
        ("nul.txt", b"text\0more\n", r"nul\.txt: binary data"),
        ("bad.parquet", b"PAR1 not really parquet", r"bad\.parquet: not a readable parquet file"),
    ],
)
def test_bad_source_files_name_the_culprit(tmp_path, name, content, match):
    """Missing, unsupported or malformed inputs raise a UserError naming the file (and line)."""
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=match):
        prepare(tmp_path, [str(path)])
    assert not (tmp_path / "out").exists()


def test_parquet_without_the_text_column(tmp_path):
    """A parquet file lacking the column, or holding numbers in it, names file and column."""
    pq.write_table(pa.table({"content": ["x"], "text": [1]}), tmp_path / "c.parquet")
    with pytest.raises(UserError, match=r"c\.parquet: no string column 'text'"):
        prepare(tmp_path, [str(tmp_path / "c.parquet")])
    with pytest.raises(UserError, match=r"c\.parquet: no string column 'body'.*\['content', 'text'\]"):
        prepare(tmp_path, [str(tmp_path / "c.parquet")], text_field="body")


def test_hub_dataset_column_that_is_not_text(tmp_path):
    """`hf:` (a local directory, which `datasets` loads offline): a column of numbers or lists is
    one line naming it, its type and the columns; a string column is read."""
    from sparse_lm.data.sources import CorpusStats, iter_documents, parse_corpus

    write_jsonl(tmp_path / "ds" / "data.jsonl", [{"text": 5, "words": ["a"], "body": "first"},
                                                {"text": 6, "words": ["b"], "body": "second"}])
    spec = f"hf:{tmp_path / 'ds'}"
    for field, kind in (("text", "int64"), ("words", "List")):
        with pytest.raises(UserError, match=rf"corpus {spec}: column '{field}' holds .*{kind}.*, not strings; "
                                            r"columns are \['text', 'words', 'body'\] "
                                            r"\(choose one with --text-field\)"):
            list(iter_documents(parse_corpus([spec], field), CorpusStats()))
    assert [text for text, _ in iter_documents(parse_corpus([spec], "body"), CorpusStats())] == ["first", "second"]


def test_directory_without_supported_files(tmp_path):
    """A directory with no .txt/.jsonl/.parquet file is refused up front."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "readme.md").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="corpus directory .*d: no .txt, .jsonl or .parquet files"):
        prepare(tmp_path, [str(tmp_path / "d")])


def test_out_that_is_not_a_dataset_is_never_replaced(tmp_path, tok_model):
    """--out naming a non-empty directory without meta.json, or a file, is refused and left as is."""
    corpus = write_txt(tmp_path / "corpus", DOCS[:4])
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete\n", encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(f"--out {precious}: a non-empty directory without meta.json")):
        prepare_data([str(corpus)], precious, VOCAB, 0.5, tokenizer=str(tok_model))
    assert [p.name for p in precious.iterdir()] == ["thesis.tex"]
    a_file = tmp_path / "file.out"
    a_file.write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="exists and is not a directory"):
        prepare_data([str(corpus)], a_file, VOCAB, 0.5, tokenizer=str(tok_model))
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is fine
    prepare_data([str(corpus)], empty, VOCAB, 0.5, tokenizer=str(tok_model))
    assert (empty / "meta.json").is_file()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vocab_size": 255}, "--vocab-size: expected an integer in"),
        ({"vocab_size": 2**31}, "--vocab-size: expected an integer in"),
        ({"heldout_fraction": 0.0}, r"--heldout-fraction: expected a number in \(0, 1\)"),
        ({"heldout_fraction": 1.0}, r"--heldout-fraction: expected a number in \(0, 1\)"),
        ({"heldout_fraction": -0.5}, "--heldout-fraction"),
        ({"heldout_fraction": float("nan")}, "--heldout-fraction"),
        ({"num_proc": 0}, "--num-proc: expected an integer >= 1"),
        ({"max_bytes": 0}, "--max-bytes: expected an integer >= 1"),
    ],
)
def test_bad_parameters(tmp_path, kwargs, match):
    """Out-of-range parameters are refused before the corpus is read."""
    corpus = write_txt(tmp_path / "corpus", DOCS[:4])
    with pytest.raises(UserError, match=match):
        prepare(tmp_path, [str(corpus)], **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_missing_corpus_exits_2_with_one_error_line(tmp_path):
    """`python -m sparse_lm prepare-data --corpus <missing>`: status 2, one `error:` line, no traceback."""
    missing = tmp_path / "no_such_corpus"
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_lm", "prepare-data", "--corpus", str(missing), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sparse-lm prepare-data: error: ") and str(missing) in lines[0]
    assert not (tmp_path / "out").exists()
