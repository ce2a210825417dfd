"""``moslim plan``: per-rank memory of a stage for a model and a (nodes, GPUs, dp, tp) layout.

The real model is built on the meta device (no memory, no download) and the real parallel plan
(``parallelize_policy`` / ``parallelize_rm``: TP plan, activation checkpointing, FSDP2) is applied
under a *fake* process group of the full world size, so the per-rank parameter counts are the ones
a run would have — uneven shards, TP-replicated norms and (for Qwen2-MoE) TP-replicated experts
included. Rank 0 holds the largest shard, so it is the rank reported.

What is measured and what is modelled. MEASURED: the parameter counts — total, this rank's local
shard and the FSDP gather working set — read off the parallelised meta-device model. MODELLED:
every byte figure, a formula over those counts and the shapes below; nothing is allocated. A
``@pytest.mark.gpu`` test compares the peak with ``torch.cuda.max_memory_allocated`` for one
single-GPU training step of a 0.5 B Qwen2 (tests/parallel/test_planner.py).

Memory model (bytes per rank; b micro-batch, s sequence length, N = b·s tokens, H hidden, V
vocabulary, Vl = ceil(V/tp) this rank's vocabulary rows, C the fused log-prob's vocabulary chunk
``kernels.logprob_chunk``, L layers, a the activation dtype's bytes):
  compute dtype: with dp > 1 FSDP2's bf16 mixed precision (a = 2: bf16 all-gathers and compute,
                 fp32 master weights); with dp = 1 nothing is wrapped (``_fsdp`` returns), so the
                 model computes in its stored fp32 (a = 4) and there is no gather working set;
  trained model: fp32 weights 4, fp32 gradients 4, Adam m and v 8 — per local parameter; during
                 the optimizer step one more fp32 copy (4 per local parameter: foreach AdamW's
                 sqrt(v) temporary), at a time when activations are freed;
                 with dp > 1 plus FSDP's bf16 working set (two decoder layers: current + prefetched,
                 and the root unit: embeddings / LM head);
  frozen model (reference, RM during PPO): bf16 weights 2 per local parameter + the same working set;
  activations, activation checkpointing on: one layer input per layer (a·N·H·L) + one layer
                 recomputed in backward, N·H·(10 + 24/tp)·a/2 (Korthikanti et al. 2022, Table 2,
                 without the attention-score term: SDPA / flash attention never stores it);
  logits (LM only): what the fused linear → log-prob kernel keeps (kernels/linear_logprob.py):
                 the chunk's fp32 logits z_NC (4·N·min(C, Vl)), plus in backward its gradient dz_NC
                 in the matmul dtype when that is not fp32 (bf16: 2·N·min(C, Vl); fp32: in place);
                 the gathered hidden rows (a·N·H) and the fp32 input-gradient accumulator (4·N·H);
                 with dp > 1 the unsharded bf16 gradient of this rank's LM-head rows (2·Vl·H).
                 Never N×V: only one chunk of logits exists at a time;
  rollout (PPO): a colocated engine's bf16 weights (2 / tp per policy parameter) and a KV cache of
                 ``rollout_seqs`` sequences of length s, 2·L·kv_heads·head_dim·2 bytes per token / tp;
                 the KV cache is freed while training (hybrid engine), so it competes with the
                 training activations, not with them added.
  pipeline (``--pp``, parallel/pipeline.py): each pp rank holds its stages' layers; the rank
                 reported is the one with the most local parameters (the first stage holds the
                 embedding, the last the norm and head). Activations scale with the layers on that
                 rank and with the micro-batches in flight there: m for GPipe, min(pp, m) for 1F1B,
                 min(pp, m)·(1 + (pp − 1)/(pp·v)) for interleaved 1F1B with v stages per rank
                 (Narayanan et al. 2021, §2.2). The logits term (last stage only) is counted as if on
                 that rank: conservative. Pipeline bubble: the idle fraction of a step,
                 ((pp − 1)/v) / (m + (pp − 1)/v) — (pp − 1)/(m + pp − 1) for GPipe and 1F1B, the
                 warm-up/cool-down shrunk v-fold by interleaving;
peak = weights + grads + Adam (+ rollout weights) + the largest transient (one model's working
set + activations + logits, the KV cache, or one optimizer step's temporary).
A layout fits if the peak is at most 90% of the GPU (CUDA context, NCCL buffers, fragmentation).

``--backend megatron`` (stages rm and sft: one trained megatron-core ``GPTModel``, the engine of
engine/megatron/engine.py) plans a tp × pp × ep layout instead:
  MEASURED: each rank's parameter shapes, from the megatron conversion's own mapping
                 (``engine.megatron.mapping.rank_shapes``: the rules' whole tensors as meta tensors, cut
                 by ``tp_shard`` for that rank's TP/PP/EP coordinates) — no megatron-core needed, nothing
                 allocated. Every (pp rank, ep rank) is measured (a pp rank's virtual stages summed); tp and
                 expert-tp ranks hold equal shards (``check_layout`` refuses uneven ones), so tp rank 0
                 stands for them. The first stage holds the embedding, the last the final norm and the
                 output layer (sft) or the reward heads (rm: no output layer). The rank reported is the one
                 with the highest modelled peak.
  groups:        dp = world / (tp·pp); the expert-parallel group is carved out of a stage's tp·dp ranks, so
                 routed-expert parameters are data-parallel over edp = tp·dp / (etp·ep) ranks (megatron-core
                 parallel_state; etp, the expert tensor parallel size, defaults to tp).
  bytes per local parameter (Megatron's distributed optimizer, docs "Distributed Optimizer": 6 + 12/d
                 for bf16 params with fp32 grads): bf16 weights 2 (Float16Module), fp32 main gradients 4
                 (DDP's contiguous grad buffer, grad_reduce_in_fp32 as the engine sets it; not sharded),
                 fp32 master weights + Adam m and v 12 sharded over dp (non-expert parameters) or edp
                 (routed experts); the step's temporary 4 per optimizer-owned parameter. No gather
                 working set: megatron keeps the whole bf16 weights of its shard resident.
  activations:   the torch path's model (full recomputation, one layer input per layer, Korthikanti et al.
                 2022) in bf16; with tp > 1 sequence parallelism, which the engine needs for MoE under tp,
                 so the stored inputs and the recomputed layer are split tp ways (Table 2: 34/tp);
                 micro-batches in flight and the bubble as for ``--pp`` above (1F1B, interleaved with
                 ``--pp-stages-per-rank``; no GPipe in megatron). The MoE token-dispatch buffers are not
                 modelled (the recomputed layer's k routed experts of width moe_intermediate_size hold
                 about as much as a dense MLP).
  logits (sft, last stage only): the fused log-prob kernel as above (the engine feeds it the output
                 layer's weight), vocab-parallel over tp, plus the bf16 gradient of this rank's vocabulary
                 rows before it is added to the fp32 main gradient.
Assumptions the engine does not yet make for you: full recomputation (it builds the model without
``recompute_granularity``) and the distributed optimizer (it turns it on on CUDA only).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ConfigError, ParallelConfig

GIB = 2**30
STAGES = ("rm", "sft", "ppo")
BACKENDS = ("torch", "megatron")
REWARD_CLASSES = (5, 5, 2)  # the planned RM's heads (classes per dimension); tiny beside the backbone


@dataclass
class ModelMemory:
    """One model's share of a rank (GiB) and its parameter counts."""

    name: str
    total_params: int
    local_params: int
    trained: bool
    weights: float
    grads: float
    optimizer: float
    working: float
    activations: float
    logits: float
    step_temp: float


