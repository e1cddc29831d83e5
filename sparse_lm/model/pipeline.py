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
from sparse_lm.model.llama import Block, LinearFactory, Rotary, make_embedding, make_head
from sparse_lm.parallel.layers import vocab_cross_entropy


class EmbeddingStage(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens, _ = make_embedding(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)


class BlockStage(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, linear: LinearFactory):
        super().__init__()
        rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleDict({str(index): Block(cfg, index, linear, rotary)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (block,) = self.layers.values()
        return block(x)


class HeadStage(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm, self.lm_head = make_head(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


def build_pipeline(cfg: ModelConfig, linear: LinearFactory, pipeline: int, tensor: int) -> nn.Module:
    """This rank's stage of the pipeline: blocks split evenly over `pipeline` stages, the embedding
    on the first, the head on the last. Tied embeddings would span two stages and are refused by
    the config."""
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    import torch.distributed as dist

    from sparse_lm.parallel.layers import shard_spec

    data = dist.get_world_size() // (pipeline * tensor)
    spec = shard_spec("embed_tokens")
    layers = [LayerSpec(EmbeddingStage, cfg), *(LayerSpec(BlockStage, cfg, i, linear) for i in range(cfg.n_layers)),
              LayerSpec(HeadStage, cfg)]
    module = PipelineModule(
        layers, topology=PipeModelDataParallelTopology(num_pp=pipeline, num_mp=tensor, num_dp=data),
        loss_fn=lambda logits, labels: vocab_cross_entropy(logits, labels, spec), partition_method="type:BlockStage",
    )
    module.cfg = cfg
    return module
