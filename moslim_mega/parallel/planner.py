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
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ConfigError, ParallelConfig

GIB = 2**30
STAGES = ("rm", "sft", "ppo")


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
                 flight: float = 1.0) -> float:
    """Checkpointed decoder activations (module docstring): ``layers`` on this rank (all without
    pp), their layer inputs kept for ``flight`` micro-batches."""
    n, h = micro_batch * seq, cfg.hidden_size
    L = cfg.num_hidden_layers if layers is None else layers
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
         pp: int = 1, pp_schedule: str = "1f1b", microbatches: int = 0, stages_per_rank: int = 1) -> Plan:
    """Build, parallelise and measure; see the module docstring for the memory model. ``pp`` > 1:
    pipeline stages (``microbatches`` per step, 0 = pp; ``stages_per_rank`` for interleaved_1f1b)."""
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
            return MultiHeadRewardModel(AutoModel.from_config(cfg), (5, 5, 2))

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


def format_plan(p: Plan) -> str:
    precision = "bf16 (FSDP2) + fp32 master/Adam" if p.dp > 1 else "fp32 (dp=1: no FSDP wrapping) + fp32 Adam"
    pipe = "" if p.pp == 1 else f"pp={p.pp} ({p.pp_schedule}, {p.microbatches} micro-batches) "
    lines = [f"{p.model} stage={p.stage} {p.nodes}×{p.gpus_per_node} GPUs, {pipe}dp={p.dp} tp={p.tp}, "
             f"seq {p.seq}, micro-batch {p.micro_batch}, {precision}, activation checkpointing, "
             f"log-prob chunk {p.logprob_chunk}",
             "MEASURED: params, local (parameter counts of the real model and parallel plan on the meta device)",
             "MODELLED: every GiB figure below (formulas over those counts; nothing allocated)",
             f"{'model':10s} {'params':>9s} {'local':>9s} {'weights':>8s} {'grads':>8s} {'optim':>8s} "
             f"{'gather':>8s} {'activ':>8s} {'logits':>8s} {'step':>8s}   (GiB per rank)"]
    for m in p.parts:
        lines.append(f"{m['name']:10s} {m['total_params'] / 1e9:8.2f}B {m['local_params'] / 1e9:8.3f}B "
                     f"{m['weights']:8.2f} {m['grads']:8.2f} {m['optimizer']:8.2f} {m['working']:8.2f} "
                     f"{m['activations']:8.2f} {m['logits']:8.2f} {m['step_temp']:8.2f}")
    if p.stage == "ppo":
        lines.append(f"rollout engine: bf16 weights {p.rollout_weights:.2f} GiB, KV cache {p.kv_cache:.2f} GiB")
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


def plan_json(p: Plan) -> str:
    return json.dumps(p.to_dict(), indent=2)
