"""`sparse-lm eval`: held-out perplexity, bits per byte and word perplexity of a checkpoint on a
corpus; launched with several ranks (`torchrun --nproc_per_node N -m sparse_lm eval ...`) the
windows are split over them."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from sparse_lm.atomic import check_writable, write_json
from sparse_lm.errors import UserError
from sparse_lm.eval.perplexity import PerplexityResult, sliding_window_nll, summarize


def count_words(text: str) -> int:
    """Whitespace-separated words, the unit of word perplexity (as in lm-evaluation-harness)."""
    return len(text.split())


def corpus_tokens(corpus: list[str], data_dir: Path, tokenizer,
                  text_field: str = "text") -> tuple[torch.Tensor, int, int, str]:
    """(token stream, UTF-8 bytes, words, description) for `heldout` of the prepared data, or
    files, directories and `hf:NAME[:CONFIG]` datasets (the text in `text_field` of .jsonl,
    .parquet and hub records).

    Documents are joined exactly as in training: each followed by EOS. The held-out split's words
    are counted on its text, decoded document by document with the data's own tokenizer (lossless).
    """
    from sparse_lm.data.packed import PackedSplit
    from sparse_lm.data.sources import CorpusStats, iter_documents, parse_corpus
    from sparse_lm.data.tokenizer import Tokenizer

    if corpus == ["heldout"]:
        split = PackedSplit(data_dir, "heldout")
        tokens = np.asarray(split.tokens, dtype=np.int64)
        decoder = Tokenizer(data_dir / split.meta["tokenizer"])
        offsets = np.asarray(split.doc_offsets).tolist()
        words = sum(count_words(decoder.decode(t for t in tokens[a:b].tolist() if t != decoder.eos_id))
                    for a, b in zip(offsets, offsets[1:]))
        return torch.from_numpy(tokens), split.n_bytes, words, f"{data_dir} (heldout)"
    stats = CorpusStats()
    ids: list[int] = []
    words = 0
    for text, _ in iter_documents(parse_corpus(corpus, text_field), stats):
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
        words += count_words(text)
    if stats.documents == 0:
        raise UserError(f"--corpus {' '.join(corpus)}: no non-empty documents")
    return torch.tensor(ids, dtype=torch.long), stats.bytes, words, " ".join(corpus)


def _check_same_tokenizer(tokenizer, checkpoint: str, data_dir: Path) -> None:
    """Held-out ids from another tokenizer than the model's would be scored as scrambled text.
    The model's tokenizer.model (a checkpoint's; a Hugging Face directory's, where it has one: an
    HF tokenizer alone gives nothing to compare) must be the one the data's meta.json records."""
    from sparse_lm.data.packed import load_meta
    from sparse_lm.data.tokenizer import Tokenizer

    if isinstance(tokenizer, Tokenizer) and tokenizer.sha256 != load_meta(data_dir)["tokenizer_sha256"]:
        raise UserError(f"--data {data_dir}: tokenised with a different tokenizer than {checkpoint}; "
                        f"evaluate on text files instead, or prepare the data with its tokenizer.model")


