"""Tensor-parallel building blocks on megatron-core's mappings.

A column-parallel layer's input passes `copy_to_tensor_model_parallel_region` (identity forward,
all-reduce of the input gradient); a row-parallel layer's output passes
`reduce_from_tensor_model_parallel_region` (all-reduce forward). Both run on gloo and NCCL alike
(docs/design/parallel.md, Platform notes); the gather/scatter mappings, which allocate on CUDA, are never used. With one
tensor-parallel rank nothing here touches megatron and every function is the identity, so the
single-process model is the plain one.

Dense shards are our own small module rather than megatron's `ColumnParallelLinear`: that one
adds an `_extra_state` entry to every state dict and builds the full master weight on each rank
when initialising on CPU, while we initialise every shard from the counter-based generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparse_lm.parallel.layout import ShardSpec


def tensor_parallel_group():
    from sparse_lm.parallel.mcore import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def collective_device(group) -> torch.device:
    """Where a small bookkeeping tensor (counts, checksums, extremes) must live to go through a
    collective over `group`: the current GPU when the group runs on NCCL, which takes no CPU
    tensors, else the CPU (gloo, or no group at all)."""
    import torch.distributed as dist

    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def enter_region(x: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """Input of a column-parallel product: its gradient is summed over the group."""
    if spec is None or spec.dim != 0:
        return x
    from sparse_lm.parallel.mcore import tensor_parallel

    return tensor_parallel.copy_to_tensor_model_parallel_region(x)


def leave_region(y: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """Output of a row-parallel product: partial sums added over the group."""
    if spec is None or spec.dim != 1:
        return y
    from sparse_lm.parallel.mcore import tensor_parallel

    return tensor_parallel.reduce_from_tensor_model_parallel_region(y)


def mark_sharded(param: nn.Parameter, spec: ShardSpec | None) -> None:
    """Megatron's attributes: DeepSpeed's gradient-norm counts such a parameter on every TP rank
    (a replicated one only once), and the initialiser knows which global slice it holds."""
    if spec is not None:
        from sparse_lm.parallel.mcore import tensor_parallel

        tensor_parallel.set_tensor_model_parallel_attributes(param, True, spec.dim, 1)


class ShardLinear(nn.Module):
    """A dense linear's shard ([out/T, in] or [out, in/T]) between the TP mappings."""

    def __init__(self, in_features: int, out_features: int, spec: ShardSpec):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        mark_sharded(self.weight, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return leave_region(F.linear(enter_region(x, self.spec), self.weight), self.spec)


class VocabShard:
    """The vocabulary split over the tensor-parallel group, `spec` being this rank's rows: what
    `model.build` hands the model in place of `llama.Vocabulary` (the whole vocabulary) — the
    same four constructors and products, on megatron-core's vocab-parallel embedding and
    cross-entropy, the LM head being this rank's rows of it."""

    def __init__(self, spec: ShardSpec):
        self.spec = spec

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        """megatron-core's VocabParallelEmbedding; its weights are written by our initialiser, so
        megatron's own initialisation is skipped."""
        from sparse_lm.parallel.mcore import ModelParallelConfig, tensor_parallel

        config = ModelParallelConfig(tensor_model_parallel_size=self.spec.size, use_cpu_initialization=True,
                                     perform_initialization=False)
        embedding = tensor_parallel.VocabParallelEmbedding(vocab_size, dim, init_method=nn.init.zeros_, config=config)
        mark_sharded(embedding.weight, self.spec)
        embedding.spec = self.spec
        return embedding

    def head(self, dim: int, vocab_size: int) -> nn.Module:
        return ShardLinear(dim, vocab_size // self.spec.size, self.spec)

    def tied_logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(enter_region(x, self.spec), weight)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean token loss from this rank's slice of the logits."""
        from sparse_lm.parallel.mcore import tensor_parallel

        return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels).mean()


def sharded_modules(model: nn.Module):
    """(name, ShardSpec) of every module whose weight this rank holds only a slice of."""
    for name, module in model.named_modules():
        spec = getattr(module, "spec", None)
        if isinstance(spec, ShardSpec):
            yield name, spec

