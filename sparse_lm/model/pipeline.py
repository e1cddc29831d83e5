"""The Llama decoder as a DeepSpeed `PipelineModule`: embedding, one stage layer per block, head.

DeepSpeed's pipeline engine (on gloo and NCCL alike; megatron-core's schedules need CUDA) runs
the micro-batches; its `PipeModelDataParallelTopology` orders ranks model-fastest, then data, then
pipe — exactly megatron-core's default tp-dp-pp order, so its groups and megatron's coincide.

Each pipeline layer holds its modules under the single-process model's names: the embedding stage
has `embed_tokens`, block i has `layers.i`, the head has `norm` and `lm_head`. DeepSpeed prefixes
them with the layer's position (`3.layers.2.mlp.up_proj.values`), so stripping that first
component gives the canonical name used by checkpoints, the initialiser's streams and export.
"""

from __future__ import annotations

import torch
from torch import nn

from sparse_lm.config import ModelConfig
from sparse_lm.model.llama import Block, LinearFactory, RMSNorm, Rotary, Vocabulary
from sparse_lm.parallel.state import Topology


class EmbeddingStage(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: Vocabulary):
        super().__init__()
        self.embed_tokens = vocab.embedding(cfg.vocab_size, cfg.d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)


class BlockStage(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, linear: LinearFactory, recompute: bool):
        super().__init__()
        rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleDict({str(index): Block(cfg, index, linear, rotary, recompute)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (block,) = self.layers.values()
        return block(x)


class HeadStage(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: Vocabulary):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = vocab.head(cfg.d_model, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


def build_pipeline(cfg: ModelConfig, linear: LinearFactory, vocab: Vocabulary, topology: Topology,
                   recompute: bool = False) -> nn.Module:
    """This rank's stage of the pipeline: blocks split evenly over `topology.pipeline` stages, the
    embedding on the first, the head on the last. Tied embeddings would span two stages and are
    refused by the config. `recompute`: activation checkpointing, block by block (`llama.Block`),
    which DeepSpeed's pipeline engine sees as ordinary layers."""
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    layers = [LayerSpec(EmbeddingStage, cfg, vocab),
              *(LayerSpec(BlockStage, cfg, i, linear, recompute) for i in range(cfg.n_layers)),
              LayerSpec(HeadStage, cfg, vocab)]
    module = PipelineModule(
        layers, topology=PipeModelDataParallelTopology(num_pp=topology.pipeline, num_mp=topology.tensor,
                                                       num_dp=topology.data),
        loss_fn=vocab.loss, partition_method="type:BlockStage",
    )
    module.cfg = cfg
    return module
