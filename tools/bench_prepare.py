"""Throughput of `sparse-lm prepare-data` on plain text, against the bare tokenizer's own speed.

    python tools/bench_prepare.py --mb 30 --json docs/bench/prepare.json --markdown docs/bench/prepare.md

The text is generated here, without a network: the interpreter's standard-library sources, in
sorted path order, repeated if needed until --mb megabytes. It is prepared two ways:

* one big `.txt` file, a single document (a dictionary or a book as users have them);
* a `.jsonl` file with one standard-library file per line (many documents, Megatron style);

each with `--num-proc` 1 and 2, through the command line in a fresh process (so the times include
starting Python and importing `datasets`), with a tokenizer trained once beforehand and passed with
`--tokenizer`, so that the numbers are the data path alone. The limit to approach is the bare
tokenizer: sentencepiece `encode` of the whole text in one process. MB/s are input megabytes
(10^6 UTF-8 bytes) per second of wall time. Before reporting, the token files written with 1 and
2 processes are compared byte for byte; a difference exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import sentencepiece

from bench_step import cpu_model, write_report
from sparse_lm.data.sources import stdlib_files
from sparse_lm.data.tokenizer import Tokenizer, train_tokenizer

TOKEN_FILES = ("train.bin", "heldout.bin", "train.idx.npy", "heldout.idx.npy")
# Enough text for a representative vocabulary, small enough to train in seconds.
TOKENIZER_SAMPLE_CHARS = 4 << 20


def stdlib_texts(total_bytes: int) -> list[str]:
    """Standard-library sources (UTF-8 ones only) in order, cycling, until `total_bytes`."""
    texts, size = [], 0
    files = stdlib_files()
    while size < total_bytes:
        for path in files:
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            if not text.strip() or "\0" in text:
                continue
            texts.append(text)
            size += len(text.encode("utf-8"))
            if size >= total_bytes:
                break
    return texts


def environment() -> dict:
    """What the timings depend on; the load average shows how busy the machine was."""
    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "sentencepiece": sentencepiece.__version__, "datasets": datasets.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def run_prepare(corpus: Path, out: Path, model: Path, num_proc: int, vocab_size: int) -> float:
    """Wall seconds of one `prepare-data` command (exits on failure, printing its error)."""
    command = [sys.executable, "-m", "sparse_lm", "prepare-data", "--corpus", str(corpus), "--out", str(out),
               "--tokenizer", str(model), "--num-proc", str(num_proc), "--vocab-size", str(vocab_size)]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"prepare-data failed ({' '.join(command)}):\n{proc.stderr[-3000:]}")
    return seconds


def markdown(report: dict) -> str:
    env, cfg = report["environment"], report["config"]
    mb = report["text_bytes"] / 1e6
    lines = [
        "# `prepare-data` throughput on plain text",
        "",
        (f"{mb:.1f} MB of Python standard-library source ({report['documents']:,} files), vocab "
        f"{cfg['vocab_size']:,} (tokenizer trained beforehand, passed with `--tokenizer`). python {env['python']}, "
        f"sentencepiece {env['sentencepiece']}, datasets {env['datasets']}, {env['cpu_count']} CPUs "
        f"({env['cpu']}), {env['platform']}."),
        "",
        "| input | processes | wall s | MB/s | share of bare encode |",
        "|---|---:|---:|---:|---:|",
    ]
    bare = report["bare_encode_mb_s"]
    lines.append(f"| bare sentencepiece `encode`, whole text | 1 | {report['bare_encode_s']:.1f} | {bare:.2f} | 100% |")
    for r in report["results"]:
        lines.append(f"| {r['input']} | {r['num_proc']} | {r['seconds']:.1f} | {r['mb_s']:.2f} "
                     f"| {r['mb_s'] / bare:.0%} |")
    lines += [
        "",
        ("`prepare-data` times are whole commands in a fresh process: start-up and imports, the scan (read, "
        "decode, hash), building the arrow dataset, tokenising, packing. Token files with 1 and 2 processes "
        "are identical (checked)."),
        "",
        (f"Load average at start / end: {env['load_average_at_start'][0]:.2f} / "
        f"{env['load_average_at_end'][0]:.2f}."),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=30.0, help="megabytes of text to generate")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", help="write the Markdown table here (it is printed either way)")
    args = parser.parse_args(argv)
    env = environment()
    texts = stdlib_texts(int(args.mb * 1e6))
    whole = "".join(texts)
    size = len(whole.encode("utf-8"))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        tmp = Path(tmp)
        model = train_tokenizer([whole[:TOKENIZER_SAMPLE_CHARS]], tmp / "bench.model", args.vocab_size)
        tok = Tokenizer(model)
        start = time.perf_counter()
        tok.encode(whole)
        bare_s = time.perf_counter() - start
        big = tmp / "big.txt"
        big.write_text(whole, encoding="utf-8")
        many = tmp / "many.jsonl"
        many.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        for name, corpus in (("one .txt file, one document", big), ("one .jsonl file, one document per file", many)):
            outputs = []
            for num_proc in args.num_proc:
                out = tmp / f"out-{corpus.stem}-{num_proc}"
                seconds = run_prepare(corpus, out, model, num_proc, args.vocab_size)
                results.append({"input": name, "corpus": corpus.name, "num_proc": num_proc, "seconds": seconds,
                                "mb_s": size / 1e6 / seconds})
                print(f"{name}, {num_proc} process(es): {seconds:.1f} s", file=sys.stderr)
                outputs.append({f: (out / f).read_bytes() for f in TOKEN_FILES})
            if any(o != outputs[0] for o in outputs):
                sys.exit(f"{name}: token files differ between --num-proc {args.num_proc}")
    env["load_average_at_end"] = os.getloadavg()
    report = {
        "config": vars(args), "environment": env, "text_bytes": size, "documents": len(texts),
        "bare_encode_s": bare_s, "bare_encode_mb_s": size / 1e6 / bare_s, "results": results,
    }
    table = markdown(report)
    write_report(report, args.json, args.markdown, table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
