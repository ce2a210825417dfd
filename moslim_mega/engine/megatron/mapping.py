"""HF ⇄ Megatron ``GPTModel`` tensor mapping, one tensor at a time, for any TP/PP/EP layout.

Legend: L layers, D hidden, V (padded) vocabulary, G query groups, Hg query heads per group,
hd head dim, F MLP width, E experts.

Three namings of the same weights:

* **HF**: the names in a ``save_pretrained`` safetensors file (``model.layers.3.self_attn.q_proj.weight``).
* **Megatron global** (the ``dist_checkpointing`` keys of megatron-core 0.16): one tensor per
  parameter kind with the layer (and expert) index as leading axes,
  ``decoder.layers.self_attention.linear_qkv.weight`` of shape ``[L, (Hg+2)·G·hd, D]``. A
  :class:`Rule` maps HF names to one such tensor per layer (per expert); its ``shape`` is that
  per-layer slice, independent of the layout.
* **Megatron rank-local**: a rank's ``GPTModel.state_dict()`` names (``decoder.layers.{local}.…``,
  ``…experts.local_experts.{local}.…``) holding its TP shard of its PP stage's layers and its EP
  share of the experts — :func:`rank_state_dict` builds it, :func:`merge_rank_state_dicts` undoes it.

The two rules that matter (checked against HF logits by hand, issue 17): q, k and v are
concatenated *per query group* into ``linear_qkv`` (``[q heads of group g; k_g; v_g]`` for each g,
so a TP shard is whole groups; biases likewise), and ``linear_fc1`` is ``[gate; up]`` where each
TP rank holds ``[gate shard; up shard]`` — sharded separately, then concatenated.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

from .dims import ConversionError, Layout, ModelDims, check_layout

# Rule kinds: how HF tensors become the Megatron tensor.
COPY, QKV, FC1, VOCAB = "copy", "qkv", "fc1", "vocab"
# Rule scopes: one tensor for the model, per layer, or per (layer, expert).
GLOBAL, LAYER, EXPERT = "global", "layer", "expert"
# Where a global tensor lives under pipeline parallelism.
FIRST, LAST, ALL = "first", "last", "all"


class MissingTensorError(ConversionError):
    """An HF or Megatron tensor that the mapping needs is not in the checkpoint."""


class ShapeMismatchError(ConversionError):
    """A tensor whose shape is not the one the config implies."""


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter kind and the HF tensors it is made of."""

    key: str
    """dist_checkpointing key, e.g. ``decoder.layers.mlp.linear_fc1.weight``."""
    module: str
    """Rank-local state-dict name with ``{layer}`` / ``{expert}`` placeholders (local indices)."""
    hf: tuple[str, ...]
    """HF names with ``{p}`` (prefix), ``{layer}``, ``{expert}`` placeholders; packed in this order."""
    shape: tuple[int, ...]
    """Shape of one layer's (one expert's) Megatron tensor, whole (before TP sharding)."""
    kind: str = COPY
    scope: str = LAYER
    tp_axis: int | None = None
    """Axis split under tensor parallelism; None = replicated."""
    stage: str = ALL
    """For GLOBAL rules: the pipeline stage that holds the tensor."""

    def hf_names(self, dims: ModelDims, layer: int | None = None, expert: int | None = None) -> list[str]:
        return [n.format(p=dims.hf_prefix, layer=layer, expert=expert) for n in self.hf]

    @property
    def extra_state(self) -> str | None:
        """The ``_extra_state`` object a megatron linear layer carries beside its weight (None data
        without Transformer Engine) — strict loads expect it, so it is written too."""
        linear = self.module.rsplit(".", 1)[0]
        if self.key.endswith(".weight") and linear.rsplit(".", 1)[-1].startswith("linear_"):
            return linear + "._extra_state"
        return None


