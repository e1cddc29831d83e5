"""Corpus sources for `prepare-data`: the standard library, local files, Hugging Face hub datasets.

Every source yields its documents in a fixed order, so the same inputs always give the same token
files. Input mistakes raise a `UserError` naming the file (and line) while the corpus is scanned,
before anything is written.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sparse_lm.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".parquet")
EXPECTED = "stdlib, hf:NAME[:CONFIG], or a .txt/.jsonl/.parquet file or directory"
BLANK = "blank"  # --doc-separator value: documents are separated by one or more blank lines
ERRORS = ("strict", "replace")


@dataclass(frozen=True)
class TextFormat:
    """How the bytes of local .txt and .jsonl files become documents: the codec, what to do with
    bytes it cannot decode, and the line that separates documents inside a .txt file (None: each
    .txt file is one document)."""

    encoding: str = "utf-8"
    errors: str = "strict"
    doc_separator: str | None = None

    def __post_init__(self):
        try:
            info = codecs.lookup(self.encoding)
        except LookupError:
            info = None
        if info is None or not getattr(info, "_is_text_encoding", True):
            raise UserError(
                f"--encoding {self.encoding!r}: not a text codec Python knows; expected e.g. utf-8, latin-1, cp1252"
            )
        if self.errors not in ERRORS:
            raise UserError(f"--errors {self.errors!r}: expected one of {', '.join(ERRORS)}")
        sep = self.doc_separator
        if sep is not None and (not sep.strip() or "\n" in sep or "\r" in sep):
            raise UserError(f"--doc-separator {sep!r}: expected the text of a separator line (e.g. %) or {BLANK!r}")

    @property
    def label(self) -> str:
        """The codec as error messages name it."""
        return "UTF-8" if codecs.lookup(self.encoding).name == "utf-8" else self.encoding

    def split(self, text: str) -> list[str]:
        """`text` cut into documents at separator lines, which are dropped. A separator line equals
        the separator once trailing whitespace is removed; with BLANK, a run of blank (empty or
        whitespace-only) lines is one separator."""
        if self.doc_separator is None:
            return [text]
        if self.doc_separator == BLANK:
            pattern = r"(?m)^(?:[ \t\r\f\v]*\n)+"
        else:
            pattern = rf"(?m)^{re.escape(self.doc_separator.rstrip())}[ \t\r\f\v]*(?:\n|\Z)"
        return re.split(pattern, text)


UTF8 = TextFormat()


@dataclass
class CorpusStats:
    """What a pass over the corpus kept and skipped; stored in meta.json."""

    documents: int = 0
    bytes: int = 0
    skipped_non_utf8: int = 0  # stdlib files that are not UTF-8 text (elsewhere that is an error)
    skipped_empty: int = 0  # documents that are empty or whitespace only
    max_bytes_reached: bool = False


@dataclass
class StdlibSource:
    """The running interpreter's standard-library .py files, one document each: a corpus that is
    always there, so the quick start needs no download."""

    spec: str = "stdlib"

    def documents(self, stats: CorpusStats) -> Iterator[str]:
        for path in stdlib_files():
            try:
                yield _decode(path.read_bytes(), path)
            except UserError:
                stats.skipped_non_utf8 += 1


@dataclass
class LocalSource:
    """A file, or the .txt/.jsonl/.parquet files under a directory in sorted path order."""

    spec: str
    files: list[Path]
    text_field: str
    text_format: TextFormat = UTF8

    def documents(self, stats: CorpusStats) -> Iterator[str]:
        for path in self.files:
            if path.suffix == ".txt":
                yield from self.text_format.split(_decode(path.read_bytes(), path, fmt=self.text_format))
            elif path.suffix == ".jsonl":
                yield from _jsonl_documents(path, self.text_field, self.text_format)
            else:
                yield from _parquet_documents(path, self.text_field)


@dataclass
class HubSource:
    """`hf:NAME[:CONFIG]`: the train split of a hub dataset, loaded once through `datasets`."""

    spec: str
    name: str
    config: str | None
    text_field: str
    _dataset: object = field(default=None, repr=False)

    def documents(self, stats: CorpusStats) -> Iterator[str]:
        dataset = self._load()
        for batch in dataset.iter(batch_size=1000):
            yield from (text or "" for text in batch[self.text_field])

    def _load(self):
        if self._dataset is None:
            import datasets

            try:
                dataset = datasets.load_dataset(self.name, self.config, split="train")
            except Exception as exc:  # network, auth, unknown name: all the user's to fix
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise UserError(f"corpus {self.spec}: datasets.load_dataset failed: {reason}") from None
            if self.text_field not in dataset.column_names:
                raise UserError(
                    f"corpus {self.spec}: no column {self.text_field!r}; columns are {dataset.column_names} "
                    "(choose one with --text-field)"
                )
            kind = getattr(dataset.features[self.text_field], "dtype", None)  # a list or struct column has none
            if kind not in ("string", "large_string"):
                raise UserError(
                    f"corpus {self.spec}: column {self.text_field!r} holds {dataset.features[self.text_field]}, not "
                    f"strings; columns are {dataset.column_names} (choose one with --text-field)"
                )
            self._dataset = dataset
        return self._dataset


Source = StdlibSource | LocalSource | HubSource


def parse_corpus(specs: list[str], text_field: str = "text", text_format: TextFormat = UTF8) -> list[Source]:
    """Turn `--corpus` arguments into sources, checking paths and extensions up front."""
    if not specs:
        raise UserError(f"--corpus: expected at least one of: {EXPECTED}")
    return [_parse_one(spec, text_field, text_format) for spec in specs]


def _parse_one(spec: str, text_field: str, text_format: TextFormat) -> Source:
    if spec == "stdlib":
        return StdlibSource()
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise UserError(f"corpus {spec!r}: expected hf:NAME[:CONFIG]")
        return HubSource(spec, name, config or None, text_field)
    path = Path(spec)
    if not path.exists():
        raise UserError(f"corpus path {path}: not found; expected {EXPECTED}")
    if path.is_dir():
        # Hidden directories hold version-control data and prepare-data's own temporary output.
        files = _files_under(path, SUFFIXES, lambda d: d[0] == ".")
        if not files:
            raise UserError(f"corpus directory {path}: no .txt, .jsonl or .parquet files found")
        return LocalSource(str(path.resolve()), files, text_field, text_format)
    if path.suffix not in SUFFIXES:
        raise UserError(f"corpus file {path}: unsupported extension {path.suffix!r}; expected .txt, .jsonl or .parquet")
    return LocalSource(str(path.resolve()), [path], text_field, text_format)


def _files_under(root: Path, suffixes: tuple[str, ...], skip_dirs) -> list[Path]:
    """Files under `root` with one of `suffixes`, sorted by relative path so that the order never
    depends on the file system; hidden files are skipped."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not skip_dirs(d)]
        found += [Path(folder, n).relative_to(root).as_posix() for n in names if n.endswith(suffixes) and n[0] != "."]
    return [root / rel for rel in sorted(found)]


