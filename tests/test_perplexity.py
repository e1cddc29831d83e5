"""Sliding-window perplexity: every token after the first scored once, and equal to a direct computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from sparse_lm.config import ModelConfig
from sparse_lm.eval.perplexity import sliding_window_nll, summarize, windows
from sparse_lm.model import Llama, init_weights


@pytest.mark.parametrize("n, context, stride", [(100, 16, 8), (100, 16, 16), (17, 16, 4), (5, 16, 8), (64, 32, 1)])
def test_windows_score_each_token_once(n, context, stride):
    scored = []
    for begin, end, k in windows(n, context, stride):
        assert end - begin <= context + 1 and 0 < k <= min(stride, end - begin - 1) or begin == 0
        scored.extend(range(end - k, end))
    assert scored == list(range(1, n))


def test_full_context_window_equals_direct_cross_entropy():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    model = Llama(cfg).eval()
    init_weights(model, 3)
    ids = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(0))
    nats, count = sliding_window_nll(model, ids, context=39, stride=32)
    with torch.no_grad():
        direct = F.cross_entropy(model(ids[None, :-1])[0], ids[1:], reduction="sum")
    assert count == 39
    assert nats == pytest.approx(float(direct), rel=1e-6)


def test_strided_windows_use_the_right_context():
    """Each scored token's loss must equal the loss computed with exactly its window's context."""
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    model = Llama(cfg).eval()
    init_weights(model, 4)
    ids = torch.randint(0, 50, (45,), generator=torch.Generator().manual_seed(1))
    nats, count = sliding_window_nll(model, ids, context=16, stride=6, batch_size=3)
    expected = 0.0
    with torch.no_grad():
        for begin, end, k in windows(45, 16, 6):
            logp = F.log_softmax(model(ids[None, begin : end - 1])[0], -1)
            targets = ids[begin + 1 : end]
            expected -= float(logp[torch.arange(len(targets)), targets][-k:].sum())
    assert count == 44
    assert nats == pytest.approx(expected, rel=1e-6)


def test_summary_units():
    r = summarize(nats=100 * math.log(2), tokens=50, n_bytes=200, n_words=25, context=8, stride=4)
    assert r.bits_per_byte == pytest.approx(0.5)
    assert r.perplexity == pytest.approx(4.0)
    assert r.word_perplexity == pytest.approx(16.0)  # 4 bits of surprise per word


def test_sharded_windows_add_up_to_the_whole():
    """Ranks scoring every world-th window together score every token exactly once."""
    torch.manual_seed(0)
    table = torch.randn(50, 50)
    ids = torch.randint(0, 50, (103,))
    logits_fn = lambda rows: table[rows]  # noqa: E731
    whole = sliding_window_nll(logits_fn, ids, context=10, stride=7, batch_size=3)
    parts = [sliding_window_nll(logits_fn, ids, context=10, stride=7, batch_size=3, shard=(r, 3)) for r in range(3)]
    assert sum(c for _, c in parts) == whole[1]
    assert sum(n for n, _ in parts) == pytest.approx(whole[0], rel=1e-9)
