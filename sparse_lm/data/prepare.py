"""`sparse-lm prepare-data`: corpus → tokenizer → packed train/heldout token files.

Two passes over the corpus. The scan hashes every document: the hashes pick each document's split
(so identical documents share a split and the split never depends on order or process count) and
together fingerprint the sources, so that re-running with unchanged inputs is a no-op. A corpus
with too few documents for the heldout fraction holds out its tail instead, cut at a line start.
The build pass loads the documents into a `datasets.Dataset`, big ones in parts cut at line starts
so that one huge document is tokenised by every worker, trains the tokenizer on a sample of the
train split, tokenises in parallel with `Dataset.map`, and packs the tokens. Everything is written into a
temporary directory next to the output and renamed into place at the end, so an interrupted run
never leaves a half-written dataset that looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece
from tqdm import tqdm

import sparse_lm
from sparse_lm.atomic import publish_dir, staging_dir
from sparse_lm.config import load_config
from sparse_lm.data.packed import FORMAT_VERSION, META_FILE, SPLITS, PackedSplit, load_meta
from sparse_lm.data.sources import BLANK, ERRORS, CorpusStats, Source, TextFormat, iter_documents, parse_corpus
from sparse_lm.data.tokenizer import Tokenizer, split_for_encoding, train_tokenizer
from sparse_lm.errors import UserError

TOKENIZER_FILE = "tokenizer.model"
# Bytes of train-split text the tokenizer is trained on: enough for stable BPE merges at the vocab
# sizes used here, small enough that sentencepiece trains in seconds.
TOKENIZER_SAMPLE_BYTES = 8 << 20
SPLIT_RULE = (
    "heldout iff the first 8 bytes of sha256(document UTF-8), read as a big-endian integer, are < "
    "heldout_fraction * 2^64; if that leaves heldout empty with >= 2 documents, the documents with the "
    "smallest hash go to heldout; if it leaves train empty, those with the largest hash go to train; "
    "a corpus with a single distinct text keeps its last copy as heldout"
)
TAIL_RULE = (
    "used when documents * heldout_fraction < 1: heldout is the corpus tail, the last round(heldout_fraction * "
    "bytes) UTF-8 bytes of the documents in order (at least 1, never all), the cut moved to the nearest line "
    "start inside the document it falls in (or that document's start) that leaves text on both sides, or to a "
    "character boundary if there is none; a document cut in two counts as two documents"
)
# Documents are tokenised in parts of about this many characters (cut where encoding the parts
# gives the same ids as encoding the whole, see tokenizer.ENCODE_SEAM), so that `num_proc`
# workers share one big document; its parts' ids are re-joined without an EOS between them.
ENCODE_PART_CHARS = 1 << 16


@dataclass
class Scan:
    """The first pass: per-document split keys and sizes, and a hash over all documents."""

    keys: np.ndarray  # uint64, the first 8 bytes of each document's sha256
    doc_bytes: np.ndarray  # int64 UTF-8 bytes per document
    sha256: str  # over the per-document digests, in order
    stats: CorpusStats


@dataclass
class Split:
    """The heldout mask over the documents as they are packed. A tail split may cut one corpus
    document in two (`cut`: its index and the UTF-8 byte offset of the cut); then `keys` and
    `doc_bytes` count the halves as two documents, the second one heldout."""

    heldout: np.ndarray
    keys: np.ndarray
    doc_bytes: np.ndarray
    cut: tuple[int, int] | None = None
    tail: dict[str, Any] | None = None  # where the tail starts, for meta.json; None for the hash rule


def prepare_data(
    corpus: list[str],
    out: str | Path,
    vocab_size: int,
    heldout_fraction: float,
    tokenizer: str | None = None,
    num_proc: int = 1,
    max_bytes: int | None = None,
    text_field: str = "text",
    encoding: str = "utf-8",
    errors: str = "strict",
    doc_separator: str | None = None,
) -> dict[str, Any]:
    """Build (or confirm up to date) a packed dataset in `out`; returns its meta.json contents."""
    _check_params(vocab_size, heldout_fraction, num_proc, max_bytes)
    text_format = TextFormat(encoding, errors, doc_separator)
    out = Path(out)
    _check_replaceable(out)
    sources = parse_corpus(corpus, text_field, text_format)
    given = Tokenizer(tokenizer) if tokenizer else None
    if given is not None and given.eos_id < 0:
        raise UserError(f"tokenizer {given.path}: has no EOS piece, which separates documents in packed data")
    scan = scan_corpus(sources, max_bytes)
    params = {
        "vocab_size": None if given else vocab_size,
        "heldout_fraction": heldout_fraction,
        "max_bytes": max_bytes,
        "text_field": text_field,
        "encoding": encoding,
        "errors": errors,
        "doc_separator": doc_separator,
        "tokenizer": str(given.path.resolve()) if given else None,
        "tokenizer_sample_bytes": None if given else TOKENIZER_SAMPLE_BYTES,
    }
    fingerprint = _fingerprint(sources, scan, params, given)
    current = _current_meta(out)
    if current is not None and current.get("fingerprint") == fingerprint:
        print(f"{out}: up to date (fingerprint {fingerprint[:12]})")
        return current
    split = split_corpus(sources, scan, heldout_fraction, max_bytes)
    with _staging_dir(out) as stage:
        meta = _build(sources, scan.sha256, split, stage, given, vocab_size, num_proc, max_bytes)
        if split.tail is not None:
            meta["heldout_tail"] = split.tail
        meta.update(
            fingerprint=fingerprint,
            split_rule=TAIL_RULE if split.tail is not None else SPLIT_RULE,
            sources={"specs": [s.spec for s in sources], "sha256": scan.sha256, **asdict(scan.stats)},
            params=params,
            versions={"sparse_lm": sparse_lm.__version__, "sentencepiece": sentencepiece.__version__},
        )
        _write_json(stage / META_FILE, meta)
        publish_dir(stage, out)
    return meta


def scan_corpus(sources: list[Source], max_bytes: int | None) -> Scan:
    """Read every document once, hashing it; fails early on bad input or an empty corpus."""
    stats = CorpusStats()
    keys, sizes, total = [], [], hashlib.sha256()
    for _, data in tqdm(iter_documents(sources, stats, max_bytes), desc="scan corpus", unit=" docs"):
        digest = hashlib.sha256(data).digest()
        total.update(digest)
        keys.append(int.from_bytes(digest[:8], "big"))
        sizes.append(len(data))
    if not keys:
        raise UserError(
            f"corpus {' '.join(s.spec for s in sources)}: no documents (every document is empty or whitespace only)"
        )
    return Scan(np.array(keys, dtype=np.uint64), np.array(sizes, dtype=np.int64), total.hexdigest(), stats)


def assign_heldout(keys: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean heldout mask from document hashes (see SPLIT_RULE); never leaves train empty, nor
    heldout when there are two or more documents."""
    heldout = keys < np.uint64(min(int(fraction * 2**64), 2**64 - 1))
    if len(keys) >= 2 and not heldout.any():
        heldout = keys == keys.min()
    if heldout.all():
        heldout = keys != keys.max()
    if len(keys) >= 2 and not heldout.any():  # every document is the same text
        heldout[-1] = True
    return heldout