def stdlib_files() -> list[Path]:
    """Standard-library .py files sorted by relative path, without installed third-party packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return _files_under(root, (".py",), lambda d: d in ("site-packages", "dist-packages"))


def iter_documents(sources: list[Source], stats: CorpusStats,
                   max_bytes: int | None = None) -> Iterator[tuple[str, bytes]]:
    """Every non-blank document as (text, UTF-8 bytes), in source order; with `max_bytes`, the
    first documents whose bytes add up to at most `max_bytes`."""
    for source in sources:
        for text in source.documents(stats):
            if not text.strip():
                stats.skipped_empty += 1
                continue
            data = text.encode("utf-8")
            if max_bytes is not None and stats.bytes + len(data) > max_bytes:
                stats.max_bytes_reached = True
                if stats.documents == 0:
                    raise UserError(f"--max-bytes {max_bytes}: smaller than the first document ({len(data)} bytes)")
                return
            stats.documents += 1
            stats.bytes += len(data)
            yield text, data


def _decode(raw: bytes, path: Path, line: int | None = None, fmt: TextFormat = UTF8) -> str:
    """`raw` as text; NUL characters mean a binary file (no text format puts them in prose)."""
    where = f"{path}:{line}" if line is not None else str(path)
    binary = f"{where}: binary data (contains NUL bytes); expected {fmt.label} text"
    if b"\0" in raw and fmt.encoding == UTF8.encoding:  # the common case, before decoding a binary file
        raise UserError(binary)
    try:
        text = raw.decode(fmt.encoding, fmt.errors)
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{where}: not {fmt.label} text (invalid byte at offset {exc.start}); name its codec with --encoding "
            "(e.g. latin-1) or replace undecodable bytes with --errors replace"
        ) from None
    if "\0" in text:
        raise UserError(binary)
    return text


def _jsonl_documents(path: Path, text_field: str, fmt: TextFormat = UTF8) -> Iterator[str]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = _decode(raw, path, number, fmt)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path}:{number}: not valid JSON ({exc.msg}); expected one JSON object per line"
                ) from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(
                    f"{path}:{number}: no string field {text_field!r}; expected one JSON object per line with "
                    f"the document in {text_field!r} (choose the field with --text-field)"
                )
            if "\\u" in line:  # a \ud800-\udfff escape decodes to a lone surrogate, which has no UTF-8 form
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise UserError(
                        f"{path}:{number}: field {text_field!r} has an unpaired surrogate escape at character "
                        f"{exc.start}; expected valid Unicode text"
                    ) from None
            yield text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError):
        raise UserError(f"{path}: not a readable parquet file") from None
    schema = file.schema_arrow
    kind = schema.field(text_field).type if text_field in schema.names else None
    if kind not in (pa.string(), pa.large_string(), pa.string_view()):
        raise UserError(
            f"{path}: no string column {text_field!r}; columns are {schema.names} (choose one with --text-field)"
        )
    for batch in file.iter_batches(columns=[text_field]):
        yield from (text or "" for text in batch.column(0).to_pylist())

