"""`sparse-lm generate`: text from a checkpoint (any tensor/pipeline layout, merged into one
process and run through its sparse kernels) or an exported Hugging Face directory."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sparse_lm.errors import UserError
from sparse_lm.generate.sampling import Sampling, generate_ids


@dataclass
class Generator:
    """A loaded model ready to continue prompts."""

    decoder: object
    tokenizer: object
    context: int  # positions the model can attend over (model.max_seq_len)
    where: str

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt as a document start: after EOS, as every document but the first follows one
        in training (so an empty prompt is a valid start)."""
        return [self.tokenizer.eos_id, *self.tokenizer.encode(prompt)]

    def generate(self, prompt: str, max_new_tokens: int, sampling: Sampling) -> tuple[list[int], bool]:
        """(new token ids, whether the context cut generation short)."""
        if max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {max_new_tokens}: expected an integer >= 1")
        ids = self.prompt_ids(prompt)
        if len(ids) >= self.context:
            raise UserError(f"--prompt: {len(ids) - 1} tokens, no room left in the model's context of "
                            f"{self.context} (model.max_seq_len; 1 position holds the leading EOS); shorten it")
        room = self.context - len(ids)
        new = generate_ids(self.decoder, ids, min(max_new_tokens, room), sampling, self.tokenizer.eos_id,
                           self.tokenizer.vocab_size)
        return new, max_new_tokens > room and len(new) == room and new[-1] != self.tokenizer.eos_id

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.tokenizer.eos_id])


def load_generator(checkpoint: str, device: torch.device, use_cache: bool = True) -> Generator:
    from sparse_lm.checkpoint.hf import is_hf_dir, load_hf_for_eval
    from sparse_lm.generate.decoders import HFDecoder, SparseLMDecoder

    if is_hf_dir(checkpoint):
        hf = load_hf_for_eval(checkpoint, device)
        return Generator(HFDecoder(hf["model"], device, use_cache), hf["tokenizer"], hf["max_seq_len"], checkpoint)
    from sparse_lm.checkpoint.model_io import load_trained_model
    from sparse_lm.data.tokenizer import Tokenizer

    model, cfg, manifest = load_trained_model(checkpoint, device)
    context = cfg.model.max_seq_len
    tokenizer = Tokenizer(Path(manifest["path"]) / "tokenizer.model")
    return Generator(SparseLMDecoder(model, context, device, use_cache), tokenizer, context, manifest["path"])


def run(args: argparse.Namespace) -> int:
    from sparse_lm.eval.cli import eval_device

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed).check()
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: expected an integer >= 1")
    generator = load_generator(args.checkpoint, eval_device(args.device))
    started = time.time()
    new, cut = generator.generate(args.prompt, args.max_new_tokens, sampling)
    seconds = time.time() - started
    print(args.prompt + generator.text(new), flush=True)
    end = "the model's context" if cut else ("EOS" if new[-1] == generator.tokenizer.eos_id else "--max-new-tokens")
    print(f"{len(new)} tokens in {seconds:.2f} s ({len(new) / max(seconds, 1e-9):.1f} tok/s); stopped at {end} | "
          f"{generator.where}", file=sys.stderr)
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="sample text from a checkpoint or a Hugging Face directory")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory (a step_* dir or the root with `latest`), "
                             "or a Hugging Face Llama directory")
    parser.add_argument("--prompt", required=True, help="text to continue (may be empty)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: all)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample among the most likely tokens holding this probability (default 1: all)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same text (default 0)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK where there is CUDA, else cpu)")
    parser.set_defaults(func=run)
