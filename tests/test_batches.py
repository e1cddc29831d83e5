"""Batches from a real prepared split: held-out batches (full micro-batches under a pipeline, one-line
errors for a split too short to evaluate instead of a run that silently never evaluates) and the
set of training windows a run has consumed."""

import numpy as np
import pytest
import torch

from sparse_lm.data.packed import PackedSplit
from sparse_lm.errors import UserError
from sparse_lm.train.batches import WindowSampler, heldout_batches


def test_heldout_batches_in_order_and_drop_a_partial_batch_only_under_a_pipeline(data_dir):
    split = PackedSplit(data_dir, "heldout")
    windows = (split.n_tokens - 1) // 32
    micro = next(m for m in range(3, 20) if windows % m)  # leaves a partial last batch
    batches = heldout_batches(split, 32, micro, max_batches=windows)
    assert [len(b) for b in batches] == [micro] * (windows // micro) + [windows % micro]
    rows = torch.cat(batches)
    tokens = torch.from_numpy(split.tokens[: windows * 32 + 1].astype("int64"))
    assert all(torch.equal(row, tokens[i * 32 : i * 32 + 33]) for i, row in enumerate(rows))  # windows share one token
    full = heldout_batches(split, 32, micro, max_batches=windows, full_only=True)
    assert [len(b) for b in full] == [micro] * (windows // micro)
    assert all(torch.equal(a, b) for a, b in zip(full, batches))


def test_heldout_batches_spread_evenly_over_the_split(data_dir):
    """Fewer windows than the split has: a systematic sample from its start to its end, not its
    first documents (the split is its documents one after another)."""
    split = PackedSplit(data_dir, "heldout")
    windows = (split.n_tokens - 1) // 8
    assert windows >= 12, "the test split is too short to tell a spread from the first windows"
    rows = torch.cat(heldout_batches(split, 8, 2, max_batches=3))
    tokens = torch.from_numpy(split.tokens[: windows * 8 + 1].astype("int64"))
    starts = [k * windows // 6 for k in range(6)]  # the last in the split's last sixth
    assert len(rows) == 6 and all(torch.equal(row, tokens[i * 8 : i * 8 + 9]) for i, row in zip(starts, rows))


def test_heldout_split_too_short_is_one_line(data_dir):
    split = PackedSplit(data_dir, "heldout")
    n = split.n_tokens
    with pytest.raises(UserError, match=rf"\(heldout split\): {n} tokens, fewer than one window of "
                                        rf"train.seq_len\+1={n + 1};"):
        heldout_batches(split, n, 4, 8)
    assert len(heldout_batches(split, n - 1, 4, 8)) == 1  # exactly one window
    with pytest.raises(UserError,
                       match=rf"{n} tokens make 1 windows .* fewer than one micro-batch \(train.micro_batch=4\)"):
        heldout_batches(split, n - 1, 4, 8, full_only=True)


def test_trained_on_marks_exactly_the_windows_sampled(data_dir):
    sampler = WindowSampler(PackedSplit(data_dir, "train"), 32, seed=7)
    for samples in (0, 1, sampler.windows // 3, sampler.windows - 1):
        mask = sampler.trained_on(samples)
        assert int(mask.sum()) == samples  # within one pass no window comes twice
        assert (sorted(sampler.window(i).tobytes() for i in np.flatnonzero(mask))
                == sorted(sampler.sample(g).tobytes() for g in range(samples)))
    assert sampler.trained_on(sampler.windows + 5).all()
