"""``moslim plan``: per-rank memory of a stage for a model and a (nodes, GPUs, dp, tp) layout.

The real model is built on the meta device (no memory, no download) and the real parallel plan
(``parallelize_policy`` / ``parallelize_rm``: TP plan, activation checkpointing, FSDP2) is applied
under a *fake* process group of the full world size, so the per-rank parameter counts are the ones
a run would have — uneven shards, TP-replicated norms and (for Qwen2-MoE) TP-replicated experts
included. Rank 0 holds the largest shard, so it is the rank reported.

Memory model (bytes per rank; b micro-batch, s sequence length, H hidden, V vocabulary, L layers):
  trained model: fp32 master weights 4, fp32 gradients 4, Adam m and v 8 — per local parameter;
                 plus FSDP's bf16 all-gather working set (two decoder layers: current + prefetched,
                 and the root unit: embeddings / LM head), over tp;
  frozen model (reference, RM during PPO): bf16 weights 2 per local parameter + the same working set;
  activations, activation checkpointing on: one bf16 layer input per layer (2·b·s·H·L) + one layer
                 recomputed in backward, b·s·H·(10 + 24/tp) (Korthikanti et al. 2022, Table 2,
                 without the attention-score term: SDPA / flash attention never stores it) + fp32
                 logits and their gradient over this rank's vocabulary slice, 8·b·s·V/tp (LM only);
  rollout (PPO): a colocated engine's bf16 weights (2 / tp per policy parameter) and a KV cache of
                 ``rollout_seqs`` sequences of length s, 2·L·kv_heads·head_dim·2 bytes per token / tp;
                 the KV cache is freed while training (hybrid engine), so it competes with the
                 training activations, not with them added.
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
    parts: list
    rollout_weights: float
    kv_cache: float
    peak: float
    capacity: float
    fits: bool

    def to_dict(self) -> dict:
        return asdict(self)


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


def _activations(cfg, seq: int, micro_batch: int, tp: int, with_logits: bool) -> float:
    b, s, h, L = micro_batch, seq, cfg.hidden_size, cfg.num_hidden_layers
    act = 2 * b * s * h * L + b * s * h * (10 + 24 / tp)
    if with_logits:
        act += 8 * b * s * cfg.vocab_size / tp
    return act / GIB


def _part(name, counts, cfg, seq, micro_batch, tp, trained: bool, logits: bool) -> ModelMemory:
    total, local, gathered = counts
    if trained:
        return ModelMemory(name, total, local, True, 4 * local / GIB, 4 * local / GIB, 8 * local / GIB,
                           2 * gathered / GIB, _activations(cfg, seq, micro_batch, tp, logits))
    return ModelMemory(name, total, local, False, 2 * local / GIB, 0.0, 0.0, 2 * gathered / GIB, 0.0)


def plan(model: str, nodes: int, gpus_per_node: int, tp: int, dp: int, stage: str = "rm", seq: int = 2048,
         micro_batch: int = 1, rollout_seqs: int = 32, gpu_gb: float = 80.0) -> Plan:
    """Build, parallelise and measure; see the module docstring for the memory model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AutoModel, AutoModelForCausalLM

    from ..models.value import ValueModel
    from ..reward.model import MultiHeadRewardModel
    from .parallelize import parallelize_backbone_model, parallelize_policy

    if stage not in ("rm", "ppo"):
        raise ConfigError(f"--stage {stage!r}: one of rm, ppo")
    world = nodes * gpus_per_node
    if dp * tp != world:
        raise ConfigError(f"--dp {dp} × --tp {tp} = {dp * tp} ≠ nodes × gpus-per-node = {world}")
    cfg = load_shape(model)
    pc = ParallelConfig(dp=dp, tp=tp, activation_checkpointing=True, mixed_precision="bf16")
    if dist.is_initialized():
        raise RuntimeError("moslim plan needs a process without a process group (it makes a fake one)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        args = (cfg, seq, micro_batch, tp)

        def lm():
            return AutoModelForCausalLM.from_config(cfg)

        def rm():
            return MultiHeadRewardModel(AutoModel.from_config(cfg), (5, 5, 2))

        parts = []
        if stage == "rm":
            parts.append(_part("rm", _measure(rm, parallelize_backbone_model, mesh, pc, True), *args, True, False))
        else:
            lm_counts = _measure(lm, parallelize_policy, mesh, pc, True)
            parts.append(_part("policy", lm_counts, *args, True, True))
            parts.append(_part("value", _measure(lambda: ValueModel(AutoModel.from_config(cfg)),
                                                 parallelize_backbone_model, mesh, pc, True), *args, True, False))
            parts.append(_part("reference", lm_counts, *args, False, False))
            parts.append(_part("rm", _measure(rm, parallelize_backbone_model, mesh, pc, False), *args, False, False))
    finally:
        dist.destroy_process_group()
    rollout_w = kv = 0.0
    if stage == "ppo":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rollout_w = 2 * parts[0].total_params / tp / GIB
        kv = rollout_seqs * seq * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 / tp / GIB
    static = sum(p.weights + p.grads + p.optimizer for p in parts) + rollout_w
    transient = max([p.working + p.activations for p in parts] + [kv])
    peak = static + transient
    capacity = gpu_gb * 1e9 / GIB
    return Plan(model, stage, nodes, gpus_per_node, dp, tp, seq, micro_batch, [asdict(p) for p in parts], rollout_w,
                kv, peak, capacity, peak <= 0.9 * capacity)


def format_plan(p: Plan) -> str:
    lines = [f"{p.model} stage={p.stage} {p.nodes}×{p.gpus_per_node} GPUs, dp={p.dp} tp={p.tp}, "
             f"seq {p.seq}, micro-batch {p.micro_batch}, bf16 + fp32 master/Adam, activation checkpointing",
             f"{'model':10s} {'params':>9s} {'local':>9s} {'weights':>8s} {'grads':>8s} {'optim':>8s} "
             f"{'gather':>8s} {'activ':>8s}   (GiB per rank)"]
    for m in p.parts:
        lines.append(f"{m['name']:10s} {m['total_params'] / 1e9:8.2f}B {m['local_params'] / 1e9:8.3f}B "
                     f"{m['weights']:8.2f} {m['grads']:8.2f} {m['optimizer']:8.2f} {m['working']:8.2f} {m['activations']:8.2f}")
    if p.stage == "ppo":
        lines.append(f"rollout engine: bf16 weights {p.rollout_weights:.2f} GiB, KV cache {p.kv_cache:.2f} GiB")
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
    rows = ["| model | stage | nodes × GPUs | dp × tp | params / rank | weights+grads+Adam | activations (AC) | "
            "peak / rank | fits 80 GB |", "|---|---|---|---|---|---|---|---|---|"]
    for model, stage, nodes, gpus, tp, dp in PAPER_LAYOUTS:
        p = plan(model, nodes, gpus, tp, dp, stage, seq)
        local = sum(m["local_params"] for m in p.parts)
        states = sum(m["weights"] + m["grads"] + m["optimizer"] for m in p.parts)
        act = max(m["activations"] for m in p.parts)
        rows.append(f"| {model} | {stage} | {nodes} × {gpus} | {dp} × {tp} | {local / 1e9:.2f} B | {states:.1f} GiB | "
                    f"{act:.1f} GiB | {p.peak:.1f} GiB | {'yes' if p.fits else 'no'} |")
    return "\n".join(rows) + "\n"


def plan_json(p: Plan) -> str:
    return json.dumps(p.to_dict(), indent=2)
