"""The models `generate` runs, behind one interface (`sampling.Decoder`): a sparse_lm checkpoint
through its own sparse kernels, or a Hugging Face directory through transformers; each with its
key/value cache, or (`use_cache=False`) recomputing the whole sequence per token, the reference
the cache must reproduce."""

from __future__ import annotations

import inspect

import torch

from sparse_lm.generate.cache import new_cache


class SparseLMDecoder:
    def __init__(self, model, capacity: int, device: torch.device, use_cache: bool = True):
        self.model, self.capacity, self.device, self.use_cache = model, capacity, device, use_cache
        self.ids: list[int] = []
        self.cache = None

    @torch.no_grad()
    def _run(self, new: list[int]) -> torch.Tensor:
        self.ids.extend(new)
        if not self.use_cache:
            return self.model.logits(torch.tensor([self.ids], device=self.device))[0, -1]
        return self.model.logits(torch.tensor([new], device=self.device), cache=self.cache)[0, -1]

    def start(self, ids: list[int]) -> torch.Tensor:
        self.ids, self.cache = [], new_cache(len(self.model.layers), self.capacity)
        return self._run(list(ids))

    def next(self, token: int) -> torch.Tensor:
        return self._run([token])


class HFDecoder:
    def __init__(self, model, device: torch.device, use_cache: bool = True):
        self.model, self.device, self.use_cache = model, device, use_cache
        # transformers 5 renamed the cache argument and output field (`past_key_values` before)
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.ids: list[int] = []
        self.past = None

    @torch.no_grad()
    def _run(self, new: list[int]) -> torch.Tensor:
        self.ids.extend(new)
        if not self.use_cache:
            return self.model(input_ids=torch.tensor([self.ids], device=self.device), use_cache=False).logits[0, -1]
        out = self.model(input_ids=torch.tensor([new], device=self.device), use_cache=True,
                         **{self.cache_name: self.past})
        self.past = getattr(out, self.cache_name)
        return out.logits[0, -1]

    def start(self, ids: list[int]) -> torch.Tensor:
        self.ids, self.past = [], None
        return self._run(list(ids))

    def next(self, token: int) -> torch.Tensor:
        return self._run([token])