def split_corpus(sources: list[Source], scan: Scan, fraction: float, max_bytes: int | None) -> Split:
    """Whole documents by hash (SPLIT_RULE) when there are enough of them for `fraction`, else the
    corpus tail (TAIL_RULE), said in one printed line."""
    if len(scan.keys) * fraction >= 1:
        return Split(assign_heldout(scan.keys, fraction), scan.keys, scan.doc_bytes)
    n, total = len(scan.keys), int(scan.doc_bytes.sum())
    position = total - min(max(1, round(fraction * total)), total - 1)
    ends = np.cumsum(scan.doc_bytes)
    doc = int(np.searchsorted(ends, position, side="right"))
    start = int(ends[doc] - scan.doc_bytes[doc])
    _, data = next(itertools.islice(iter_documents(sources, CorpusStats(), max_bytes), doc, None))
    found = tail_cut(data, position - start, whole=doc > 0)
    if found is None:
        raise UserError(f"corpus {' '.join(s.spec for s in sources)}: too small to hold out any of it ({total} bytes)")
    offset, at_line = found
    if offset == 0:
        keys, doc_bytes, heldout, cut = scan.keys, scan.doc_bytes, np.arange(n) >= doc, None
    else:
        keys = np.insert(scan.keys, doc + 1, scan.keys[doc])
        doc_bytes = np.insert(scan.doc_bytes, doc + 1, scan.doc_bytes[doc] - offset)
        doc_bytes[doc] = offset
        heldout, cut = np.arange(n + 1) > doc, (doc, offset)
    held = int(doc_bytes[heldout].sum())
    boundary = "line start" if at_line else "character boundary (the document has no line start near it)"
    print(
        f"heldout: {n:,} document{'s' if n != 1 else ''} too few to hold out whole ones at --heldout-fraction "
        f"{fraction:g}; holding out the corpus tail instead: the last {held:,} of {total:,} bytes "
        f"({held / total:.2%}), from a {boundary} in document {doc + 1}"
    )
    tail = {"document": doc, "offset": offset, "bytes": held, "boundary": "line" if at_line else "character"}
    return Split(heldout, keys, doc_bytes, cut, tail)