def eval_device(requested: str | None) -> torch.device:
    """Where the model runs: `--device`, else this rank's GPU (cuda:LOCAL_RANK) where there is
    CUDA, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        requested = f"cuda:{local_rank}"
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {requested}: expected cpu, cuda (this rank's GPU) or cuda:N")
    if device.type == "cuda":
        index = local_rank if device.index is None else device.index  # torch wraps cuda:999 to a negative index
        if not 0 <= index < torch.cuda.device_count():
            raise UserError(f"--device {requested}: no such device here ({torch.cuda.device_count()} CUDA devices); "
                            "pass --device cpu or cuda:N")
        device = torch.device("cuda", index)
    return device


def evaluate(checkpoint: str, corpus: list[str], context: int | None, stride: int | None,
             batch_size: int, data_dir: str | None, progress: bool = True, device: str | None = None,
             text_field: str = "text") -> dict:
    from sparse_lm.checkpoint.hf import is_hf_dir, load_hf_for_eval
    from sparse_lm.checkpoint.model_io import load_trained_model
    from sparse_lm.data.tokenizer import Tokenizer

    for name, value in (("--context", context), ("--stride", stride), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value}: expected an integer >= 1")
    hf_dir = is_hf_dir(checkpoint)
    run_on = eval_device(device)
    if hf_dir:  # a Hugging Face Llama directory, e.g. from `sparse-lm convert`
        hf = load_hf_for_eval(checkpoint, run_on)
        model, tokenizer, where, step = hf["logits_fn"], hf["tokenizer"], checkpoint, hf["step"]
        seq_len, max_seq_len, data_path = hf["seq_len"], hf["max_seq_len"], hf["data_path"]
        if data_dir is None and data_path is None and corpus == ["heldout"]:
            raise UserError(f"--data: needed for `--corpus heldout` with {checkpoint} (it records no data path)")
    else:
        model, cfg, manifest = load_trained_model(checkpoint, run_on)
        where, step = manifest["path"], manifest["step"]
        tokenizer = Tokenizer(Path(where) / "tokenizer.model")
        seq_len, max_seq_len, data_path = cfg.train.seq_len, cfg.model.max_seq_len, cfg.data.path
    data = Path(data_dir or data_path or ".")
    if corpus == ["heldout"]:
        _check_same_tokenizer(tokenizer, where, data)
    context = seq_len if context is None else context
    if context > max_seq_len:
        raise UserError(f"--context {context}: longer than the model's context (model.max_seq_len={max_seq_len})")
    stride = max(1, context // 2) if stride is None else stride
    if stride > context:
        raise UserError(f"--stride {stride}: expected 1..{context} (the context)")
    ids, n_bytes, n_words, description = corpus_tokens(corpus, data, tokenizer, text_field)
    if len(ids) < 2:
        raise UserError(f"--corpus {description}: fewer than 2 tokens, nothing to score")
    rank, world = _ranks()
    nats, count = sliding_window_nll(model, ids, context, stride, batch_size=batch_size, device=run_on,
                                     progress=progress and rank == 0, shard=(rank, world))
    if world > 1:  # each rank scored every world-th window: add them up
        import torch.distributed as dist

        sums = torch.tensor([nats, float(count)], dtype=torch.float64)
        dist.all_reduce(sums)
        nats, count = float(sums[0]), int(sums[1])
    result: PerplexityResult = summarize(nats, count, n_bytes, n_words, context, stride)
    return result.as_dict() | {"checkpoint": str(where), "step": step, "corpus": description, "ranks": world}


def _ranks() -> tuple[int, int]:
    """(rank, world): a launcher (`torchrun`, `deepspeed`) sets WORLD_SIZE; windows are then split
    over the ranks. Each rank holds the whole model; the group is gloo even on GPUs, since all it
    carries is one all-reduce of two numbers, on the CPU."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), world


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    reports = int(os.environ.get("RANK", "0")) == 0  # one report per launch
    if args.json and reports:
        check_writable(args.json, "--json", is_file=True)
    try:
        out = evaluate(args.checkpoint, args.corpus, args.context, args.stride, args.batch_size, args.data,
                       device=args.device, text_field=args.text_field)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if not reports:
        return 0
    print(
        f"perplexity {out['perplexity']:.3f} | bits/byte {out['bits_per_byte']:.4f} | "
        f"word perplexity {out['word_perplexity']:.3f} | loss {out['loss']:.4f} | "
        f"{out['tokens']} tokens, {out['bytes']} bytes, {out['words']} words | context {out['context']} "
        f"stride {out['stride']} | {out['corpus']} | {out['checkpoint']}"
        + (f" | {out['ranks']} ranks" if out["ranks"] > 1 else "")
    )
    if args.json:
        write_json(args.json, out)
    return 0



def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="perplexity, bits per byte and word perplexity of a checkpoint on held-out text")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory (a step_* dir or the root with `latest`), "
                             "or a Hugging Face Llama directory")
    parser.add_argument("--corpus", nargs="+", default=["heldout"],
                        help="`heldout` (the prepared data's held-out split), .txt/.jsonl/.parquet files or "
                             "directories, or hf:NAME[:CONFIG] (a `datasets` dataset's train split)")
    parser.add_argument("--data", default=None,
                        help="prepared data directory for `heldout` (default: the run's data.path)")
    parser.add_argument("--context", type=int, default=None, help="window length in tokens (default: train.seq_len)")
    parser.add_argument("--stride", type=int, default=None, help="window step in tokens (default: context / 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None,
                        help="cpu, cuda (this rank's GPU) or cuda:N (default: cuda:LOCAL_RANK where there is CUDA, "
                             "else cpu; a Hugging Face directory runs on the CPU)")
    parser.add_argument("--text-field", default="text", help="jsonl field / parquet or hub column holding the text")
    parser.add_argument("--json", default=None, help="write the result as JSON here")
    parser.set_defaults(func=run)
