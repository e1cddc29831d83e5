"""Per-window losses of a checkpoint, sorted by what its training saw, and paired comparisons.

    python tools/window_losses.py score --checkpoint RUN/checkpoints --out A.json \\
        --corpus beyond=data/stdlib-beyond-24m.jsonl
    python tools/window_losses.py compare A.json B.json

Why: the study selects on training loss late in one pass over the data. Every window in it is new
to the run, but by then most windows of its *document* may have been trained on, so that loss also
rewards memorising files, and it can rank two models differently from text the run never saw. This
scores one checkpoint on four kinds of window: training windows it trained on (`trained`), training
windows it had not reached (`fresh`, each with the fraction of its document's windows consumed), the
held-out split, and any extra corpora (e.g. the documents after a `--max-bytes` cut, from
tools/corpus_beyond.py). The consumed set is the sampler's: one permutation of the windows per pass,
`samples_seen` from the checkpoint's manifest.

Checkpoints trained on the same data with the same seq_len, seed and number of samples are scored on
the same windows, so `compare` reports paired differences (mean ± standard error, and how often the
first is ahead), with fresh windows also split by whether the window just before them was trained
on and by how much of their document was.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from sparse_lm.atomic import write_text
from sparse_lm.data.packed import PackedSplit
from sparse_lm.errors import UserError


def evenly(indices: np.ndarray, n: int) -> np.ndarray:
    """At most n of `indices`, evenly spaced from first to last (a systematic sample)."""
    if len(indices) <= n:
        return indices
    return indices[np.arange(n) * len(indices) // n]


def document_seen(split: PackedSplit, seq_len: int, trained: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per window: the fraction of its document's windows (a window belongs to the document its
    first token is in) that the run trained on, and what the window just before it was: "trained"
    on, "fresh", or none of the document's ("first")."""
    doc = np.searchsorted(np.asarray(split.doc_offsets), np.arange(len(trained)) * seq_len, side="right") - 1
    total = np.bincount(doc, minlength=split.n_docs)
    seen = np.bincount(doc[trained], minlength=split.n_docs)
    first = np.ones(len(trained), dtype=bool)
    first[1:] = doc[1:] != doc[:-1]
    before = np.where(first, "first", np.where(np.roll(trained, 1), "trained", "fresh"))
    return (seen / np.maximum(total, 1))[doc], before


def window_losses(model, rows: list) -> list[float]:
    """Mean next-token loss (nats) of each row, through the sliding-window score's batching."""
    from sparse_lm.eval.perplexity import batched_token_nll

    return [loss for _, nll in batched_token_nll(model, rows) for loss in nll.double().mean(1).tolist()]


def score(checkpoint: str, corpora: dict[str, str], n_trained: int, n_fresh: int, every: int) -> dict:
    # Imported here: `compare` reads only JSON and should not wait for torch and the model code.
    import torch

    from sparse_lm.checkpoint.model_io import load_trained_model
    from sparse_lm.data.tokenizer import Tokenizer
    from sparse_lm.eval.cli import corpus_tokens
    from sparse_lm.eval.perplexity import windows
    from sparse_lm.train.batches import WindowSampler

    model, cfg, manifest = load_trained_model(checkpoint, "cpu")
    seq_len, data = cfg.train.seq_len, Path(cfg.data.path)
    samples = int(manifest["state"]["samples_seen"])
    split = PackedSplit(data, "train")
    sampler = WindowSampler(split, seq_len, cfg.train.seed)
    trained = sampler.trained_on(samples)
    if trained.all():
        raise UserError(f"--checkpoint {manifest['path']}: its run trained on every training window "
                        f"({samples} samples, {sampler.windows} windows): no fresh windows to score")
    sets: dict[str, dict] = {}
    doc_seen, before = document_seen(split, seq_len, trained)
    for name, pool, n in (("trained", trained, n_trained), ("fresh", ~trained, n_fresh)):
        picked = evenly(np.flatnonzero(pool), n)
        rows = [torch.from_numpy(sampler.window(int(w))) for w in picked]
        sets[name] = {"windows": picked.tolist(), "tokens": [seq_len] * len(rows),
                      "loss": window_losses(model, rows), "doc_seen": doc_seen[picked].tolist(),
                      "before": before[picked].tolist()}
    tokenizer = Tokenizer(Path(manifest["path"]) / "tokenizer.model")
    for name, corpus in {"heldout": "heldout", **corpora}.items():
        ids = corpus_tokens([corpus], data, tokenizer)[0]
        spans = list(windows(len(ids), seq_len, seq_len))[:: 1 if name == "heldout" else every]
        rows = [ids[b:e] for b, e, _ in spans]
        sets[name] = {"windows": [b for b, _, _ in spans], "tokens": [e - b - 1 for b, e, _ in spans],
                      "loss": window_losses(model, rows), "corpus": corpus}
    return {"checkpoint": manifest["path"], "step": manifest["step"], "samples_seen": samples,
            "seq_len": seq_len, "seed": cfg.train.seed, "data": str(data), "every": every, "sets": sets}