@dataclass
class Plan:
    model: str
    stage: str
    nodes: int
    gpus_per_node: int
    dp: int
    tp: int
    seq: int
    micro_batch: int
    logprob_chunk: int
    parts: list
    rollout_weights: float
    kv_cache: float
    peak: float
    capacity: float
    fits: bool
    provenance: dict
    pp: int = 1
    pp_schedule: str = "1f1b"
    microbatches: int = 1
    stages_per_rank: int = 1
    bubble: float = 0.0
    """Idle fraction of a pipelined step (0 without pipeline parallelism)."""
    backend: str = "torch"
    ep: int = 1
    etp: int = 1
    """Expert tensor parallel size (megatron; tp unless ``--etp``)."""
    expert_dp: int = 1
    """Data-parallel size of the routed experts' optimizer state: tp·dp / (etp·ep) (megatron)."""
    busiest: dict | None = None
    """Megatron: the reported rank's pp stage and ep rank, and how many (pp, ep) ranks were measured."""

    def to_dict(self) -> dict:
        return asdict(self)


# Which Plan / ModelMemory fields are read off the parallelised model and which are formulas.
PROVENANCE = {
    "measured": ["total_params", "local_params", "gathered params behind 'working'"],
    "modelled": ["weights", "grads", "optimizer", "working", "activations", "logits", "step_temp",
                 "rollout_weights", "kv_cache", "peak", "fits"],
    "how": "parameter counts: real model on the meta device under the real parallel plan (fake process group); "
           "bytes: formulas in moslim_mega/parallel/planner.py (dtype bytes per parameter, activation and "
           "fused log-prob kernel models); nothing is allocated",
}

