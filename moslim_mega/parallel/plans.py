"""Tensor-parallel plans for HF Llama / Qwen2 / Qwen2-MoE modules (beside the models, never in them).

Megatron-style: q/k/v and gate/up are column parallel (each tp rank owns whole attention heads and
a slice of the MLP width), o/down are row parallel (partial sums all-reduced once per block), so a
decoder layer costs two all-reduces forward and two backward. The embedding is vocab parallel
(row-wise over the vocabulary, partial rows all-reduced) and the LM head's weight rows are sharded
over the vocabulary ("loss parallel"): the log-prob of a token is computed from each rank's rows by
the fused vocab-parallel kernel (:mod:`.vocab_parallel`) without ever forming, let alone gathering,
the full logits.

Qwen2-MoE: attention and the shared expert follow the dense plan; the routed experts (fused 3-D
parameters) stay replicated over tp — they are sharded by FSDP2 over dp instead.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from ..config import ConfigError


def check_tp_divisible(config, tp: int) -> None:
    """Each tp rank must own whole attention heads and equal MLP slices; else a clear error."""
    checks = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
    }
    for name, value in checks.items():
        if value % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide the model's {name}={value}")
    if tp > 1 and getattr(config, "tie_word_embeddings", False):
        raise ConfigError(
            f"parallel.tp={tp}: the model ties its input and output embeddings; the vocab-parallel plan "
            "shards them differently (use tp=1, FSDP shards tied weights fine)"
        )


def decoder_layer_plan(layer) -> dict:
    """TP plan of one decoder layer, keyed by sub-module name inside the layer."""
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
    }
    mlp = layer.mlp
    if hasattr(mlp, "gate_proj"):  # dense SwiGLU MLP (Llama, Qwen2)
        plan.update({"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()})
    elif hasattr(mlp, "shared_expert"):  # Qwen2-MoE: only the shared expert is tensor parallel
        plan.update({
            "mlp.shared_expert.gate_proj": ColwiseParallel(),
            "mlp.shared_expert.up_proj": ColwiseParallel(),
            "mlp.shared_expert.down_proj": RowwiseParallel(),
        })
    else:
        raise ConfigError(f"no tensor-parallel plan for MLP module {type(mlp).__name__}")
    return plan


def embedding_plan() -> dict:
    """Vocab-parallel input embedding of a backbone (``embed_tokens``)."""
    return {"embed_tokens": RowwiseParallel(input_layouts=Replicate())}


class VocabRowShard(ParallelStyle):
    """Shard a linear's weight rows (the vocabulary) over tp and leave its inputs and outputs alone:
    :class:`.vocab_parallel.LogprobLMHead` reads its local rows itself, for logits (this rank's slice)
    or for the fused vocab-parallel log-prob, and handles the input gradient's all-reduce."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        def partition(_name, mod, mesh):
            for pname, param in list(mod.named_parameters(recurse=False)):
                sharded = nn.Parameter(distribute_tensor(param, mesh, [Shard(0)]), requires_grad=param.requires_grad)
                mod.register_parameter(pname, sharded)

        return distribute_module(module, device_mesh, partition)


def lm_head_plan() -> dict:
    """Vocab-row-sharded LM head whose logits stay sharded over the vocabulary (never gathered)."""
    return {"lm_head": VocabRowShard()}
