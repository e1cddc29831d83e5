"""Sliding-window perplexity, as in Hugging Face's fixed-length-model method.

Windows of `context` input tokens start every `stride` tokens; each window scores only the tokens
not scored by the previous one, so overlap is context only and every token after the first is
scored exactly once. Bits per byte (nats / ln 2 / UTF-8 bytes) makes models with different tokenizers
comparable; token perplexity is reported beside it with the protocol (context, stride, counts).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class PerplexityResult:
    perplexity: float
    bits_per_byte: float
    word_perplexity: float
    loss: float
    tokens: int
    bytes: int
    words: int
    context: int
    stride: int

    def as_dict(self) -> dict:
        return asdict(self)


def windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, n_scored) per window: ids[begin:end] holds up to `context` inputs plus the
    shifted targets, and the last n_scored targets are scored here.

    Unlike the Hugging Face recipe, a window spans context + 1 tokens, so with stride == context
    no token at a window edge goes unscored: every token after the first is scored exactly once
    for any stride, and each with at least context - stride tokens before it in its window.
    """
    scored_up_to = 1  # token 0 is never a target
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + context + 1, n_tokens)
        yield begin, end, end - scored_up_to
        scored_up_to = end
        if end == n_tokens:
            break


@torch.no_grad()
def batched_token_nll(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    rows: list[torch.Tensor],
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, nll) per batch of consecutive equal-length rows: nll[k, t] is the loss (nats) of
    rows[start + k][t + 1] given the tokens before it in its row.

    Both the sliding-window score and per-window scoring of arbitrary windows
    (tools/window_losses.py) go through here, so they cannot drift apart.
    """
    i = 0
    while i < len(rows):
        j = i + 1
        while j < len(rows) and j - i < batch_size and len(rows[j]) == len(rows[i]):
            j += 1
        batch = torch.stack(rows[i:j]).long().to(device)
        logp = F.log_softmax(logits_fn(batch[:, :-1]).float(), dim=-1)
        yield i, -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)
        i = j


def sliding_window_nll(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    context: int,
    stride: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods (nats) over `ids` and the number of scored tokens.

    Windows of equal length are batched; `logits_fn` maps [batch, seq] ids to [batch, seq, vocab].
    `shard` = (rank, world) scores only every world-th window, starting at `rank`.
    """
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in (0, context={context}], got {stride}")
    rank, world = shard
    spans = list(windows(len(ids), context, stride))[rank::world]
    total, count = 0.0, 0
    with tqdm(total=len(spans), desc="eval windows", unit="win", disable=not progress) as bar:
        for start, nll in batched_token_nll(logits_fn, [ids[b:e] for b, e, _ in spans], batch_size, device):
            for row, (_, _, n_scored) in zip(nll, spans[start:]):
                total += float(row[-n_scored:].sum(dtype=torch.float64))
                count += n_scored
            bar.update(len(nll))
    return total, count


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf  # a few words with many nats would overflow


def summarize(nats: float, tokens: int, n_bytes: int, n_words: int, context: int, stride: int) -> PerplexityResult:
    """Token perplexity exp(nats/tokens); bits per byte; word perplexity exp(nats/words), which,
    like bits per byte, compares models with different tokenizers."""
    loss = nats / tokens
    return PerplexityResult(
        perplexity=math.exp(loss),
        bits_per_byte=nats / math.log(2) / n_bytes if n_bytes else math.nan,
        word_perplexity=_exp(nats / n_words) if n_words else math.nan,
        loss=loss,
        tokens=tokens,
        bytes=n_bytes,
        words=n_words,
        context=context,
        stride=stride,
    )
