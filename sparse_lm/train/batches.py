"""Deterministic training and held-out batches from packed token files.

A batch is a pure function of (seed, global sample index): sample g lands in epoch g // W
(W = number of windows of seq_len + 1 tokens starting every seq_len tokens: a window's last target
is the next one's first input) at a seeded permutation position.
Resume therefore needs only the count of samples consumed — no sampler state, no RNG to restore —
and every data-parallel layout sees the same global stream of samples.
"""

from __future__ import annotations

import numpy as np
import torch

from sparse_lm.data.packed import PackedSplit
from sparse_lm.errors import UserError


class WindowSampler:
    def __init__(self, split: PackedSplit, seq_len: int, seed: int):
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.windows = (split.n_tokens - 1) // seq_len
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.windows, generator=gen)
        return self._perm

    def window(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return np.asarray(self.split.tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def sample(self, g: int) -> np.ndarray:
        epoch, pos = divmod(g, self.windows)
        return self.window(int(self._permutation(epoch)[pos]))

    def trained_on(self, samples: int) -> np.ndarray:
        """Boolean mask over the windows: True for each window among samples 0 … samples-1.

        Analyses of a checkpoint need it (`samples_seen` is in its manifest): training loss late
        in a pass is measured on windows the run has not seen but whose documents it may largely
        have seen, and telling those apart needs the set it trained on.
        """
        mask = np.zeros(self.windows, dtype=bool)
        if samples >= self.windows:
            mask[:] = True
        elif samples > 0:
            mask[self._permutation(0)[:samples].numpy()] = True
        return mask

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples first … first+count-1 as (inputs, next-token targets)."""
        rows = torch.from_numpy(np.stack([self.sample(g) for g in range(first, first + count)]))
        return rows[:, :-1], rows[:, 1:]


def train_sampler(split: PackedSplit, seq_len: int, seed: int, global_batch: int) -> WindowSampler:
    sampler = WindowSampler(split, seq_len, seed)
    if sampler.windows < global_batch:
        raise UserError(
            f"training data {split.data_dir} ({split.split} split): {split.n_tokens} tokens make "
            f"{sampler.windows} windows of "
            f"train.seq_len+1={seq_len + 1}, fewer than one global batch ({global_batch}); "
            "use more data or a smaller train.micro_batch / train.seq_len"
        )
    return sampler


_HELDOUT_HINT = "prepare the data with a larger --heldout-fraction, or use a smaller train.seq_len"


def heldout_batches(split: PackedSplit, seq_len: int, micro_batch: int, max_batches: int,
                    full_only: bool = False) -> list[torch.Tensor]:
    """`max_batches` × `micro_batch` held-out windows spread evenly over the split, in order: the
    same every evaluation.

    Spread, not the first ones: a prepared split is its documents one after another, so the first
    windows are its first few documents, and one of them (a table, say, with near-copies in the
    training split) can make the loop's held-out loss far from the split's. Evenly spaced windows are
    a systematic sample of the whole split, every document in proportion to its length.

    `full_only` (a pipeline: DeepSpeed's PipelineEngine sends activations through buffers shaped
    by its first micro-batch) drops a last, partial batch. A split too short for one batch is an
    error rather than a run that quietly never evaluates.
    """
    sampler = WindowSampler(split, seq_len, seed=0)
    n = min(sampler.windows, micro_batch * max_batches)
    if full_only:
        n -= n % micro_batch
    if n <= 0:
        where = f"held-out data {split.data_dir} ({split.split} split): {split.n_tokens} tokens"
        if sampler.windows < 1:
            raise UserError(f"{where}, fewer than one window of train.seq_len+1={seq_len + 1}; {_HELDOUT_HINT}")
        raise UserError(f"{where} make {sampler.windows} windows of train.seq_len+1={seq_len + 1}, fewer than one "
                        f"micro-batch (train.micro_batch={micro_batch}), which a pipeline evaluates whole; "
                        f"{_HELDOUT_HINT} or train.micro_batch")
    rows = [torch.from_numpy(sampler.window(k * sampler.windows // n)) for k in range(n)]
    return [torch.stack(rows[i : i + micro_batch]) for i in range(0, n, micro_batch)]