def tail_cut(data: bytes, target: int, whole: bool) -> tuple[int, bool] | None:
    """(offset, at a line start) of the cut in document `data` nearest to byte `target` that
    leaves non-whitespace on both sides, preferring line starts (offset 0, all of it, only if
    `whole`); None if the document cannot be cut."""
    lo = len(data) - len(data.lstrip()) + 1  # a cut at lo or later keeps the first non-blank byte before it
    hi = len(data.rstrip()) - 1  # a cut at hi or earlier keeps the last one after it
    starts = [0] if whole else []
    before = data.rfind(b"\n", lo - 1, max(min(target, hi), lo - 1))  # the last line start in [lo, target]
    after = data.find(b"\n", max(target - 1, lo - 1), max(hi, 0))  # the first in [target, hi]
    starts += [i + 1 for i in (before, after) if i >= 0 and lo <= i + 1 <= hi]
    if starts:
        return min(starts, key=lambda c: (abs(c - target), c)), True
    for step in (1, -1):  # the nearest UTF-8 character start in [lo, hi]
        c = min(max(target, lo), hi)
        while lo <= c <= hi and data[c] & 0xC0 == 0x80:
            c += step
        if lo <= c <= hi:
            return c, False
    return None


def _build(sources, sha256, split, stage, given, vocab_size, num_proc, max_bytes) -> dict[str, Any]:
    """The build pass, writing tokenizer and token files into `stage`; returns their part of meta."""
    import datasets

    documents = datasets.Dataset.from_generator(
        functools.partial(_rows, sources, max_bytes, split.cut),  # not gen_kwargs: datasets would shard a list
        features=datasets.Features(
            {"text": datasets.Value("string"), "doc": datasets.Value("int64"), "end": datasets.Value("bool")}
        ),
        cache_dir=str(stage / "cache"),
        fingerprint=sha256,
    )
    row_doc = documents.data.column("doc").to_numpy()  # the table itself: a fresh dataset has no index mapping
    if int(row_doc[-1]) + 1 != len(split.keys):
        raise UserError(
            f"corpus changed while it was being prepared ({len(split.keys)} then {int(row_doc[-1]) + 1} documents)"
        )
    model = stage / TOKENIZER_FILE
    if given is not None:
        shutil.copyfile(given.path, model)
    else:
        train_tokenizer(_tokenizer_sample(documents, row_doc, split), model, vocab_size)
    tok = Tokenizer(model)
    tokenized = documents.map(
        _EncodeDocuments(str(model)),
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["text", "end"],
        features=datasets.Features({"doc": datasets.Value("int64"), "ids": datasets.List(datasets.Value("int32"))}),
        new_fingerprint=hashlib.sha256((sha256 + tok.sha256).encode()).hexdigest()[:32],
        desc="tokenize",
    )
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
    splits = _pack(tokenized, split, stage, dtype)
    del documents, tokenized
    shutil.rmtree(stage / "cache")
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": tok.sha256,
        "tokenizer_trained": given is None,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "unk_id": tok.unk_id,
        "dtype": dtype.name,
        "splits": splits,
    }


def _rows(sources: list[Source], max_bytes: int | None, cut: tuple[int, int] | None) -> Iterator[dict[str, Any]]:
    """Rows of the tokenising dataset: every document (both halves of a cut one) in parts of
    about ENCODE_PART_CHARS characters; `doc` numbers the documents, `end` marks a last part."""
    doc = 0
    for index, (text, data) in enumerate(iter_documents(sources, CorpusStats(), max_bytes)):
        texts = [text]
        if cut is not None and index == cut[0]:
            texts = [data[: cut[1]].decode("utf-8"), data[cut[1] :].decode("utf-8")]
        for text in texts:
            parts = split_for_encoding(text, ENCODE_PART_CHARS)
            for i, part in enumerate(parts):
                yield {"text": part, "doc": doc, "end": i == len(parts) - 1}
            doc += 1


