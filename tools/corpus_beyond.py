"""Write the documents a prepared corpus left out at its `--max-bytes` cut, as a `.jsonl` file.

    python tools/corpus_beyond.py --data data/stdlib-24m --out data/stdlib-beyond-24m.jsonl

Why: a prepared corpus's held-out split is a small hash-chosen sample (on `data/stdlib-24m`, 26
documents), so a few long documents can decide a comparison between two models. The documents after
the cut are text of the same kind that training never saw, usually many more of them; scoring
checkpoints on them (`sparse-lm eval --corpus data/stdlib-beyond-24m.jsonl`) is a second, larger
held-out measurement. The corpus is read again from the specs recorded in the data's meta.json and
its first documents are checked against the recorded hash, so a different interpreter (another
standard library) or changed files fail here instead of silently giving other text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from sparse_lm.atomic import write_text
from sparse_lm.data.sources import CorpusStats, TextFormat, iter_documents, parse_corpus
from sparse_lm.errors import UserError


def documents_beyond(data: Path) -> list[str]:
    """The documents after the cut recorded in `data`/meta.json, in corpus order."""
    meta_path = data / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"--data {data}: no meta.json (expected a directory written by `sparse-lm prepare-data`)")
    meta = json.loads(meta_path.read_text())
    sources_meta = meta["sources"]
    if not sources_meta.get("max_bytes_reached"):
        raise UserError(f"--data {data}: its corpus was prepared whole (no --max-bytes cut), nothing lies beyond it")
    params = meta["params"]
    text_format = TextFormat(params["encoding"], params["errors"], params["doc_separator"])
    sources = parse_corpus(sources_meta["specs"], params["text_field"], text_format)
    kept, total, beyond = sources_meta["documents"], hashlib.sha256(), []
    for i, (text, data_bytes) in enumerate(iter_documents(sources, CorpusStats())):
        if i < kept:
            total.update(hashlib.sha256(data_bytes).digest())
        else:
            beyond.append(text)
    if total.hexdigest() != sources_meta["sha256"]:
        raise UserError(f"--data {data}: the corpus {sources_meta['specs']} now reads differently from when it was "
                        "prepared (sources.sha256 differs); its documents beyond the cut cannot be located")
    return beyond


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared data directory (cut with --max-bytes)")
    parser.add_argument("--out", type=Path, required=True, help="the .jsonl to write ({'text': ...} per line)")
    args = parser.parse_args(argv)
    try:
        docs = documents_beyond(args.data)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not docs:
        print(f"error: --data {args.data}: the cut fell after the corpus's last document", file=sys.stderr)
        return 2
    write_text(args.out, "".join(json.dumps({"text": t}) + "\n" for t in docs))
    size = sum(len(t.encode("utf-8")) for t in docs)
    print(f"{args.out}: {len(docs)} documents, {size:,} bytes beyond the cut of {args.data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
