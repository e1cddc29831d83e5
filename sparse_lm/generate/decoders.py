"""The models `generate` runs, behind one interface (`sampling.Decoder`): a sparse_lm checkpoint
through its own sparse kernels, or a Hugging Face directory through transformers; each with its
key/value cache, or (`use_cache=False`) recomputing the whole sequence per token, the reference
the cache must reproduce."""

from __future__ import annotations

import abc
import inspect
from typing import Any

import torch

from sparse_lm.generate.cache import new_cache


class _Decoder(abc.ABC):
    """The sequence bookkeeping both backends share: the ids so far, and per step either only the
    new ids against the cache or, without one, the whole sequence. A backend supplies `_logits`."""

    def __init__(self, model, device: torch.device, use_cache: bool):
        self.model, self.device, self.use_cache = model, device, use_cache
        self.ids: list[int] = []
        self.past: Any = None

    @abc.abstractmethod
    def _logits(self, ids: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
        """Logits (1, len, vocab) of `ids` (1, len) after the cache `past` (None at the start of a
        sequence), and the cache that follows them; without `use_cache`, `ids` is the whole sequence
        and no cache is read or made."""

    @torch.no_grad()
    def _run(self, new: list[int]) -> torch.Tensor:
        self.ids.extend(new)
        ids = new if self.use_cache else self.ids
        logits, self.past = self._logits(torch.tensor([ids], device=self.device), self.past)
        return logits[0, -1]

    def start(self, ids: list[int]) -> torch.Tensor:
        self.ids, self.past = [], None
        return self._run(list(ids))

    def next(self, token: int) -> torch.Tensor:
        return self._run([token])


class SparseLMDecoder(_Decoder):
    def __init__(self, model, capacity: int, device: torch.device, use_cache: bool = True):
        super().__init__(model, device, use_cache)
        self.capacity = capacity

    def _logits(self, ids: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
        if not self.use_cache:
            return self.model.logits(ids), None
        if past is None:
            past = new_cache(len(self.model.layers), self.capacity)
        return self.model.logits(ids, cache=past), past


class HFDecoder(_Decoder):
    def __init__(self, model, device: torch.device, use_cache: bool = True):
        super().__init__(model, device, use_cache)
        # transformers 5 renamed the cache argument and output field (`past_key_values` before)
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _logits(self, ids: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
        if not self.use_cache:
            return self.model(input_ids=ids, use_cache=False).logits, None
        out = self.model(input_ids=ids, use_cache=True, **{self.cache_name: past})
        return out.logits, getattr(out, self.cache_name)