def _tokenizer_sample(documents, row_doc: np.ndarray, split: Split) -> Iterator[str]:
    """Train-split documents in hash order (a content-defined shuffle, so the sample spans the
    whole corpus) up to about TOKENIZER_SAMPLE_BYTES; heldout text never shapes the vocabulary."""
    train = np.flatnonzero(~split.heldout)
    order = train[np.argsort(split.keys[train], kind="stable")]
    count = int(np.searchsorted(np.cumsum(split.doc_bytes[order]), TOKENIZER_SAMPLE_BYTES)) + 1
    rank = np.full(len(split.keys), -1)
    rank[order[:count]] = np.arange(min(count, len(order)))
    rows = np.flatnonzero(rank[row_doc] >= 0)
    rows = rows[np.argsort(rank[row_doc[rows]], kind="stable")]  # documents in hash order, parts in order
    parts = (part for batch in documents.select(rows).iter(batch_size=256) for part in zip(batch["doc"], batch["text"]))
    budget = TOKENIZER_SAMPLE_BYTES
    # Each document whole, its encoding parts joined: the trainer cuts documents into sentences,
    # and a part boundary would add sentence breaks that change the vocabulary it learns.
    for _, doc_parts in itertools.groupby(parts, key=lambda part: part[0]):
        text = "".join(text for _, text in doc_parts)
        yield text[:budget]  # at least `budget` bytes of text; bounds one huge document
        budget -= len(text)


class _EncodeDocuments:
    """`Dataset.map` function: token ids of each part, followed by EOS after a document's last
    part. A picklable class, so `num_proc` workers each load the model once instead of shipping a
    processor around."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._tokenizer: Tokenizer | None = None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.model_path)
        eos = self._tokenizer.eos_id
        encoded = self._tokenizer.encode_batch(batch["text"])
        return {"ids": [ids + [eos] if end else ids for ids, end in zip(encoded, batch["end"])]}


def _pack(tokenized, split: Split, stage: Path, dtype: np.dtype) -> dict[str, Any]:
    """Stream the tokenised parts into `<split>.bin` in corpus order and write the offsets."""
    import pyarrow.compute as pc

    doc_tokens = np.zeros(len(split.keys), dtype=np.int64)
    with contextlib.ExitStack() as files, tqdm(total=len(tokenized), desc="pack", unit=" parts") as bar:
        bins = {name: files.enter_context(open(stage / f"{name}.bin", "wb")) for name in SPLITS}
        for table in tokenized.with_format("arrow").iter(batch_size=4096):
            ids = table.column("ids")
            counts = pc.list_value_length(ids).to_numpy()
            flat = pc.list_flatten(ids).to_numpy().astype(dtype)
            docs = table.column("doc").to_numpy()
            held = split.heldout[docs]
            for name, rows in (("train", ~held), ("heldout", held)):
                bins[name].write(flat[np.repeat(rows, counts)].tobytes())
            np.add.at(doc_tokens, docs, counts)
            bar.update(len(counts))
    splits = {}
    for name, mask in (("train", ~split.heldout), ("heldout", split.heldout)):
        doc_lengths = doc_tokens[mask]
        offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
        with open(stage / f"{name}.idx.npy", "wb") as f:
            np.save(f, offsets)
        splits[name] = {
            "file": f"{name}.bin",
            "index": f"{name}.idx.npy",
            "documents": len(doc_lengths),
            "tokens": int(offsets[-1]),
            "bytes": int(split.doc_bytes[mask].sum()),
        }
    return splits


def _fingerprint(sources: list[Source], scan: Scan, params: dict[str, Any], given: Tokenizer | None) -> str:
    """Everything the output depends on: format, source specs and contents, parameters, the given
    tokenizer's contents or the trainer's version. Not `num_proc`: output does not depend on it."""
    inputs = {
        "format_version": FORMAT_VERSION,
        "specs": [s.spec for s in sources],
        "sources_sha256": scan.sha256,
        "params": params,
        "tokenizer_sha256": given.sha256 if given else None,
        "sentencepiece": None if given else sentencepiece.__version__,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _current_meta(out: Path) -> dict[str, Any] | None:
    """meta.json of an existing, intact dataset in `out`, or None (then it is rebuilt)."""
    try:
        meta = load_meta(out)
        for split in SPLITS:
            PackedSplit(out, split)
        if Tokenizer(out / meta["tokenizer"]).sha256 != meta["tokenizer_sha256"]:
            return None
    except UserError:
        return None
    return meta


def _check_params(vocab_size: int, heldout_fraction: float, num_proc: int, max_bytes: int | None) -> None:
    if not 260 <= vocab_size < 2**31:
        raise UserError("--vocab-size: expected an integer in [260, 2^31) (256 byte pieces + unk, bos, eos + merges), "
                        f"got {vocab_size}")
    if not 0 < heldout_fraction < 1:
        raise UserError(f"--heldout-fraction: expected a number in (0, 1), got {heldout_fraction}")
    if num_proc < 1:
        raise UserError(f"--num-proc: expected an integer >= 1, got {num_proc}")
    if max_bytes is not None and max_bytes < 1:
        raise UserError(f"--max-bytes: expected an integer >= 1, got {max_bytes}")


def _check_replaceable(out: Path) -> None:
    """Refuse to replace anything but a previous dataset (or an empty directory)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise UserError(f"--out {out}: a non-empty directory without {META_FILE}; refusing to replace it")