def _layer_rules(dims: ModelDims) -> list[Rule]:
    D, hd, G, F = dims.hidden_size, dims.head_dim, dims.num_query_groups, dims.ffn_hidden_size
    qkv_rows = (dims.num_heads + 2 * G) * hd
    hf_attn = "{p}layers.{layer}.self_attn."
    rules = [
        # The local spec's norms are saved under TE's fused names (sharded_state_dict_keys_map), so
        # the checkpoint is the same whether the model uses the local or the TE layer spec.
        Rule("decoder.layers.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.{layer}.input_layernorm.weight",
             ("{p}layers.{layer}.input_layernorm.weight",), (D,)),
        Rule("decoder.layers.self_attention.linear_qkv.weight", "decoder.layers.{layer}.self_attention.linear_qkv.weight",
             tuple(hf_attn + f"{x}_proj.weight" for x in "qkv"), (qkv_rows, D), QKV, tp_axis=0),
    ]
    if dims.qkv_bias:
        rules.append(Rule("decoder.layers.self_attention.linear_qkv.bias", "decoder.layers.{layer}.self_attention.linear_qkv.bias",
                          tuple(hf_attn + f"{x}_proj.bias" for x in "qkv"), (qkv_rows,), QKV, tp_axis=0))
    rules += [
        Rule("decoder.layers.self_attention.linear_proj.weight", "decoder.layers.{layer}.self_attention.linear_proj.weight",
             (hf_attn + "o_proj.weight",), (D, dims.num_heads * hd), tp_axis=1),
        Rule("decoder.layers.mlp.linear_fc1.layer_norm_weight", "decoder.layers.{layer}.pre_mlp_layernorm.weight",
             ("{p}layers.{layer}.post_attention_layernorm.weight",), (D,)),
    ]
    mlp = "{p}layers.{layer}.mlp."
    if not dims.is_moe:
        return rules + [
            Rule("decoder.layers.mlp.linear_fc1.weight", "decoder.layers.{layer}.mlp.linear_fc1.weight",
                 (mlp + "gate_proj.weight", mlp + "up_proj.weight"), (2 * F, D), FC1, tp_axis=0),
            Rule("decoder.layers.mlp.linear_fc2.weight", "decoder.layers.{layer}.mlp.linear_fc2.weight",
                 (mlp + "down_proj.weight",), (D, F), tp_axis=1),
        ]
    Fe, Fs = dims.moe_ffn_hidden_size, dims.shared_expert_ffn_hidden_size
    expert = mlp + "experts.{expert}."
    local_expert = "decoder.layers.{layer}.mlp.experts.local_experts.{expert}."
    return rules + [
        Rule("decoder.layers.mlp.router.weight", "decoder.layers.{layer}.mlp.router.weight",
             (mlp + "gate.weight",), (dims.num_experts, D)),
        Rule("decoder.layers.mlp.experts.experts.linear_fc1.weight", local_expert + "linear_fc1.weight",
             (expert + "gate_proj.weight", expert + "up_proj.weight"), (2 * Fe, D), FC1, EXPERT, tp_axis=0),
        Rule("decoder.layers.mlp.experts.experts.linear_fc2.weight", local_expert + "linear_fc2.weight",
             (expert + "down_proj.weight",), (D, Fe), scope=EXPERT, tp_axis=1),
        Rule("decoder.layers.mlp.shared_experts.linear_fc1.weight", "decoder.layers.{layer}.mlp.shared_experts.linear_fc1.weight",
             (mlp + "shared_expert.gate_proj.weight", mlp + "shared_expert.up_proj.weight"), (2 * Fs, D), FC1, tp_axis=0),
        Rule("decoder.layers.mlp.shared_experts.linear_fc2.weight", "decoder.layers.{layer}.mlp.shared_experts.linear_fc2.weight",
             (mlp + "shared_expert.down_proj.weight",), (D, Fs), tp_axis=1),
        # Qwen2-MoE's sigmoid gate on the shared expert (megatron: moe_shared_expert_gate=True).
        Rule("decoder.layers.mlp.shared_experts.gate_weight", "decoder.layers.{layer}.mlp.shared_experts.gate_weight",
             (mlp + "shared_expert_gate.weight",), (1, D)),
    ]


