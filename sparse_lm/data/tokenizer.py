"""sentencepiece BPE tokenizer: training on a corpus sample, loading, encode/decode.

The options make tokenisation lossless for any UTF-8 text (byte fallback, identity normalisation, no
dummy prefix, whitespace kept), which bits per byte and exact document round trips rely on, and
keep runs of spaces as pieces so indentation in code costs few tokens.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from sparse_lm.atomic import write_bytes
from sparse_lm.errors import UserError

TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    normalization_rule_name="identity",
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    max_sentence_length=1 << 14,
    minloglevel=2,
)
# sentencepiece silently drops training "sentences" longer than max_sentence_length bytes, so
# documents are cut at line ends into chunks well below it; long lines are cut by characters.
CHUNK_BYTES = 1 << 12
# Seams where a document may be cut for parallel encoding: after a newline that is followed by an
# ASCII letter, digit or space. No piece of a model trained with TRAINER_OPTIONS spans such a seam
# (a piece never mixes Unicode scripts, and "\n" is of the Common script while letters are not;
# digits are pieces of their own; a space, "▁", only ever starts a piece), so encoding the parts
# and concatenating gives exactly the ids of encoding the whole. A bare line end is not enough:
# pieces such as "\n\n" or ")\n#" span it.
ENCODE_SEAM = re.compile(r"\n(?=[A-Za-z0-9 ])")


def split_for_encoding(text: str, chars: int) -> list[str]:
    """`text` cut at ENCODE_SEAM into parts of about `chars` characters or more, in order; a text
    with no seam after the first `chars` characters stays whole."""
    parts, start = [], 0
    while len(text) - start > chars:
        seam = ENCODE_SEAM.search(text, start + chars)
        if seam is None:
            break
        parts.append(text[start : seam.end()])
        start = seam.end()
    parts.append(text[start:])
    return parts


class Tokenizer:
    """A sentencepiece model file; ids are plain ints, and EOS separates documents in packed data."""

    def __init__(self, path: str | Path):
        self._path = Path(path)
        try:
            proto = self._path.read_bytes()
        except OSError:
            raise UserError(
                f"tokenizer {self._path}: not found or unreadable; expected a sentencepiece .model file"
            ) from None
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except RuntimeError:
            self._sp = None
        if self._sp is None or self._sp.get_piece_size() == 0:  # sentencepiece "loads" an empty file
            raise UserError(f"tokenizer {self._path}: not a valid sentencepiece .model file")
        self.sha256 = hashlib.sha256(proto).hexdigest()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Accepts any integer sequence, numpy token slices included."""
        return self._sp.decode([int(i) for i in ids])


def train_tokenizer(text_iterable: Iterable[str], out_path: str | Path, vocab_size: int) -> Path:
    """Train a BPE model on the given documents and write it to `out_path` (atomically)."""
    out_path = Path(out_path)
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_chunks(text_iterable), model_writer=proto, vocab_size=vocab_size, **TRAINER_OPTIONS
        )
    except RuntimeError as exc:
        detail = str(exc).rsplit("] ", 1)[-1].strip()
        raise UserError(f"cannot train a tokenizer with vocab size {vocab_size} on this corpus: {detail}") from None
    write_bytes(out_path, proto.getvalue())
    return out_path


def _chunks(texts: Iterable[str]) -> Iterator[str]:
    """Cut documents into training sentences of at most CHUNK_BYTES, keeping newlines inside them
    so that pieces like "):\\n" can be learned."""
    for text in texts:
        chunk, size = [], 0
        for line in _short_lines(text):
            n = len(line.encode("utf-8"))
            if size + n > CHUNK_BYTES and chunk:
                yield "".join(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += n
        if chunk:
            yield "".join(chunk)


def _short_lines(text: str) -> Iterator[str]:
    """Lines with their ends; a line longer than CHUNK_BYTES is cut into pieces that fit (a
    character is at most 4 UTF-8 bytes)."""
    step = CHUNK_BYTES // 4
    for line in text.splitlines(keepends=True):
        if len(line.encode("utf-8")) <= CHUNK_BYTES:
            yield line
        else:
            yield from (line[i : i + step] for i in range(0, len(line), step))
