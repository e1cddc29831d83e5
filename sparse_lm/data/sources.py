"""Corpus sources for `prepare-data`: the standard library, local files, Hugging Face hub datasets.

Every source yields its documents in a fixed order, so the same inputs always give the same token
files. Input mistakes raise a `UserError` naming the file (and line) while the corpus is scanned,
before anything is written.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sparse_lm.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".parquet")
EXPECTED = "stdlib, hf:NAME[:CONFIG], or a .txt/.jsonl/.parquet file or directory"


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

    def documents(self, stats: CorpusStats) -> Iterator[str]:
        for path in self.files:
            if path.suffix == ".txt":
                yield _decode(path.read_bytes(), path)
            elif path.suffix == ".jsonl":
                yield from _jsonl_documents(path, self.text_field)
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


def parse_corpus(specs: list[str], text_field: str = "text") -> list[Source]:
    """Turn `--corpus` arguments into sources, checking paths and extensions up front."""
    if not specs:
        raise UserError(f"--corpus: expected at least one of: {EXPECTED}")
    return [_parse_one(spec, text_field) for spec in specs]


def _parse_one(spec: str, text_field: str) -> Source:
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
        return LocalSource(str(path.resolve()), files, text_field)
    if path.suffix not in SUFFIXES:
        raise UserError(f"corpus file {path}: unsupported extension {path.suffix!r}; expected .txt, .jsonl or .parquet")
    return LocalSource(str(path.resolve()), [path], text_field)


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


def iter_documents(sources: list[Source], stats: CorpusStats, max_bytes: int | None = None) -> Iterator[tuple[str, bytes]]:
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


def _decode(raw: bytes, path: Path, line: int | None = None) -> str:
    where = f"{path}:{line}" if line is not None else str(path)
    if b"\0" in raw:
        raise UserError(f"{where}: binary data (contains NUL bytes); expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not UTF-8 text (invalid byte at offset {exc.start}); expected UTF-8 text") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = _decode(raw, path, number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg}); expected one JSON object per line") from None
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