MEGATRON_PROVENANCE = {
    "measured": ["total_params", "local_params (every pp × ep rank's GPTModel parameter shapes)"],
    "modelled": ["weights", "grads", "optimizer", "activations", "logits", "step_temp", "peak", "fits"],
    "how": "parameter counts: engine/megatron/mapping.rank_shapes — the conversion's rules and tp_shard on "
           "meta tensors, per rank of the tp/pp/ep layout; bytes: bf16 weights, fp32 main grads, distributed "
           "optimizer (moslim_mega/parallel/planner.py); nothing is allocated",
}


def load_shape(model: str):
    """A preset name or a local HF directory / config.json → a transformers config."""
    from .presets import PRESETS

    if model in PRESETS:
        return PRESETS[model]()
    path = Path(model)
    if not path.exists():
        raise ConfigError(f"--model {model!r}: neither a preset ({', '.join(PRESETS)}) nor a local path")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path.parent if path.is_file() else path)


def _local_numel(p) -> int:
    return (p.to_local() if hasattr(p, "to_local") else p).numel()


def _measure(build, apply, mesh, pc, train: bool):
    """(total params, rank-0 local params, gathered bf16 working-set params) of a parallelised model."""
    with torch.device("meta"):
        model = build()
    total = sum(p.numel() for p in model.parameters())
    apply(model, mesh, pc, train) if train is not None else apply(model, mesh, pc)
    local = sum(_local_numel(p) for p in model.parameters())
    dp = mesh["dp"].size()
    backbone = model.backbone if hasattr(model, "backbone") else getattr(model, model.base_model_prefix)
    layer_ids = {id(p) for p in backbone.layers.parameters()}
    layer0 = sum(_local_numel(p) for p in backbone.layers[0].parameters()) * dp
    root = sum(_local_numel(p) for p in model.parameters() if id(p) not in layer_ids) * dp
    return total, local, 2 * layer0 + root