def rules(dims: ModelDims, num_reward_classes: int = 0) -> list[Rule]:
    """Every Megatron parameter of the model, global ones first; ``num_reward_classes`` (C = ΣK_i)
    adds the multi-head RM's ``[C, D]`` head, which sits on the last stage in place of the output
    layer (replicated: it is tiny)."""
    D, V = dims.hidden_size, dims.padded_vocab_size
    out = [
        Rule("embedding.word_embeddings.weight", "embedding.word_embeddings.weight", ("{p}embed_tokens.weight",),
             (V, D), VOCAB, GLOBAL, tp_axis=0, stage=FIRST),
        Rule("decoder.final_layernorm.weight", "decoder.final_layernorm.weight", ("{p}norm.weight",), (D,),
             scope=GLOBAL, stage=LAST),
    ]
    if dims.has_lm_head and not dims.tie_embeddings:
        out.append(Rule("output_layer.weight", "output_layer.weight", ("lm_head.weight",), (V, D), VOCAB, GLOBAL,
                        tp_axis=0, stage=LAST))
    if num_reward_classes:
        out += [Rule("reward_heads.weight", "reward_heads.weight", ("heads.weight",), (num_reward_classes, D),
                     scope=GLOBAL, stage=LAST),
                Rule("reward_heads.bias", "reward_heads.bias", ("heads.bias",), (num_reward_classes,),
                     scope=GLOBAL, stage=LAST)]
    return out + _layer_rules(dims)


def instances(dims: ModelDims, rule: Rule) -> Iterator[tuple[int | None, int | None]]:
    """(layer, expert) indices of a rule's tensors, in checkpoint order."""
    if rule.scope == GLOBAL:
        yield None, None
    elif rule.scope == LAYER:
        yield from ((layer, None) for layer in range(dims.num_layers))
    else:
        yield from itertools.product(range(dims.num_layers), range(dims.num_experts))


# ---------------------------------------------------------------- HF ⇄ Megatron (whole tensors)

def _expect(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ShapeMismatchError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(shape)} from the config")


def hf_shapes(rule: Rule, dims: ModelDims) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors a rule packs (what the config implies)."""
    if rule.kind == QKV:
        hd, Hq, G = dims.head_dim, dims.num_heads, dims.num_query_groups
        tail = rule.shape[1:]
        return [(Hq * hd, *tail), (G * hd, *tail), (G * hd, *tail)]
    if rule.kind == FC1:
        return [(rule.shape[0] // 2, *rule.shape[1:])] * 2
    if rule.kind == VOCAB:
        return [(dims.vocab_size, *rule.shape[1:])]
    return [rule.shape]


def to_megatron(rule: Rule, dims: ModelDims, hf: list[torch.Tensor], names: list[str]) -> torch.Tensor:
    """Pack the HF tensors of one layer/expert into the rule's whole Megatron tensor."""
    for name, t, shape in zip(names, hf, hf_shapes(rule, dims)):
        _expect(name, t, shape)
    if rule.kind == QKV:
        G, hd = dims.num_query_groups, dims.head_dim
        q, k, v = (t.reshape(G, -1, hd, *t.shape[1:]) for t in hf)  # [G, heads in group, hd, (D)]
        return torch.cat([q, k, v], dim=1).reshape(rule.shape)
    if rule.kind == FC1:
        return torch.cat(hf, dim=0)
    if rule.kind == VOCAB:
        # Padding rows are zero; an engine masks their logits (as Megatron-LM does).
        pad = dims.padded_vocab_size - dims.vocab_size
        return torch.cat([hf[0], hf[0].new_zeros(pad, *hf[0].shape[1:])]) if pad else hf[0]
    return hf[0]


def to_hf(rule: Rule, dims: ModelDims, tensor: torch.Tensor, key: str) -> list[torch.Tensor]:
    """Unpack one whole Megatron tensor into the rule's HF tensors (inverse of :func:`to_megatron`)."""
    _expect(key, tensor, rule.shape)
    if rule.kind == QKV:
        G, hd, Hg = dims.num_query_groups, dims.head_dim, dims.num_heads // dims.num_query_groups
        grouped = tensor.reshape(G, Hg + 2, hd, *tensor.shape[1:])
        q, k, v = grouped.split([Hg, 1, 1], dim=1)
        return [x.reshape(-1, *tensor.shape[1:]).contiguous() for x in (q, k, v)]
    if rule.kind == FC1:
        return [x.contiguous() for x in tensor.chunk(2, dim=0)]
    if rule.kind == VOCAB:
        return [tensor[: dims.vocab_size].contiguous()]
    return [tensor]


