"""`sparse-lm prepare-data`: corpus → tokenizer → packed train/heldout token files.

Two passes over the corpus. The scan hashes every document: the hashes pick each document's split
(so identical documents share a split and the split never depends on order or process count) and
together fingerprint the sources, so that re-running with unchanged inputs is a no-op. The build
pass loads the documents into a `datasets.Dataset`, trains the tokenizer on a sample of the train
split, tokenises in parallel with `Dataset.map`, and packs the tokens. Everything is written into a
temporary directory next to the output and renamed into place at the end, so an interrupted run
never leaves a half-written dataset that looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
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
from sparse_lm.data.sources import CorpusStats, Source, iter_documents, parse_corpus
from sparse_lm.data.tokenizer import Tokenizer, train_tokenizer
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


@dataclass
class Scan:
    """The first pass: per-document split keys and sizes, and a hash over all documents."""

    keys: np.ndarray  # uint64, the first 8 bytes of each document's sha256
    doc_bytes: np.ndarray  # int64 UTF-8 bytes per document
    sha256: str  # over the per-document digests, in order
    stats: CorpusStats


def prepare_data(
    corpus: list[str],
    out: str | Path,
    vocab_size: int,
    heldout_fraction: float,
    tokenizer: str | None = None,
    num_proc: int = 1,
    max_bytes: int | None = None,
    text_field: str = "text",
) -> dict[str, Any]:
    """Build (or confirm up to date) a packed dataset in `out`; returns its meta.json contents."""
    _check_params(vocab_size, heldout_fraction, num_proc, max_bytes)
    out = Path(out)
    _check_replaceable(out)
    sources = parse_corpus(corpus, text_field)
    given = Tokenizer(tokenizer) if tokenizer else None
    if given is not None and given.eos_id < 0:
        raise UserError(f"tokenizer {given.path}: has no EOS piece, which separates documents in packed data")
    scan = scan_corpus(sources, max_bytes)
    params = {
        "vocab_size": None if given else vocab_size,
        "heldout_fraction": heldout_fraction,
        "max_bytes": max_bytes,
        "text_field": text_field,
        "tokenizer": str(given.path.resolve()) if given else None,
        "tokenizer_sample_bytes": None if given else TOKENIZER_SAMPLE_BYTES,
    }
    fingerprint = _fingerprint(sources, scan, params, given)
    current = _current_meta(out)
    if current is not None and current.get("fingerprint") == fingerprint:
        print(f"{out}: up to date (fingerprint {fingerprint[:12]})")
        return current
    heldout = assign_heldout(scan.keys, heldout_fraction)
    with _staging_dir(out) as stage:
        meta = _build(sources, scan, heldout, stage, given, vocab_size, num_proc, max_bytes)
        meta.update(
            fingerprint=fingerprint,
            split_rule=SPLIT_RULE,
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


def _build(sources, scan, heldout, stage, given, vocab_size, num_proc, max_bytes) -> dict[str, Any]:
    """The build pass, writing tokenizer and token files into `stage`; returns their part of meta."""
    import datasets

    documents = datasets.Dataset.from_generator(
        functools.partial(_texts, sources, max_bytes),  # not gen_kwargs: datasets would shard a list
        features=datasets.Features({"text": datasets.Value("string")}),
        cache_dir=str(stage / "cache"),
        fingerprint=scan.sha256,
    )
    if len(documents) != len(scan.keys):
        raise UserError(f"corpus changed while it was being prepared ({len(scan.keys)} then {len(documents)} documents)")
    model = stage / TOKENIZER_FILE
    if given is not None:
        shutil.copyfile(given.path, model)
    else:
        train_tokenizer(_tokenizer_sample(documents, scan, heldout), model, vocab_size)
    tok = Tokenizer(model)
    tokenized = documents.map(
        _EncodeDocuments(str(model)),
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["text"],
        features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),
        new_fingerprint=hashlib.sha256((scan.sha256 + tok.sha256).encode()).hexdigest()[:32],
        desc="tokenize",
    )
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
    splits = _pack(tokenized, heldout, scan.doc_bytes, stage, dtype)
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


def _texts(sources: list[Source], max_bytes: int | None) -> Iterator[dict[str, str]]:
    for text, _ in iter_documents(sources, CorpusStats(), max_bytes):
        yield {"text": text}


def _tokenizer_sample(documents, scan: Scan, heldout: np.ndarray) -> Iterator[str]:
    """Train-split documents in hash order (a content-defined shuffle, so the sample spans the
    whole corpus) up to about TOKENIZER_SAMPLE_BYTES; heldout text never shapes the vocabulary."""
    train = np.flatnonzero(~heldout)
    order = train[np.argsort(scan.keys[train], kind="stable")]
    count = int(np.searchsorted(np.cumsum(scan.doc_bytes[order]), TOKENIZER_SAMPLE_BYTES)) + 1
    budget = TOKENIZER_SAMPLE_BYTES
    for batch in documents.select(order[:count]).iter(batch_size=256):
        for text in batch["text"]:
            yield text[:budget]  # at least `budget` bytes of text; bounds one huge document
            budget -= len(text)


class _EncodeDocuments:
    """`Dataset.map` function: token ids of each document followed by EOS. A picklable class, so
    `num_proc` workers each load the model once instead of shipping a processor around."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._tokenizer: Tokenizer | None = None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.model_path)
        eos = self._tokenizer.eos_id
        return {"ids": [ids + [eos] for ids in self._tokenizer.encode_batch(batch["text"])]}


