"""The dense Llama: causality, shapes, tied embeddings, and that it learns."""

import dataclasses

import pytest
import torch

from sparse_lm.config import ModelConfig
from sparse_lm.model import Llama, init_weights, resolve_vocab


def small_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=24)
    return ModelConfig(**(base | kw))


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"tie_embeddings": True}])
def test_future_tokens_never_change_earlier_logits(kw):
    model = Llama(small_config(**kw))
    init_weights(model, seed=0)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert a.shape == (2, 20, 97)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_tied_embeddings_share_one_matrix():
    model = Llama(small_config(tie_embeddings=True))
    assert model.lm_head is None and "lm_head.weight" not in model.state_dict()
    untied = Llama(small_config())
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters()) == 97 * 32


def test_init_is_deterministic_and_seeded():
    a, b, c = (Llama(small_config()) for _ in range(3))
    init_weights(a, 5), init_weights(b, 5), init_weights(c, 6)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), n


def test_loss_is_mean_cross_entropy_and_it_learns_a_pattern():
    torch.manual_seed(0)
    model = Llama(small_config())
    init_weights(model, 0)
    ids = torch.arange(20).repeat(4, 1) % 97
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = model(ids[:, :-1], ids[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    logits = model(ids[:, :-1])
    direct = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert model(ids[:, :-1], ids[:, 1:]).item() == pytest.approx(direct.item(), rel=1e-6)
    assert float(direct) < 0.2 * first


def test_vocab_is_rounded_up_to_the_multiple():
    cfg = dataclasses.replace(small_config(), vocab_size=0, vocab_multiple=64)
    assert resolve_vocab(cfg, 4000).vocab_size == 4032
    assert resolve_vocab(dataclasses.replace(cfg, vocab_size=5000), 4000).vocab_size == 5000