# ---------------------------------------------------------------- whole ⇄ TP shards

def tp_shard(rule: Rule, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """A TP rank's shard of one whole Megatron tensor."""
    if rule.tp_axis is None or size == 1:
        return tensor
    if rule.kind == FC1:
        # [gate; up] → this rank's [gate_r; up_r]: each half is split on its own, then concatenated.
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]]).contiguous()
    return tensor.chunk(size, dim=rule.tp_axis)[rank].contiguous()


def tp_merge(rule: Rule, shards: list[torch.Tensor]) -> torch.Tensor:
    """The whole tensor from all TP ranks' shards, in rank order (inverse of :func:`tp_shard`)."""
    if rule.tp_axis is None or len(shards) == 1:
        return shards[0]
    if rule.kind == FC1:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards, dim=rule.tp_axis)


# ---------------------------------------------------------------- rank-local state dicts

@dataclass(frozen=True)
class RankCoords:
    """A model chunk's place in the layout: its rank's TP, PP, EP and expert-TP ranks, and which of
    the rank's virtual pipeline stages (model chunks) it is."""

    tp: int = 0
    pp: int = 0
    ep: int = 0
    etp: int = 0
    vp: int = 0


def all_coords(layout: Layout) -> list[RankCoords]:
    """One coordinate per distinct set of shards (data-parallel replicas left out)."""
    return [RankCoords(t, p, e, et, v) for v, p, t, e, et in itertools.product(
        range(layout.vpp), range(layout.pp), range(layout.tp), range(layout.ep), range(layout.expert_tp))]


def _is_first(layout: Layout, c: RankCoords) -> bool:
    return c.pp == 0 and c.vp == 0


def _is_last(layout: Layout, c: RankCoords) -> bool:
    return c.pp == layout.pp - 1 and c.vp == layout.vpp - 1


def _owner(dims: ModelDims, layout: Layout, rule: Rule, layer, expert, c: RankCoords):
    """(local layer, local expert, TP rank, TP size) if rank ``c`` holds this tensor, else None."""
    if rule.scope == GLOBAL:
        on_stage = rule.stage == ALL or (_is_first if rule.stage == FIRST else _is_last)(layout, c)
        return (None, None, c.tp, layout.tp) if on_stage else None
    # Layers are cut into pp × vpp chunks in order; chunk k runs on PP rank k % pp as its virtual
    # stage k // pp (megatron's interleaved assignment; vpp = 1 is the plain split).
    per_chunk = dims.num_layers // (layout.pp * layout.vpp)
    if layer // per_chunk != c.vp * layout.pp + c.pp:
        return None
    local_layer = layer % per_chunk
    if rule.scope == LAYER:
        return local_layer, None, c.tp, layout.tp
    per_ep = dims.num_experts // layout.ep
    if expert // per_ep != c.ep:
        return None
    return local_layer, expert - c.ep * per_ep, c.etp, layout.expert_tp


def rank_tensors(dims: ModelDims, layout: Layout, coords: RankCoords, rule_list: list[Rule]
                 ) -> Iterator[tuple[str, Rule, int | None, int | None, int, int]]:
    """(rank-local name, rule, layer, expert, TP rank, TP size) of every parameter model chunk
    ``coords`` holds, in state-dict order — what :func:`rank_state_dict` fills and
    :func:`rank_shapes` measures, so the two cannot disagree on what a rank owns."""
    check_layout(dims, layout)
    for rule in rule_list:
        for layer, expert in instances(dims, rule):
            owner = _owner(dims, layout, rule, layer, expert, coords)
            if owner is None:
                continue
            local_layer, local_expert, rank, size = owner
            yield rule.module.format(layer=local_layer, expert=local_expert), rule, layer, expert, rank, size
    if dims.tie_embeddings and dims.has_lm_head and layout.pp > 1 and _is_last(layout, coords):
        # Tied embeddings across stages: the last stage keeps its own copy of the embedding as the
        # output layer (megatron all-reduces their gradients); the checkpoint stores it once.
        emb = next(r for r in rule_list if r.key == "embedding.word_embeddings.weight")
        yield "output_layer.weight", emb, None, None, coords.tp, layout.tp


