"""The key/value cache of incremental decoding: each generated token runs one position through the
model instead of the whole sequence again."""

from __future__ import annotations

import torch


class LayerCache:
    """One attention layer's keys and values so far, in a buffer sized for the whole generation
    (`capacity` positions), so appending a position copies one position, not the history."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [batch, kv_heads, new positions, head_dim]; returns every position's, in order."""
        if self._k is None:
            shape = (*k.shape[:2], self.capacity, k.shape[-1])
            self._k, self._v = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {end} requested")
        self._k[:, :, self.length:end], self._v[:, :, self.length:end] = k, v
        self.length = end
        return self._k[:, :, :end], self._v[:, :, :end]


def new_cache(n_layers: int, capacity: int) -> list[LayerCache]:
    """An empty cache for a model of `n_layers` blocks (`Llama.logits(ids, cache=...)`)."""
    return [LayerCache(capacity) for _ in range(n_layers)]
