"""`sparse-lm eval`: held-out perplexity and bits per byte of a checkpoint on a corpus."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from sparse_lm.atomic import write_json
from sparse_lm.errors import UserError
from sparse_lm.eval.perplexity import PerplexityResult, sliding_window_nll, summarize


def corpus_tokens(corpus: list[str], data_dir: Path, tokenizer) -> tuple[torch.Tensor, int, str]:
    """(token stream, UTF-8 bytes, description) for `heldout` of the prepared data, or files/directories.

    Documents are joined exactly as in training: each followed by EOS.
    """
    from sparse_lm.data.packed import PackedSplit
    from sparse_lm.data.sources import CorpusStats, iter_documents, parse_corpus

    if corpus == ["heldout"]:
        split = PackedSplit(data_dir, "heldout")
        return torch.from_numpy(np.asarray(split.tokens, dtype=np.int64)), split.n_bytes, f"{data_dir} (heldout)"
    stats = CorpusStats()
    ids: list[int] = []
    for text, _ in iter_documents(parse_corpus(corpus), stats):
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
    if stats.documents == 0:
        raise UserError(f"--corpus {' '.join(corpus)}: no non-empty documents")
    return torch.tensor(ids, dtype=torch.long), stats.bytes, " ".join(corpus)


def evaluate(checkpoint: str, corpus: list[str], context: int | None, stride: int | None,
             batch_size: int, data_dir: str | None, progress: bool = True) -> dict:
    from sparse_lm.checkpoint.hf import is_hf_dir, load_hf_for_eval
    from sparse_lm.checkpoint.model_io import load_trained_model
    from sparse_lm.data.tokenizer import Tokenizer

    if is_hf_dir(checkpoint):  # a Hugging Face Llama directory, e.g. from `sparse-lm convert`
        hf = load_hf_for_eval(checkpoint)
        model, tokenizer, where, step = hf["logits_fn"], hf["tokenizer"], checkpoint, hf["step"]
        seq_len, max_seq_len, data_path = hf["seq_len"], hf["max_seq_len"], hf["data_path"]
        if data_dir is None and data_path is None and corpus == ["heldout"]:
            raise UserError(f"--data: needed for `--corpus heldout` with {checkpoint} (it records no data path)")
    else:
        model, cfg, manifest = load_trained_model(checkpoint)
        where, step = manifest["path"], manifest["step"]
        tokenizer = Tokenizer(Path(where) / "tokenizer.model")
        seq_len, max_seq_len, data_path = cfg.train.seq_len, cfg.model.max_seq_len, cfg.data.path
    context = context or seq_len
    if context > max_seq_len:
        raise UserError(f"--context {context}: longer than the model's context (model.max_seq_len={max_seq_len})")
    stride = stride or max(1, context // 2)
    if not 0 < stride <= context:
        raise UserError(f"--stride {stride}: expected 1..{context} (the context)")
    ids, n_bytes, description = corpus_tokens(corpus, Path(data_dir or data_path or "."), tokenizer)
    if len(ids) < 2:
        raise UserError(f"--corpus {description}: fewer than 2 tokens, nothing to score")
    nats, count = sliding_window_nll(model, ids, context, stride, batch_size=batch_size, progress=progress)
    result: PerplexityResult = summarize(nats, count, n_bytes, context, stride)
    return result.as_dict() | {"checkpoint": str(where), "step": step, "corpus": description}


def run(args: argparse.Namespace) -> int:
    out = evaluate(args.checkpoint, args.corpus, args.context, args.stride, args.batch_size, args.data)
    print(
        f"perplexity {out['perplexity']:.3f} | bits/byte {out['bits_per_byte']:.4f} | loss {out['loss']:.4f} | "
        f"{out['tokens']} tokens, {out['bytes']} bytes | context {out['context']} stride {out['stride']} | "
        f"{out['corpus']} | {out['checkpoint']}"
    )
    if args.json:
        write_json(args.json, out)
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="perplexity and bits per byte of a checkpoint on held-out text")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (a step_* dir or the root with `latest`), or a Hugging Face Llama directory")
    parser.add_argument("--corpus", nargs="+", default=["heldout"],
                        help="`heldout` (the prepared data's held-out split) or .txt/.jsonl/.parquet files/directories")
    parser.add_argument("--data", default=None, help="prepared data directory for `heldout` (default: the run's data.path)")
    parser.add_argument("--context", type=int, default=None, help="window length in tokens (default: train.seq_len)")
    parser.add_argument("--stride", type=int, default=None, help="window step in tokens (default: context / 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", default=None, help="write the result as JSON here")
    parser.set_defaults(func=run)
