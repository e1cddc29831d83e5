"""The counter-based initialiser: its compiled CPU hash gives bit for bit the numbers of the torch
expression (which is what runs on other devices), and the numbers are standard normal."""

from __future__ import annotations

import pytest
import torch

from sparse_lm.sparsity.init import counter_normal, counter_normal_at
from sparse_lm.sparsity.kernels import cpu


def _positions() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.cat([torch.arange(0, 5000),  # element 0 and the first rows
                      torch.randint(0, 1 << 32, (5000,), generator=gen),
                      torch.arange((1 << 32) - 2500, (1 << 32) + 2500),  # across the 32-bit boundary
                      torch.randint(1 << 32, 1 << 44, (5000,), generator=gen)])


@pytest.mark.parametrize("seed, stream", [(0, 0), (1234, 0xDEADBEEF), ((1 << 40) + 7, 99)])
def test_compiled_hash_is_the_torch_expression_bit_for_bit(monkeypatch, seed, stream):
    assert cpu.ops() is not None, "the compiled CPU kernels did not build"
    positions = _positions()
    fast = counter_normal_at(seed, stream, positions, 0.02)
    small = counter_normal_at(seed, stream, positions[:5000], 0.02)  # all below 2^32: the other torch branch
    monkeypatch.setattr(cpu, "ops", lambda: None)
    torch.testing.assert_close(fast, counter_normal_at(seed, stream, positions, 0.02), rtol=0, atol=0)
    torch.testing.assert_close(small, counter_normal_at(seed, stream, positions[:5000], 0.02), rtol=0, atol=0)


@pytest.mark.parametrize("start", [0, (1 << 32) - 2500, (1 << 44) + 3])
def test_compiled_ranges_are_the_torch_expression_bit_for_bit(monkeypatch, start):
    """`counter_normal` hashes a range without building its positions (compiled) — the same bits as
    the torch expression at those positions."""
    assert cpu.ops() is not None, "the compiled CPU kernels did not build"
    fast = counter_normal(77, 5, start, 5000, 0.3)
    monkeypatch.setattr(cpu, "ops", lambda: None)
    torch.testing.assert_close(fast, counter_normal(77, 5, start, 5000, 0.3), rtol=0, atol=0)
    torch.testing.assert_close(fast, counter_normal_at(77, 5, torch.arange(start, start + 5000), 0.3), rtol=0, atol=0)


def test_values_are_standard_normal_and_depend_on_seed_and_stream():
    x = counter_normal(seed=3, stream=5, start=0, count=1 << 20, std=1.0)
    assert abs(x.mean().item()) < 5e-3 and abs(x.std().item() - 1) < 5e-3  # 1M samples: se 1e-3
    assert abs((x > 1.96).float().mean().item() - 0.025) < 1e-3
    assert torch.isfinite(x).all()
    other_seed = counter_normal(seed=4, stream=5, start=0, count=1000, std=1.0)
    other_stream = counter_normal(seed=3, stream=6, start=0, count=1000, std=1.0)
    assert abs(torch.corrcoef(torch.stack([x[:1000], other_seed]))[0, 1]) < 0.1
    assert abs(torch.corrcoef(torch.stack([x[:1000], other_stream]))[0, 1]) < 0.1
    torch.testing.assert_close(counter_normal(3, 5, 100, 10, 1.0), x[100:110], rtol=0, atol=0)