def _pack(tokenized, heldout: np.ndarray, doc_bytes: np.ndarray, stage: Path, dtype: np.dtype) -> dict[str, Any]:
    """Stream the tokenised documents into `<split>.bin` in corpus order and write the offsets."""
    import pyarrow.compute as pc

    lengths: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    start = 0
    with contextlib.ExitStack() as files, tqdm(total=len(tokenized), desc="pack", unit=" docs") as bar:
        bins = {split: files.enter_context(open(stage / f"{split}.bin", "wb")) for split in SPLITS}
        for table in tokenized.with_format("arrow").iter(batch_size=4096):
            ids = table.column("ids")
            counts = pc.list_value_length(ids).to_numpy()
            flat = pc.list_flatten(ids).to_numpy().astype(dtype)
            held = heldout[start : start + len(counts)]
            for split, docs in (("train", ~held), ("heldout", held)):
                bins[split].write(flat[np.repeat(docs, counts)].tobytes())
                lengths[split].append(counts[docs])
            start += len(counts)
            bar.update(len(counts))
    splits = {}
    for split, mask in (("train", ~heldout), ("heldout", heldout)):
        doc_lengths = np.concatenate(lengths[split]).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
        with open(stage / f"{split}.idx.npy", "wb") as f:
            np.save(f, offsets)
        splits[split] = {
            "file": f"{split}.bin",
            "index": f"{split}.idx.npy",
            "documents": len(doc_lengths),
            "tokens": int(offsets[-1]),
            "bytes": int(doc_bytes[mask].sum()),
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
        raise UserError(f"--vocab-size: expected an integer in [260, 2^31) (256 byte pieces + unk, bos, eos + merges), got {vocab_size}")
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
    parser.add_argument("--config", help="run config YAML; its data.vocab_size and data.heldout_fraction are the defaults")
    parser.add_argument("--vocab-size", type=int, help="tokenizer vocabulary size (default: config, 4096)")
    parser.add_argument("--heldout-fraction", type=float, help="share of documents held out (default: config, 0.02)")
    parser.add_argument("--tokenizer", metavar="PATH.model", help="reuse this sentencepiece model instead of training one")
    parser.add_argument("--num-proc", type=int, default=min(4, os.cpu_count() or 1), help="tokenising processes")
    parser.add_argument("--max-bytes", type=int, help="keep only the first documents, up to this many UTF-8 bytes")
    parser.add_argument("--text-field", default="text", help="jsonl field / parquet or hub column holding the text")
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
    )
    print(summary(meta))
    return 0