def rank_state_dict(dims: ModelDims, layout: Layout, coords: RankCoords, rule_list: list[Rule],
                    get_whole: Callable[[Rule, int | None, int | None], torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """What ``GPTModel.state_dict()`` holds for model chunk ``coords`` (strict-loadable,
    ``_extra_state`` entries included as None), built by asking ``get_whole(rule, layer, expert)`` for each whole
    tensor this rank needs — one at a time, so a caller can stream them from disk."""
    out: dict[str, torch.Tensor | None] = {}
    for name, rule, layer, expert, rank, size in rank_tensors(dims, layout, coords, rule_list):
        out[name] = tp_shard(rule, get_whole(rule, layer, expert), rank, size)
        if rule.extra_state:
            out[name.rsplit(".", 1)[0] + "._extra_state"] = None  # the linear's path, local indices filled in
    if dims.has_lm_head and _is_last(layout, coords):
        out["output_layer._extra_state"] = None  # the output layer is a linear too (tied or not)
    return out


def rank_shapes(dims: ModelDims, layout: Layout, coords: RankCoords, rule_list: list[Rule]
                ) -> dict[str, tuple[Rule, tuple[int, ...]]]:
    """Rank-local name → (rule, shape) of model chunk ``coords``'s parameters, without data: each
    whole tensor is a meta-device tensor cut by :func:`tp_shard` — the conversion's own sharding —
    so the shapes are the ones :func:`rank_state_dict` would fill, for any TP/PP/EP layout, with
    neither memory nor megatron-core (what ``moslim plan --backend megatron`` measures)."""
    return {name: (rule, tuple(tp_shard(rule, torch.empty(rule.shape, device="meta"), rank, size).shape))
            for name, rule, _, _, rank, size in rank_tensors(dims, layout, coords, rule_list)}


def merge_rank_state_dicts(dims: ModelDims, layout: Layout, rule_list: list[Rule],
                           shards: Mapping[RankCoords, Mapping[str, torch.Tensor]]
                           ) -> Iterator[tuple[Rule, int | None, int | None, torch.Tensor]]:
    """(rule, layer, expert, whole tensor) for every tensor, from the rank-local state dicts of
    every rank in :func:`all_coords` (inverse of :func:`rank_state_dict`), one tensor at a time."""
    check_layout(dims, layout)
    for rule in rule_list:
        for layer, expert in instances(dims, rule):
            size = layout.expert_tp if rule.scope == EXPERT else layout.tp
            pieces: dict[int, torch.Tensor] = {}
            for c, state in shards.items():
                owner = _owner(dims, layout, rule, layer, expert, c)
                if owner is None:
                    continue
                local_layer, local_expert, rank, _ = owner
                name = rule.module.format(layer=local_layer, expert=local_expert)
                if name not in state:
                    raise MissingTensorError(f"rank {c}: {name} is missing (layout {layout.to_dict()})")
                pieces.setdefault(rank, state[name])
            if sorted(pieces) != list(range(size)):
                raise MissingTensorError(f"{rule.key} layer={layer} expert={expert}: TP shards {sorted(pieces)} "
                                         f"of {size}; some ranks' state dicts are missing")
            yield rule, layer, expert, tp_merge(rule, [pieces[r] for r in range(size)])


def iter_hf_tensors(dims: ModelDims, layout: Layout, rule_list: list[Rule],
                    shards: Mapping[RankCoords, Mapping[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every HF tensor, from all ranks' local state dicts, one Megatron tensor
    at a time — what an engine's ``export_weights()`` streams to ``moslim export hf`` or a rollout
    engine."""
    for rule, layer, expert, whole in merge_rank_state_dicts(dims, layout, rule_list, shards):
        yield from zip(rule.hf_names(dims, layer, expert), to_hf(rule, dims, whole, rule.key))