def weighted(d: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Token-weighted mean of d and its standard error."""
    w = w / w.sum()
    mean = float((w * d).sum())
    n = len(d)
    se = float(np.sqrt((w**2 * (d - mean) ** 2).sum() * n / (n - 1))) if n > 1 else float("nan")
    return mean, se


def compare(a: dict, b: dict) -> str:
    """Markdown table of A's and B's losses and A − B per set both hold, on the same windows."""
    for key in ("data", "seq_len", "seed", "samples_seen", "every"):
        if a[key] != b[key]:
            raise UserError(f"{key}: {a[key]!r} in the first file, {b[key]!r} in the second; "
                            "only scores on the same windows compare")
    lines = ["| set | windows | A loss | B loss | A − B | A ahead |", "|---|---:|---:|---:|---:|---:|"]

    def row(label: str, la: np.ndarray, lb: np.ndarray, w: np.ndarray) -> None:
        mean, se = weighted(la - lb, w)
        lines.append(f"| {label} | {len(w)} | {weighted(la, w)[0]:.4f} | {weighted(lb, w)[0]:.4f} | "
                     f"{mean:+.4f} ± {se:.4f} | {np.mean(la < lb):.0%} |")

    for name, sa in a["sets"].items():
        sb = b["sets"].get(name)
        if sb is None:
            continue
        if sa["windows"] != sb["windows"]:
            raise UserError(f"set {name}: scored on different windows in the two files")
        la, lb, w = np.array(sa["loss"]), np.array(sb["loss"]), np.array(sa["tokens"], float)
        row(name, la, lb, w)
        if name != "fresh":
            continue
        before = np.array(sa["before"])
        for kind, label in (("trained", "the window before trained on"), ("fresh", "the window before fresh"),
                            ("first", "first of its document")):
            if (before == kind).any():
                row(f"{name}, {label}", la[before == kind], lb[before == kind], w[before == kind])
        if len(w) >= 3:
            seen = np.array(sa["doc_seen"])
            edges = np.quantile(seen, [0, 1 / 3, 2 / 3, 1])
            for k, (lo, hi) in enumerate(zip(edges, edges[1:])):
                m = (seen >= lo) & ((seen < hi) if k < 2 else (seen <= hi))
                if m.any():
                    row(f"{name}, document {lo:.0%}–{hi:.0%} seen", la[m], lb[m], w[m])
    return "\n".join(lines)


def _read_scores(path: Path) -> dict:
    try:
        scores = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read a score file ({type(err).__name__}); write one with `score`") from None
    if not isinstance(scores, dict) or "sets" not in scores:
        raise UserError(f"{path}: not a score file (no 'sets'); write one with `score`")
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score one checkpoint, write JSON")
    s.add_argument("--checkpoint", required=True, help="checkpoint root or step directory")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--corpus", action="append", default=[], metavar="NAME=PATH",
                   help="an extra corpus (file, directory or .jsonl) scored as set NAME (repeatable)")
    s.add_argument("--trained", type=int, default=400, help="training windows the run trained on (default 400)")
    s.add_argument("--fresh", type=int, default=800, help="training windows it had not reached (default 800)")
    s.add_argument("--every", type=int, default=1,
                   help="score every k-th window of the extra corpora (the held-out split: every window)")
    c = sub.add_parser("compare", help="paired differences of two score files (first minus second)")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "compare":
            print(compare(*(_read_scores(p) for p in (args.a, args.b))))
            return 0
        for name, value in (("--trained", args.trained), ("--fresh", args.fresh), ("--every", args.every)):
            if value < 1:
                raise UserError(f"{name} {value}: expected an integer >= 1")
        corpora = {}
        for spec in args.corpus:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path or name in ("trained", "fresh", "heldout", *corpora):
                raise UserError(f"--corpus {spec}: expected NAME=PATH with a new NAME")
            corpora[name] = path
        result = score(args.checkpoint, corpora, args.trained, args.fresh, args.every)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_text(args.out, json.dumps(result) + "\n")
    print(json.dumps({name: [len(s["loss"]), round(weighted(np.array(s["loss"]), np.array(s["tokens"], float))[0], 4)]
                      for name, s in result["sets"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