def pipeline_bubble(pp: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Idle fraction of a pipelined step: ((pp − 1)/v) / (m + (pp − 1)/v); (pp − 1)/(m + pp − 1) for
    GPipe and 1F1B (v = 1), whose warm-up and cool-down interleaving shortens v-fold."""
    if pp < 1 or microbatches < 1 or stages_per_rank < 1:
        raise ConfigError(f"pipeline bubble of pp={pp}, micro-batches={microbatches}, stages per rank="
                          f"{stages_per_rank}: all must be >= 1")
    idle = (pp - 1) / stages_per_rank
    return idle / (microbatches + idle)


def in_flight(schedule: str, pp: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Micro-batches whose activations the busiest pp rank holds at once (module docstring)."""
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(microbatches)
    warm = float(min(pp, microbatches))
    return warm * (1 + (pp - 1) / (pp * stages_per_rank)) if schedule == "interleaved_1f1b" else warm


def _activations(cfg, seq: int, micro_batch: int, tp: int, act_bytes: int, layers: int | None = None,
                 flight: float = 1.0, sequence_parallel: bool = False) -> float:
    """Checkpointed decoder activations (module docstring): ``layers`` on this rank (all without
    pp), their layer inputs kept for ``flight`` micro-batches. ``sequence_parallel``: the inputs
    and the norms' activations are split along the sequence too, so everything divides by tp."""
    n, h = micro_batch * seq, cfg.hidden_size
    L = cfg.num_hidden_layers if layers is None else layers
    if sequence_parallel:
        return (act_bytes * n * h * L * flight + n * h * 34 * act_bytes / 2) / tp / GIB
    return (act_bytes * n * h * L * flight + n * h * (10 + 24 / tp) * act_bytes / 2) / GIB


def logits_bytes(tokens: int, hidden: int, vocab: int, tp: int, chunk: int, act_bytes: int, sharded: bool) -> int:
    """Bytes the fused linear → log-prob kernel holds at its backward peak on one rank: one fp32
    chunk of logits, its gradient in the matmul dtype unless that is fp32 (then in place), the
    gathered hidden rows, the fp32 input-gradient accumulator and, under FSDP, the unsharded bf16
    gradient of this rank's LM-head rows. Grows with tokens × chunk, never tokens × vocabulary."""
    vl = -(-vocab // tp)
    c = min(chunk, vl)
    chunk_bytes = tokens * c * (4 + (0 if act_bytes == 4 else act_bytes))
    rows = tokens * hidden * (act_bytes + 4)
    head_grad = 2 * vl * hidden if sharded else 0
    return chunk_bytes + rows + head_grad


def _measure_pipeline(build, mesh, pc, train: bool, pp: int, v: int):
    """As :func:`_measure` for pipeline stages: the counts of the pp rank with the most local
    parameters (every rank's stages are cut from a meta-device model and parallelised)."""
    from .pipeline import parallelize_stage, split_model, stage_ids

    with torch.device("meta"):
        whole = build()
    total = sum(p.numel() for p in whole.parameters())
    role = "value" if hasattr(whole, "value_head") else "reward" if hasattr(whole, "heads") else "causal_lm"
    best = None
    dp = mesh["dp"].size()
    for r in range(pp):
        with torch.device("meta"):
            stages = split_model(build(), role, stage_ids(r, pp, v), pp * v)
        for st in stages:
            parallelize_stage(st, mesh, pc, train)
        local = sum(_local_numel(p) for st in stages for p in st.parameters())
        layer_ids = {id(p) for st in stages for p in st.decoder.layers.parameters()}
        first = next(iter(stages[0].decoder.layers.values()))
        root = sum(_local_numel(p) for st in stages for p in st.parameters() if id(p) not in layer_ids) * dp
        counts = (total, local, 2 * sum(_local_numel(p) for p in first.parameters()) * dp + root)
        best = counts if best is None or local > best[1] else best
    return best


def _part(name, counts, cfg, seq, micro_batch, tp, trained: bool, logits: bool, chunk: int, sharded: bool,
          layers: int | None = None, flight: float = 1.0):
    total, local, gathered = counts
    act_bytes = 2 if sharded else 4
    working = 2 * gathered / GIB if sharded else 0.0
    if not trained:
        return ModelMemory(name, total, local, False, (2 if sharded else 4) * local / GIB, 0.0, 0.0, working,
                           0.0, 0.0, 0.0)
    lg = logits_bytes(micro_batch * seq, cfg.hidden_size, cfg.vocab_size, tp, chunk, act_bytes, sharded) / GIB
    return ModelMemory(name, total, local, True, 4 * local / GIB, 4 * local / GIB, 8 * local / GIB, working,
                       _activations(cfg, seq, micro_batch, tp, act_bytes, layers, flight), lg if logits else 0.0,
                       4 * local / GIB)


def plan(model: str, nodes: int, gpus_per_node: int, tp: int, dp: int, stage: str = "rm", seq: int = 2048,
         micro_batch: int = 1, rollout_seqs: int = 32, gpu_gb: float = 80.0, logprob_chunk: int | None = None,
         pp: int = 1, pp_schedule: str = "1f1b", microbatches: int = 0, stages_per_rank: int = 1,
         backend: str = "torch", ep: int = 1, etp: int | None = None) -> Plan:
    """Build, parallelise and measure; see the module docstring for the memory model. ``pp`` > 1:
    pipeline stages (``microbatches`` per step, 0 = pp; ``stages_per_rank`` for interleaved_1f1b).
    ``backend="megatron"``: the megatron-core layout with expert parallelism ``ep`` (and expert
    tensor parallelism ``etp``, default tp) — :func:`plan_megatron`."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r}: one of {', '.join(BACKENDS)}")
    if backend == "megatron":
        return plan_megatron(model, nodes, gpus_per_node, tp, dp, stage, seq, micro_batch, gpu_gb, logprob_chunk,
                             pp, pp_schedule, microbatches, stages_per_rank, ep, etp)
    if ep != 1 or etp is not None:
        flag = "--ep" if ep != 1 else "--etp"
        raise ConfigError(f"{flag}: expert parallelism is a --backend megatron layout; the torch backend "
                          "replicates the experts over tp and shards them over dp (FSDP)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AutoModel, AutoModelForCausalLM

    from ..models.value import ValueModel
    from ..reward.model import MultiHeadRewardModel
    from .parallelize import parallelize_backbone_model, parallelize_policy

    from ..config import KernelsConfig

    if stage not in STAGES:
        raise ConfigError(f"--stage {stage!r}: one of {', '.join(STAGES)}")
    chunk = KernelsConfig().logprob_chunk if logprob_chunk is None else int(logprob_chunk)
    if chunk < 1:
        raise ConfigError(f"--logprob-chunk {chunk}: must be >= 1 (kernels.logprob_chunk)")
    world = nodes * gpus_per_node
    if pp * dp * tp != world:
        what = f"--dp {dp} × --tp {tp}" if pp == 1 else f"--pp {pp} × --dp {dp} × --tp {tp}"
        raise ConfigError(f"{what} = {pp * dp * tp} ≠ nodes × gpus-per-node = {world}")
    cfg = load_shape(model)
    v = stages_per_rank if pp_schedule == "interleaved_1f1b" else 1
    m = microbatches or pp
    pc = ParallelConfig(dp=dp, tp=tp, pp=pp, pp_schedule=pp_schedule, pp_stages_per_rank=stages_per_rank,
                        activation_checkpointing=True, mixed_precision="bf16")
    if pp > 1:
        from .mesh import _check_pipeline

        _check_pipeline(pc)
    if dist.is_initialized():
        raise RuntimeError("moslim plan needs a process without a process group (it makes a fake one)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
        args = (cfg, seq, micro_batch, tp)
        extra = dict(chunk=chunk, sharded=dp > 1)
        measure = _measure
        if pp > 1:
            def measure(build, apply, mesh, pc, train):
                return _measure_pipeline(build, mesh, pc, train, pp, v)

            layers = -(-cfg.num_hidden_layers // (pp * v)) * v  # the busiest rank's layers
            extra.update(layers=layers, flight=in_flight(pp_schedule, pp, m, v))

        def lm():
            return AutoModelForCausalLM.from_config(cfg)

        def rm():
            return MultiHeadRewardModel(AutoModel.from_config(cfg), REWARD_CLASSES)

        parts = []
        if stage == "rm":
            parts.append(_part("rm", measure(rm, parallelize_backbone_model, mesh, pc, True), *args, True, False, **extra))
        elif stage == "sft":
            parts.append(_part("policy", measure(lm, parallelize_policy, mesh, pc, True), *args, True, True, **extra))
        else:
            lm_counts = measure(lm, parallelize_policy, mesh, pc, True)
            parts.append(_part("policy", lm_counts, *args, True, True, **extra))
            parts.append(_part("value", measure(lambda: ValueModel(AutoModel.from_config(cfg)),
                                                 parallelize_backbone_model, mesh, pc, True), *args, True, False, **extra))
            parts.append(_part("reference", lm_counts, *args, False, False, **extra))
            parts.append(_part("rm", measure(rm, parallelize_backbone_model, mesh, pc, False), *args, False, False,
                               **extra))
    finally:
        dist.destroy_process_group()
    rollout_w = kv = 0.0
    if stage == "ppo":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rollout_w = 2 * parts[0].total_params / tp / GIB
        kv = rollout_seqs * seq * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 / tp / GIB
    static = sum(p.weights + p.grads + p.optimizer for p in parts) + rollout_w
    transient = max([p.working + p.activations + p.logits for p in parts] + [p.step_temp for p in parts] + [kv])
    peak = static + transient
    capacity = gpu_gb * 1e9 / GIB
    return Plan(model, stage, nodes, gpus_per_node, dp, tp, seq, micro_batch, chunk, [asdict(p) for p in parts],
                rollout_w, kv, peak, capacity, peak <= 0.9 * capacity, PROVENANCE, pp, pp_schedule, m, v,
                pipeline_bubble(pp, m, v))


@dataclass
class MegatronRank:
    """One (pp rank, ep rank)'s parameters under a megatron layout, read off the mapping's shapes."""

    pp: int
    ep: int
    params: int
    expert: int
    """Of ``params``, routed-expert parameters (their optimizer state is sharded over edp, not dp)."""
    replicated: int
    """Of ``params``, those no tp rank splits: norms, router, shared-expert gate, reward heads."""


def megatron_dims(cfg, stage: str, tp: int):
    """The megatron mapping's :class:`ModelDims` of a transformers config: an RM is a backbone (no
    output layer), SFT a causal LM. Raises naming ``--model`` when the mapping has no such model."""
    from ..engine.megatron.dims import ConversionError, model_dims

    try:
        return model_dims(cfg.to_dict(), tp=tp, backbone=stage == "rm")
    except ConversionError as e:
        raise ConfigError(f"--model: {e}") from e


def megatron_total(dims, num_classes: int = 0) -> int:
    """Parameters of the whole megatron model: every rule's tensor once per layer (per expert)."""
    from ..engine.megatron.mapping import instances, rules

    return sum(math.prod(r.shape) * sum(1 for _ in instances(dims, r)) for r in rules(dims, num_classes))


def megatron_ranks(dims, layout, num_classes: int = 0) -> list[MegatronRank]:
    """Every (pp, ep) rank's parameter counts from ``mapping.rank_shapes``, a pp rank's virtual
    stages summed. tp rank 0 and expert-tp rank 0 stand for their groups: ``check_layout`` refuses
    any size that would make shards uneven."""
    from ..engine.megatron.mapping import EXPERT, RankCoords, rank_shapes, rules

    rule_list = rules(dims, num_classes)
    out = []
    for stage in range(layout.pp):
        for ep_rank in range(layout.ep):
            params = expert = replicated = 0
            for vp in range(layout.vpp):
                coords = RankCoords(pp=stage, ep=ep_rank, vp=vp)
                for rule, shape in rank_shapes(dims, layout, coords, rule_list).values():
                    n = math.prod(shape)
                    params += n
                    expert += n if rule.scope == EXPERT else 0
                    replicated += n if rule.tp_axis is None else 0
            out.append(MegatronRank(stage, ep_rank, params, expert, replicated))
    return out


def _megatron_part(name: str, rank: MegatronRank, total: int, dp: int, edp: int, activations: float,
                   logits: float) -> ModelMemory:
    """A trained megatron model's share of one rank (module docstring): bf16 weights and fp32 main
    grads of every local parameter, fp32 master + Adam of its dp (edp for experts) shard."""
    owned = (rank.params - rank.expert) / dp + rank.expert / edp  # this rank's distributed-optimizer shard
    return ModelMemory(name, total, rank.params, True, 2 * rank.params / GIB, 4 * rank.params / GIB,
                       12 * owned / GIB, 0.0, activations, logits, 4 * owned / GIB)


def plan_megatron(model: str, nodes: int, gpus_per_node: int, tp: int, dp: int, stage: str = "rm",
                  seq: int = 2048, micro_batch: int = 1, gpu_gb: float = 80.0, logprob_chunk: int | None = None,
                  pp: int = 1, pp_schedule: str = "1f1b", microbatches: int = 0, stages_per_rank: int = 1,
                  ep: int = 1, etp: int | None = None) -> Plan:
    """The busiest rank of a megatron-core tp × pp × ep layout (module docstring, ``--backend
    megatron``): parameter shapes measured per rank from the conversion's mapping, bytes modelled.
    Needs no megatron-core."""
    from ..config import KernelsConfig
    from ..engine.megatron.dims import Layout, LayoutError, check_layout

    if stage not in ("rm", "sft"):
        raise ConfigError(f"--stage {stage!r}: --backend megatron plans one trained model, rm or sft (PPO's "
                          "four models and rollout engine are planned by the torch backend)")
    if pp_schedule not in ("1f1b", "interleaved_1f1b"):
        raise ConfigError(f"--pp-schedule {pp_schedule!r}: megatron's pipeline schedules are 1f1b and "
                          "interleaved_1f1b")
    chunk = KernelsConfig().logprob_chunk if logprob_chunk is None else int(logprob_chunk)
    if chunk < 1:
        raise ConfigError(f"--logprob-chunk {chunk}: must be >= 1 (kernels.logprob_chunk)")
    world = nodes * gpus_per_node
    if pp * dp * tp != world:
        raise ConfigError(f"--pp {pp} × --dp {dp} × --tp {tp} = {pp * dp * tp} ≠ nodes × gpus-per-node = {world}")
    v = stages_per_rank if pp_schedule == "interleaved_1f1b" else 1
    layout = Layout(tp=tp, pp=pp, ep=ep, etp=etp, vpp=v)
    cfg = load_shape(model)
    dims = megatron_dims(cfg, stage, tp)
    try:
        check_layout(dims, layout)
    except LayoutError as e:  # "ep=3 does not divide num_experts=64" → the flag to change
        raise ConfigError(f"--{e}") from e
    # megatron-core builds the expert groups from each stage's tp·dp ranks: ep·etp must divide them.
    if (tp * dp) % (layout.expert_tp * ep):
        raise ConfigError(f"--ep {ep} × expert tp {layout.expert_tp} = {layout.expert_tp * ep} does not divide a "
                          f"stage's tp × dp = {tp * dp} ranks (the expert-parallel groups are carved from them)")
    edp = tp * dp // (layout.expert_tp * ep)
    m = microbatches or pp
    num_classes = sum(REWARD_CLASSES) if stage == "rm" else 0
    total = megatron_total(dims, num_classes)
    flight = in_flight(pp_schedule, pp, m, v)
    activations = _activations(cfg, seq, micro_batch, tp, 2, dims.num_layers // pp, flight, sequence_parallel=tp > 1)
    lm = logits_bytes(micro_batch * seq, dims.hidden_size, dims.vocab_size, tp, chunk, 2, True) / GIB
    name = "rm" if stage == "rm" else "policy"
    ranks = megatron_ranks(dims, layout, num_classes)
    best = None
    for rank in ranks:
        part = _megatron_part(name, rank, total, dp, edp, activations,
                              lm if stage == "sft" and rank.pp == pp - 1 else 0.0)
        peak = part.weights + part.grads + part.optimizer + max(part.activations + part.logits, part.step_temp)
        if best is None or peak > best[0]:
            best = (peak, part, rank)
    peak, part, rank = best
    capacity = gpu_gb * 1e9 / GIB
    return Plan(model, stage, nodes, gpus_per_node, dp, tp, seq, micro_batch, chunk, [asdict(part)], 0.0, 0.0,
                peak, capacity, peak <= 0.9 * capacity, MEGATRON_PROVENANCE, pp, pp_schedule, m, v,
                pipeline_bubble(pp, m, v), "megatron", ep, layout.expert_tp, edp,
                {"pp": rank.pp, "ep": rank.ep, "ranks_measured": len(ranks)})


def format_plan(p: Plan) -> str:
    megatron = p.backend == "megatron"
    if megatron:
        precision = (f"bf16 weights + fp32 main grads, distributed optimizer (fp32 master + Adam over dp={p.dp}"
                     + (f", routed experts over expert-dp={p.expert_dp})" if p.ep > 1 or p.etp != p.tp else ")")
                     + (", sequence parallel" if p.tp > 1 else ""))
        measured = "MEASURED: params, local (every rank's GPTModel parameter shapes from engine/megatron/mapping.py)"
    else:
        precision = "bf16 (FSDP2) + fp32 master/Adam" if p.dp > 1 else "fp32 (dp=1: no FSDP wrapping) + fp32 Adam"
        measured = "MEASURED: params, local (parameter counts of the real model and parallel plan on the meta device)"
    pipe = "" if p.pp == 1 else f"pp={p.pp} ({p.pp_schedule}, {p.microbatches} micro-batches) "
    experts = f" ep={p.ep} etp={p.etp}" if megatron and (p.ep > 1 or p.etp != p.tp) else ""
    lines = [f"{p.model} stage={p.stage} backend={p.backend} {p.nodes}×{p.gpus_per_node} GPUs, {pipe}dp={p.dp} "
             f"tp={p.tp}{experts}, seq {p.seq}, micro-batch {p.micro_batch}, {precision}, activation "
             f"checkpointing, log-prob chunk {p.logprob_chunk}",
             measured,
             "MODELLED: every GiB figure below (formulas over those counts; nothing allocated)",
             f"{'model':10s} {'params':>9s} {'local':>9s} {'weights':>8s} {'grads':>8s} {'optim':>8s} "
             f"{'gather':>8s} {'activ':>8s} {'logits':>8s} {'step':>8s}   (GiB per rank)"]
    for m in p.parts:
        lines.append(f"{m['name']:10s} {m['total_params'] / 1e9:8.2f}B {m['local_params'] / 1e9:8.3f}B "
                     f"{m['weights']:8.2f} {m['grads']:8.2f} {m['optimizer']:8.2f} {m['working']:8.2f} "
                     f"{m['activations']:8.2f} {m['logits']:8.2f} {m['step_temp']:8.2f}")
    if p.stage == "ppo":
        lines.append(f"rollout engine: bf16 weights {p.rollout_weights:.2f} GiB, KV cache {p.kv_cache:.2f} GiB")
    if megatron:
        b = p.busiest
        lines.append(f"busiest rank: pp stage {b['pp']}, ep rank {b['ep']} (of {b['ranks_measured']} pp × ep ranks "
                     "measured)")
    if p.pp > 1:
        lines.append(f"pipeline bubble: {100 * p.bubble:.1f}% of each step idle (busiest rank shown)")
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"peak {p.peak:.1f} GiB of {p.capacity:.1f} GiB (90% usable): {verdict}")
    return "\n".join(lines)


# The README table: the paper's configurations (Table 8 scale) and the smallest layout that fits.
PAPER_LAYOUTS = [
    ("qwen2-7b", "ppo", 1, 8, 4, 2), ("qwen2-7b", "rm", 1, 8, 1, 8),
    ("qwen2-57b-a14b", "rm", 1, 8, 1, 8), ("qwen2-57b-a14b", "rm", 4, 8, 1, 32),
    ("qwen2-72b", "rm", 1, 8, 8, 1), ("qwen2-72b", "rm", 4, 8, 8, 4),
]


def paper_table(seq: int = 2048) -> str:
    """Markdown table of PAPER_LAYOUTS (model, stage, nodes, gpus, tp, dp)."""
    rows = ["| model | stage | nodes × GPUs | dp × tp | params / rank (measured) | weights+grads+Adam (modelled) | "
            "activations+logits, AC (modelled) | peak / rank (modelled) | fits 80 GB |", "|---|---|---|---|---|---|---|---|---|"]
    for model, stage, nodes, gpus, tp, dp in PAPER_LAYOUTS:
        p = plan(model, nodes, gpus, tp, dp, stage, seq)
        local = sum(m["local_params"] for m in p.parts)
        states = sum(m["weights"] + m["grads"] + m["optimizer"] for m in p.parts)
        act = max(m["activations"] + m["logits"] for m in p.parts)
        rows.append(f"| {model} | {stage} | {nodes} × {gpus} | {dp} × {tp} | {local / 1e9:.2f} B | {states:.1f} GiB | "
                    f"{act:.1f} GiB | {p.peak:.1f} GiB | {'yes' if p.fits else 'no'} |")
    return "\n".join(rows) + "\n"


# The README's "Megatron layouts for the paper's largest RMs": the RM stage of Qwen2-57B-A14B and
# Qwen2-72B, FSDP layouts beside megatron ones: (model, backend, nodes, gpus, tp, pp, ep, micro-batches).
MEGATRON_LAYOUTS = [
    ("qwen2-57b-a14b", "torch", 4, 8, 1, 1, 1, 0),
    ("qwen2-57b-a14b", "megatron", 2, 8, 2, 1, 8, 0),
    ("qwen2-57b-a14b", "megatron", 4, 8, 2, 1, 8, 0),
    ("qwen2-57b-a14b", "megatron", 4, 8, 4, 1, 8, 0),
    ("qwen2-72b", "torch", 4, 8, 8, 1, 1, 0),
    ("qwen2-72b", "megatron", 2, 8, 8, 2, 1, 8),
    ("qwen2-72b", "megatron", 4, 8, 8, 2, 1, 8),
    ("qwen2-72b", "megatron", 4, 8, 8, 4, 1, 16),
]


def megatron_table(seq: int = 2048) -> str:
    """Markdown table of MEGATRON_LAYOUTS (``moslim plan --paper-table --backend megatron``)."""
    rows = ["| model (RM) | backend | nodes × GPUs | layout | params / rank (measured) | weights+grads+optimizer "
            "(modelled) | activations, AC (modelled) | pipeline bubble | peak / rank (modelled) | fits 80 GB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for model, backend, nodes, gpus, tp, pp, ep, micro in MEGATRON_LAYOUTS:
        dp = nodes * gpus // (tp * pp)
        p = plan(model, nodes, gpus, tp, dp, "rm", seq, pp=pp, microbatches=micro, backend=backend, ep=ep)
        m = p.parts[0]
        if backend == "torch":
            layout = f"FSDP dp {dp} × tp {tp}"
        else:
            layout = " × ".join(f"{k} {v}" for k, v in (("pp", pp), ("tp", tp), ("ep", ep)) if v > 1)
            layout += f" (dp {dp}" + (f", expert-dp {p.expert_dp}" if ep > 1 else "")
            layout += f", {p.microbatches} micro-batches)" if pp > 1 else ")"
        states = m["weights"] + m["grads"] + m["optimizer"]
        rows.append(f"| {model} | {backend} | {nodes} × {gpus} | {layout} | {m['local_params'] / 1e9:.2f} B | "
                    f"{states:.1f} GiB | {m['activations']:.1f} GiB | {100 * p.bubble:.1f}% | {p.peak:.1f} GiB | "
                    f"{'yes' if p.fits else 'no'} |")
    return "\n".join(rows) + "\n"


def plan_json(p: Plan) -> str:
    return json.dumps(p.to_dict(), indent=2)
