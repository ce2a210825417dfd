"""Apply parallelism to the policy, reference, value and reward models — from outside the models.

Order (as torchtitan's ``parallelize_llama``): float8 linears (``parallel.fp8``, :mod:`.fp8`) →
tensor parallel plan → activation checkpointing → FSDP2 ``fully_shard`` (each decoder layer, then
the root) with a MixedPrecisionPolicy. In a single process only the float8 conversion applies. Models are
built on the meta device and materialised already sharded; the full weights come from rank 0
(``build_sharded``), so no rank but 0 ever holds a full copy.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import parallelize_module

from . import dist as pdist
from .fp8 import apply_fp8
from .mesh import tp_size
from .plans import check_tp_divisible, decoder_layer_plan, embedding_plan, lm_head_plan
from .vocab_parallel import install_logprob_head


def _mp_policy(pc) -> MixedPrecisionPolicy:
    if pc.mixed_precision == "bf16":
        # bf16 compute and all-gathers, fp32 gradient reduce-scatter (the fp32 master weights stay
        # in the sharded parameters, which keep their stored dtype).
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _tp_backbone(backbone, mesh) -> None:
    tp_mesh = mesh["tp"]
    check_tp_divisible(backbone.config, tp_mesh.size())
    parallelize_module(backbone, tp_mesh, embedding_plan())
    for layer in backbone.layers:
        parallelize_module(layer, tp_mesh, decoder_layer_plan(layer))


def _fsdp(root, layers, mesh, pc) -> None:
    if mesh["dp"].size() == 1:
        return
    kw = dict(mesh=mesh["dp"], reshard_after_forward=pc.reshard_after_forward, mp_policy=_mp_policy(pc))
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(root, **kw)


def _checkpointing(backbone, pc, train: bool) -> None:
    if train and pc.activation_checkpointing:
        # HF's own per-layer checkpointing keeps parameter names (and so checkpoints) unchanged.
        if hasattr(backbone, "activation_checkpointing_enable"):  # transformers ≥ 5.2x
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _fp8(model, mesh, pc, train: bool) -> None:
    # Only trained models: a frozen model (the reference) keeps exact forwards; the heads are never
    # converted (see fp8.py). FSDP all-gathers float8 weights only when it really shards (dp > 1).
    if train:
        apply_fp8(model, pc, fsdp=mesh is not None and mesh["dp"].size() > 1)


def parallelize_policy(model, mesh, pc, train: bool = True):
    """A HF causal LM (policy; ``train=False`` for the frozen reference)."""
    _fp8(model, mesh, pc, train)
    if mesh is None:
        return model
    base = getattr(model, model.base_model_prefix)
    # The LM head computes token log-probs with the fused kernel inside the model's forward (issue 7).
    install_logprob_head(model)
    if tp_size(mesh) > 1:
        _tp_backbone(base, mesh)
        parallelize_module(model, mesh["tp"], lm_head_plan())
    _checkpointing(model, pc, train)
    _fsdp(model, base.layers, mesh, pc)
    return model


def parallelize_reference(model, mesh, pc):
    return parallelize_policy(model, mesh, pc, train=False)


def parallelize_backbone_model(model, mesh, pc, train: bool = True):
    """A backbone + small head model (the multi-head RM or the PPO critic): the heads stay
    replicated over tp (they read the replicated pooled/last hidden state) and FSDP shards them."""
    _fp8(model, mesh, pc, train)
    if mesh is None:
        return model
    if tp_size(mesh) > 1:
        _tp_backbone(model.backbone, mesh)
    _checkpointing(model.backbone, pc, train)
    _fsdp(model, model.backbone.layers, mesh, pc)
    return model


parallelize_rm = parallelize_backbone_model
parallelize_value = parallelize_backbone_model


def build_sharded(build_full: Callable, build_skeleton: Callable, apply: Callable, mesh, pc):
    """Build a parallelised model without a full copy on ranks ≠ 0.

    ``build_full()`` (rank 0 only) makes the real model (random init or a checkpoint);
    ``build_skeleton(config)`` makes the same architecture from its HF config (run on the meta
    device on every rank); ``apply(model, mesh, pc)`` parallelises the skeleton, which is then
    materialised and filled from rank 0's weights by broadcast.
    """
    if mesh is None:
        model = build_full()
        apply(model, None, pc)  # single process: only the float8 conversion (parallel.fp8) applies
        return model
    full = build_full() if pdist.rank() == 0 else None
    config, dtype = pdist.broadcast_object(
        (_backbone_config(full), next(full.parameters()).dtype) if full is not None else None
    )
    with torch.device("meta"):
        model = build_skeleton(config).to(dtype)
    apply(model, mesh, pc)
    device = torch.device(pdist.device_type(), torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model.to_empty(device=device)
    set_model_state_dict(
        model, full.state_dict() if full is not None else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    # Non-persistent buffers (rotary inv_freq) are not in the state dict: copy them from rank 0.
    buffers = pdist.broadcast_object({n: b.cpu() for n, b in full.named_buffers()} if full is not None else None)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name].to(buf.device))
    if full is not None:
        model.train(full.training)
    del full
    return model


def _backbone_config(model):
    return model.config if hasattr(model, "config") else model.backbone.config
