"""Reading a prepared dataset: meta.json, memory-mapped token files and document indexes.

Layout of a directory written by `sparse-lm prepare-data`:
    meta.json              format version, tokenizer sha256, dtype, per-split counts, provenance
    tokenizer.model        the sentencepiece model the tokens come from
    <split>.bin            every document's tokens followed by EOS, back to back (uint16 or uint32)
    <split>.idx.npy        int64 document offsets into <split>.bin, length documents + 1
for split in `train`, `heldout`. Readers check sizes against meta.json so that a truncated or
mismatched file fails with a clear message instead of training on garbage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sparse_lm.errors import UserError

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "heldout")
REQUIRED_KEYS = ("tokenizer", "tokenizer_sha256", "vocab_size", "eos_id", "dtype", "splits")
HINT = "run `sparse-lm prepare-data --corpus ... --out DIR` to (re)create it"


def load_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of a prepared dataset; `path` is the data directory or the meta.json file itself."""
    path = Path(path)
    file = path / META_FILE if path.is_dir() or path.suffix != ".json" else path
    if not file.is_file():
        raise UserError(f"{file}: not found; {HINT}")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{file}: not valid JSON; {HINT}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise UserError(f"{file}: format version {version!r}, expected {FORMAT_VERSION}; {HINT}")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise UserError(f"{file}: missing keys {missing}; {HINT}")
    return meta


class PackedSplit:
    """One split: `.tokens` (read-only memmap) and `.doc_offsets` (document i is
    tokens[doc_offsets[i]:doc_offsets[i+1]], its last token EOS)."""

    def __init__(self, data_dir: str | Path, split: str):
        self.data_dir = Path(data_dir)
        self.split = split
        self.meta = load_meta(self.data_dir)
        if split not in self.meta["splits"]:
            raise UserError(f"{self.data_dir}: no split {split!r}; expected one of {sorted(self.meta['splits'])}")
        info = self.meta["splits"][split]
        self.n_docs: int = info["documents"]
        self.n_tokens: int = info["tokens"]
        self.n_bytes: int = info["bytes"]
        self.tokens = _map_tokens(self.data_dir / info["file"], np.dtype(self.meta["dtype"]), self.n_tokens)
        self.doc_offsets = _load_offsets(self.data_dir / info["index"], self.n_docs, self.n_tokens)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i, its trailing EOS included."""
        return self.tokens[self.doc_offsets[i] : self.doc_offsets[i + 1]]


def _map_tokens(path: Path, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    try:
        size = path.stat().st_size
    except OSError:
        raise UserError(f"{path}: not found; {HINT}") from None
    expected = n_tokens * dtype.itemsize
    if size != expected:
        raise UserError(
            f"{path}: {size} bytes, expected {expected} ({n_tokens} {dtype} tokens per meta.json); "
            f"the file is truncated or from another run; {HINT}"
        )
    if n_tokens == 0:  # np.memmap cannot map an empty file
        empty = np.empty(0, dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


def _load_offsets(path: Path, n_docs: int, n_tokens: int) -> np.ndarray:
    try:
        offsets = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # EOFError: an empty file
        raise UserError(f"{path}: missing or not a .npy array; {HINT}") from None
    valid = (
        offsets.dtype == np.int64
        and offsets.shape == (n_docs + 1,)
        and offsets[0] == 0
        and offsets[-1] == n_tokens
        and bool(np.all(np.diff(offsets) > 0))
    )
    if not valid:
        raise UserError(
            f"{path}: expected {n_docs + 1} increasing int64 offsets from 0 to {n_tokens} (per meta.json); {HINT}"
        )
    return offsets