@contextlib.contextmanager
def _staging_dir(out: Path) -> Iterator[Path]:
    """A hidden directory next to `out` (same file system, so renaming it is atomic), removed if
    the build fails."""
    stage = staging_dir(out)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def summary(meta: dict[str, Any]) -> str:
    """A few lines for the terminal: per split documents, tokens, bytes and tokens per byte."""
    trained = "trained" if meta["tokenizer_trained"] else "given"
    lines = [
        f"tokenizer: {meta['tokenizer']} ({trained}, vocab {meta['vocab_size']}), tokens stored as {meta['dtype']}",
        f"{'split':<8} {'documents':>10} {'tokens':>14} {'bytes':>14} {'tokens/byte':>12}",
    ]
    for split, info in meta["splits"].items():
        ratio = info["tokens"] / info["bytes"] if info["bytes"] else 0.0
        lines.append(f"{split:<8} {info['documents']:>10,} {info['tokens']:>14,} {info['bytes']:>14,} {ratio:>12.3f}")
    return "\n".join(lines)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare-data",
        help="train a tokenizer and pack a corpus into train/heldout token files",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--corpus", nargs="+", required=True, metavar="SOURCE",
                        help="stdlib | PATH (.txt, .jsonl, .parquet file or directory) | hf:NAME[:CONFIG]")
    parser.add_argument("--out", required=True, help="output directory, e.g. data/stdlib")
    parser.add_argument("--config",
                        help="run config YAML; its data.vocab_size and data.heldout_fraction are the defaults")
    parser.add_argument("--vocab-size", type=int, help="tokenizer vocabulary size (default: config, 4096)")
    parser.add_argument("--heldout-fraction", type=float, help="share of documents held out (default: config, 0.02)")
    parser.add_argument("--tokenizer", metavar="PATH.model",
                        help="reuse this sentencepiece model instead of training one")
    parser.add_argument("--num-proc", type=int, default=min(4, os.cpu_count() or 1), help="tokenising processes")
    parser.add_argument("--max-bytes", type=int, help="keep only the first documents, up to this many UTF-8 bytes")
    parser.add_argument("--text-field", default="text", help="jsonl field / parquet or hub column holding the text")
    parser.add_argument("--doc-separator", metavar="SEP",
                        help=f"split .txt files into documents at lines equal to SEP (e.g. %%), or at blank lines "
                             f"with {BLANK!r} (default: a file is one document)")
    parser.add_argument("--encoding", default="utf-8",
                        help="codec of .txt and .jsonl files, e.g. latin-1 (default utf-8)")
    parser.add_argument("--errors", default="strict", metavar="|".join(ERRORS),
                        help="undecodable bytes: stop with an error (strict, the default) or become U+FFFD (replace)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    data = load_config(args.config).data
    meta = prepare_data(
        args.corpus,
        args.out,
        vocab_size=data.vocab_size if args.vocab_size is None else args.vocab_size,
        heldout_fraction=data.heldout_fraction if args.heldout_fraction is None else args.heldout_fraction,
        tokenizer=args.tokenizer,
        num_proc=args.num_proc,
        max_bytes=args.max_bytes,
        text_field=args.text_field,
        encoding=args.encoding,
        errors=args.errors,
        doc_separator=args.doc_separator,
    )
    print(summary(meta))
    return 0
