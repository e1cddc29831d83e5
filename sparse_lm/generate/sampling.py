"""Choosing the next token from the logits: greedy (temperature 0) or sampled after temperature,
top-k and nucleus (top-p) filtering, from a seeded generator so a seed always gives the same text."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from sparse_lm.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> Sampling:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"--temperature {self.temperature}: expected a number >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k}: expected an integer >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p}: expected a number in (0, 1] (1 keeps every token)")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed {self.seed}: expected an integer in [0, 2^63)")
        return self


def filtered_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """1-D logits with the tokens outside the top k, and outside the smallest set whose probability
    reaches top_p, set to -inf (the most likely token always stays)."""
    logits = logits.clone()
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = -torch.inf
    if top_p < 1:
        ordered, order = torch.sort(logits, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above each
        logits[order[before >= top_p]] = -torch.inf
    return logits


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token from 1-D logits (any device; chosen on the CPU, so a seed gives the same
    tokens on every device that computes the same logits)."""
    logits = logits.detach().float().cpu()
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    logits = filtered_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


class Decoder(Protocol):
    def start(self, ids: list[int]) -> torch.Tensor:
        """Logits after the prompt `ids` (1-D)."""

    def next(self, token: int) -> torch.Tensor:
        """Logits after one more token."""


def generate_ids(decoder: Decoder, prompt: list[int], max_new_tokens: int, sampling: Sampling,
                 eos_id: int | None, vocab: int) -> list[int]:
    """The new tokens after `prompt`: up to max_new_tokens, ending early with EOS (included).
    Only ids below `vocab` (the tokenizer's) are chosen: the model's vocabulary is padded."""
    generator = torch.Generator().manual_seed(sampling.seed)
    out: list[int] = []
    logits = decoder.start(prompt)
    while True:
        token = choose(logits[:vocab], sampling, generator)
        out.append(token)
        if token == eos_id or len(out) == max_new_tokens:
            return out
        logits = decoder.next(token)
