"""``moslim plan``: the real Qwen2 shapes built on the meta device under a fake process group."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from moslim_mega.config import ConfigError
from moslim_mega.engine.megatron.dims import Layout
from moslim_mega.parallel.planner import (REWARD_CLASSES, GIB, format_plan, logits_bytes, megatron_dims, megatron_ranks,
                                          megatron_total, pipeline_bubble, plan)
from moslim_mega.parallel.presets import PRESETS

from .test_equivalence import REPO


def dense_params(V, H, I, L, heads, kv_heads):
    """Qwen2 by hand: untied embedding + LM head, q/k/v with bias, o without, SwiGLU MLP, 2 norms
    per layer and a final norm."""
    kv = kv_heads * (H // heads)
    layer = (H * H + H) + 2 * (H * kv + kv) + H * H + 3 * H * I + 2 * H
    return 2 * V * H + L * layer + H


def moe_params(V, H, L, heads, kv_heads, E, moe_I, shared_I):
    kv = kv_heads * (H // heads)
    attn = (H * H + H) + 2 * (H * kv + kv) + H * H
    moe = E * 3 * H * moe_I + E * H + 3 * H * shared_I + H  # experts, router, shared expert, its gate
    return 2 * V * H + L * (attn + moe + 2 * H) + H


@pytest.mark.parametrize("name,expected", [
    ("qwen2-7b", dense_params(152064, 3584, 18944, 28, 28, 4)),
    ("qwen2-72b", dense_params(152064, 8192, 29568, 80, 64, 8)),
    ("qwen2-57b-a14b", moe_params(151936, 3584, 28, 28, 4, 64, 2560, 20480)),
])
def test_preset_parameter_counts_are_exact(name, expected):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(PRESETS[name]())
    assert sum(p.numel() for p in model.parameters()) == expected
    # The published sizes: 7.62 B, 72.7 B, 57.4 B.
    assert round(expected / 1e9, 1) == {"qwen2-7b": 7.6, "qwen2-72b": 72.7, "qwen2-57b-a14b": 57.4}[name]


def test_per_rank_counts_follow_the_real_plan():
    p = plan("qwen2-7b", 1, 8, tp=4, dp=2, stage="ppo")
    policy = p.parts[0]
    norms = 28 * 2 * 3584 + 3584  # replicated over tp, sharded over dp
    assert policy["local_params"] == (policy["total_params"] - norms) // 8 + norms // 2
    assert policy["weights"] == pytest.approx(4 * policy["local_params"] / GIB)
    assert policy["optimizer"] == pytest.approx(2 * policy["weights"])
    assert [m["name"] for m in p.parts] == ["policy", "value", "reference", "rm"]
    assert policy["logits"] > 0 and p.parts[1]["logits"] == 0.0  # only the LM runs the log-prob kernel
    assert p.parts[2]["grads"] == 0.0 and p.parts[2]["weights"] == pytest.approx(policy["weights"] / 2)
    assert p.fits and p.peak < p.capacity


def test_more_data_parallel_ranks_need_less_memory():
    one, four = plan("qwen2-72b", 1, 8, tp=8, dp=1), plan("qwen2-72b", 4, 8, tp=8, dp=4)
    # 72 B parameters × 16 bytes / 8 tp ranks ≈ 133 GiB of states alone: cannot fit one node.
    assert not one.fits and one.peak > 16 * 71e9 / 8 / GIB
    assert four.fits and four.peak < one.peak / 3


def test_bad_layout_is_a_clear_error():
    with pytest.raises(ConfigError, match="--dp 3"):
        plan("qwen2-7b", 1, 8, tp=2, dp=3)
    with pytest.raises(ConfigError, match="parallel.tp=8 does not divide the model.s num_attention_heads=28"):
        plan("qwen2-7b", 1, 8, tp=8, dp=1)  # 28 heads cannot split 8 ways


def test_pipeline_bubble_is_the_idle_fraction():
    assert pipeline_bubble(1, 8) == 0.0
    assert pipeline_bubble(4, 8) == pytest.approx(3 / 11)  # (pp − 1) / (m + pp − 1), GPipe and 1F1B
    assert pipeline_bubble(4, 8, 2) == pytest.approx(1.5 / 9.5)  # interleaving shrinks the ramps v-fold
    assert pipeline_bubble(4, 64) < pipeline_bubble(4, 8)  # more micro-batches amortise the ramps


def test_pipeline_stages_split_the_parameters_and_report_the_bubble():
    one = plan("qwen2-7b", 1, 1, tp=1, dp=1, stage="sft")
    two = plan("qwen2-7b", 1, 2, tp=1, dp=1, stage="sft", pp=2, microbatches=6)
    m1, m2 = one.parts[0], two.parts[0]
    assert m2["total_params"] == m1["total_params"]
    # The busiest stage holds half the layers plus the embedding (the untied head is on the other).
    assert m1["local_params"] / 2 < m2["local_params"] < 0.75 * m1["local_params"]
    assert (two.pp, two.microbatches, two.bubble) == (2, 6, pytest.approx(1 / 7))
    gpipe = plan("qwen2-7b", 1, 2, tp=1, dp=1, stage="sft", pp=2, microbatches=6, pp_schedule="gpipe")
    assert gpipe.parts[0]["activations"] > m2["activations"]  # GPipe keeps all 6 micro-batches in flight
    assert "pipeline bubble: 14.3%" in format_plan(two)
    with pytest.raises(ConfigError, match="--pp 2 × --dp 3 × --tp 1 = 6"):
        plan("qwen2-0.5b", 1, 4, tp=1, dp=3, pp=2)
    with pytest.raises(ConfigError, match="ties its input embedding and LM head"):  # Qwen2-0.5B is tied
        plan("qwen2-0.5b", 1, 2, tp=1, dp=1, stage="sft", pp=2)


def test_plan_cli_json(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "moslim_mega.cli", "plan", "--model", "qwen2-7b", "--nodes", "1",
                          "--gpus-per-node", "8", "--dp", "8", "--json"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    assert (p["dp"], p["tp"], p["stage"]) == (8, 1, "rm") and p["fits"]
    out = subprocess.run([sys.executable, "-m", "moslim_mega.cli", "plan", "--model", "qwen2-7b", "--nodes", "1",
                          "--gpus-per-node", "8", "--pp", "2", "--microbatches", "8", "--json"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    assert (p["pp"], p["dp"], p["microbatches"]) == (2, 4, 8) and p["bubble"] == pytest.approx(1 / 9)


def test_logits_term_scales_with_the_chunk_not_the_vocabulary():
    # 4096 tokens, Qwen2-7B hidden size; bf16 compute under FSDP (a = 2).
    n, h = 4096, 3584
    small_v, big_v = logits_bytes(n, h, 152064, 1, 1024, 2, False), logits_bytes(n, h, 4 * 152064, 1, 1024, 2, False)
    assert small_v == big_v  # the vocabulary does not enter: only one chunk of logits ever exists
    one, two = logits_bytes(n, h, 152064, 1, 1024, 2, False), logits_bytes(n, h, 152064, 1, 2048, 2, False)
    assert two - one == n * 1024 * (4 + 2)  # fp32 logits + bf16 gradient per extra column
    # fp32 compute (dp = 1): the gradient overwrites the logits in place, 4 bytes per element.
    assert logits_bytes(n, h, 152064, 1, 2048, 4, False) - logits_bytes(n, h, 152064, 1, 1024, 4, False) == n * 1024 * 4
    # A chunk wider than this rank's vocabulary shard is capped at the shard.
    assert logits_bytes(n, h, 8000, 4, 8192, 2, False) == logits_bytes(n, h, 8000, 4, 2000, 2, False)
    # Far below the N x V fp32 logits and their gradient the old planner budgeted (8 bytes x N x V).
    assert logits_bytes(n, h, 152064, 1, 8192, 2, False) < 8 * n * 152064 / 10


def test_plan_takes_the_chunk_and_reports_provenance():
    a = plan("qwen2-7b", 1, 8, tp=4, dp=2, stage="sft", logprob_chunk=1024)
    b = plan("qwen2-7b", 1, 8, tp=4, dp=2, stage="sft", logprob_chunk=4096)
    assert a.logprob_chunk == 1024 and b.logprob_chunk == 4096
    grown = (b.parts[0]["logits"] - a.parts[0]["logits"]) * GIB
    assert grown == pytest.approx(2048 * 3072 * 6)  # tokens x extra columns x (fp32 + bf16)
    assert "total_params" in a.provenance["measured"] and "peak" in a.provenance["modelled"]
    assert "activations" in a.provenance["modelled"] and "logits" in a.provenance["modelled"]
    text = format_plan(a)
    assert "MEASURED: params, local" in text and "MODELLED: every GiB figure" in text


def test_single_gpu_plan_is_fp32_without_a_gather_working_set():
    p = plan("qwen2-0.5b", 1, 1, tp=1, dp=1, stage="sft", seq=1024, micro_batch=2)
    m = p.parts[0]
    assert m["working"] == 0.0  # dp = 1: parallelize does not wrap FSDP, weights stay resident fp32
    assert m["local_params"] == m["total_params"]
    static = m["weights"] + m["grads"] + m["optimizer"]
    assert static == pytest.approx(16 * m["total_params"] / GIB)
    assert p.peak == pytest.approx(static + max(m["activations"] + m["logits"], m["step_temp"]))



# ---------------------------------------------------------------- --backend megatron

C = sum(REWARD_CLASSES)
RM_72B = dense_params(152064, 8192, 29568, 80, 64, 8) - 152064 * 8192 + C * 8192 + C  # no LM head, reward heads
RM_57B = moe_params(151936, 3584, 28, 28, 4, 64, 2560, 20480) - 151936 * 3584 + C * 3584 + C


def reassembled(ranks, layout) -> int:
    """The model's parameters from its ranks' local counts: a stage's non-expert shard times tp
    (minus the copies of what tp replicates), its ep ranks' expert shards times expert tp."""
    total = 0
    for stage in range(layout.pp):
        here = [r for r in ranks if r.pp == stage]
        dense = {r.params - r.expert for r in here}
        assert len(dense) == 1, "ep ranks of a stage hold the same non-expert parameters"
        first = here[0]
        total += (first.params - first.expert - first.replicated) * layout.tp + first.replicated
        total += sum(r.expert for r in here) * layout.expert_tp
    return total


@pytest.mark.parametrize("model,stage,layout,expected", [
    ("qwen2-72b", "rm", Layout(tp=8, pp=4), RM_72B),
    ("qwen2-72b", "rm", Layout(tp=4, pp=4, vpp=2), RM_72B),
    ("qwen2-7b", "sft", Layout(tp=4, pp=2), dense_params(152064, 3584, 18944, 28, 28, 4)),
    ("qwen2-57b-a14b", "rm", Layout(tp=2, pp=2, ep=4), RM_57B),
    ("qwen2-57b-a14b", "rm", Layout(tp=4, ep=8, etp=1), RM_57B),
])
def test_megatron_rank_counts_sum_back_to_the_model(model, stage, layout, expected):
    dims = megatron_dims(PRESETS[model](), stage, layout.tp)
    classes = C if stage == "rm" else 0
    ranks = megatron_ranks(dims, layout, classes)
    assert len(ranks) == layout.pp * layout.ep
    assert megatron_total(dims, classes) == expected  # the mapping's model is the HF one (no vocab padding here)
    assert reassembled(ranks, layout) == expected
    # The first stage holds the embedding; the last the final norm (and output layer or reward heads).
    first, last = ranks[0].params - ranks[0].expert, ranks[-1].params - ranks[-1].expert
    vocab_rows = dims.padded_vocab_size * dims.hidden_size // layout.tp
    if layout.pp > 1 and stage == "rm":
        assert first - last == vocab_rows - dims.hidden_size - C * dims.hidden_size - C


def test_expert_parallelism_divides_the_expert_parameters():
    dims = megatron_dims(PRESETS["qwen2-57b-a14b"](), "rm", 2)
    one, eight = megatron_ranks(dims, Layout(tp=2), C), megatron_ranks(dims, Layout(tp=2, ep=8), C)
    experts = 28 * 64 * 3 * 3584 * 2560
    assert one[0].expert == experts // 2  # etp = tp = 2 splits each expert's fc1/fc2
    assert all(r.expert == experts // 16 for r in eight) and len(eight) == 8
    assert {r.params - r.expert for r in eight} == {one[0].params - one[0].expert}  # the rest is untouched
    p1 = plan("qwen2-57b-a14b", 4, 8, tp=2, dp=16, backend="megatron")
    p8 = plan("qwen2-57b-a14b", 4, 8, tp=2, dp=16, backend="megatron", ep=8)
    assert p8.parts[0]["local_params"] == eight[0].params < p1.parts[0]["local_params"]
    assert (p8.ep, p8.etp, p8.expert_dp, p1.expert_dp) == (8, 2, 2, 16)  # edp = tp·dp / (etp·ep)


def test_megatron_bytes_and_the_distributed_optimizer_shrinking_with_dp():
    # Qwen2-72B RM, tp 8 × pp 2: the same ranks on 2 nodes (dp 1) and 4 nodes (dp 2).
    one = plan("qwen2-72b", 2, 8, tp=8, dp=1, pp=2, backend="megatron")
    two = plan("qwen2-72b", 4, 8, tp=8, dp=2, pp=2, backend="megatron")
    a, b = one.parts[0], two.parts[0]
    assert a["local_params"] == b["local_params"] and a["total_params"] == RM_72B
    n = a["local_params"]
    assert a["weights"] == pytest.approx(2 * n / GIB) and a["grads"] == pytest.approx(4 * n / GIB)  # bf16, fp32 main grads
    assert a["optimizer"] == pytest.approx(12 * n / GIB) and b["optimizer"] == pytest.approx(a["optimizer"] / 2)
    assert b["weights"] == a["weights"] and b["grads"] == a["grads"]  # DDP: weights and grad buffer are not sharded
    assert a["working"] == 0.0 and a["logits"] == 0.0  # no FSDP gathers; the RM has no output layer
    assert one.busiest["pp"] == 0  # the embedding's stage; the last one holds only a norm and the heads
    assert two.peak < one.peak and not one.fits and two.fits
    assert one.bubble == pytest.approx(1 / 3) and "pipeline bubble: 33.3%" in format_plan(one)
    # MoE: non-expert state over dp, routed experts' over expert-dp = tp·dp / (etp·ep).
    moe = plan("qwen2-57b-a14b", 4, 8, tp=2, dp=16, backend="megatron", ep=8).parts[0]
    dense, expert = moe["local_params"] - 28 * 64 * 3 * 3584 * 2560 // 16, 28 * 64 * 3 * 3584 * 2560 // 16
    assert moe["optimizer"] == pytest.approx(12 * (dense / 16 + expert / 2) / GIB)
    # SFT: the output layer (and the fused log-prob kernel's logits) sit on the last stage.
    sft = plan("qwen2-7b", 1, 8, tp=4, dp=1, pp=2, stage="sft", backend="megatron")
    assert sft.parts[0]["total_params"] == dense_params(152064, 3584, 18944, 28, 28, 4)


def test_megatron_layout_errors_name_the_field():
    cases = [
        (dict(model="qwen2-57b-a14b", nodes=1, gpus_per_node=8, tp=1, dp=8, ep=3), "--ep=3 does not divide num_experts=64"),
        (dict(model="qwen2-72b", nodes=1, gpus_per_node=8, tp=8, dp=1, ep=2), "--ep=2: expert parallelism needs a MoE"),
        (dict(model="qwen2-57b-a14b", nodes=1, gpus_per_node=8, tp=8, dp=1), "--tp=8 does not divide num_attention_heads=28"),
        (dict(model="qwen2-57b-a14b", nodes=1, gpus_per_node=8, tp=4, dp=2, ep=8), "--ep 8 × expert tp 4 = 32 does not divide"),
        (dict(model="qwen2-72b", nodes=1, gpus_per_node=8, tp=8, dp=1, pp=3), "--pp 3 × --dp 1 × --tp 8 = 24"),
        (dict(model="qwen2-72b", nodes=1, gpus_per_node=8, tp=8, dp=1, stage="ppo"), "--stage 'ppo'"),
        (dict(model="qwen2-72b", nodes=2, gpus_per_node=8, tp=8, dp=1, pp=2, pp_schedule="gpipe"), "--pp-schedule 'gpipe'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            plan(backend="megatron", **kwargs)
    with pytest.raises(ConfigError, match="--ep: expert parallelism is a --backend megatron layout"):
        plan("qwen2-57b-a14b", 1, 8, tp=1, dp=8, ep=8)
    with pytest.raises(ConfigError, match="--backend 'jax'"):
        plan("qwen2-7b", 1, 8, tp=1, dp=8, backend="jax")


# Without megatron-core: the megatron plan needs only the mapping's shapes.
NO_MEGATRON_PLAN = """
import sys
sys.modules["megatron"] = None
from moslim_mega.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_megatron_plan_cli_prints_the_table_and_json_without_megatron_core():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = ["plan", "--model", "qwen2-57b-a14b", "--stage", "rm", "--backend", "megatron", "--nodes", "4",
            "--gpus-per-node", "8", "--tp", "2", "--ep", "8"]
    out = subprocess.run([sys.executable, "-c", NO_MEGATRON_PLAN, *argv], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "backend=megatron" in out.stdout and "dp=16 tp=2 ep=8 etp=2" in out.stdout
    assert "busiest rank: pp stage 0, ep rank 0 (of 8 pp × ep ranks measured)" in out.stdout
    assert "MEASURED: params, local" in out.stdout and "rm " in out.stdout
    out = subprocess.run([sys.executable, "-c", NO_MEGATRON_PLAN, *argv, "--json"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    assert (p["backend"], p["dp"], p["tp"], p["ep"], p["expert_dp"]) == ("megatron", 16, 2, 8, 2)
    assert p["parts"][0]["total_params"] == RM_57B and p["fits"]
    assert "rank_shapes" in p["provenance"]["how"]
    out = subprocess.run([sys.executable, "-c", NO_MEGATRON_PLAN, *argv[:-2], "--ep", "5"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "--ep=5 does not divide num_experts=64" in out.stderr

@pytest.mark.gpu
def test_planned_peak_matches_cuda_for_one_training_step():
    """One fp32 training step of a random-weight Qwen2-0.5B on one GPU (the dp = 1 layout the plan
    models: no FSDP, activation checkpointing, the fused log-prob kernel, AdamW) against the plan."""
    from transformers import AutoModelForCausalLM

    from moslim_mega.algos.logprob import sequence_logprobs
    from moslim_mega.config import KernelsConfig
    from moslim_mega.utils.optim import Updater

    seq, batch, chunk = 1024, 2, KernelsConfig().logprob_chunk
    p = plan("qwen2-0.5b", 1, 1, tp=1, dp=1, stage="sft", seq=seq, micro_batch=batch, logprob_chunk=chunk)
    torch.manual_seed(0)
    cfg = PRESETS["qwen2-0.5b"]()
    model = AutoModelForCausalLM.from_config(cfg).cuda().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = Updater(model.parameters(), lr=1e-5, weight_decay=0.0, warmup_steps=0, grad_clip=1.0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    mask = torch.ones_like(ids)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    logp, _ = sequence_logprobs(model, ids, mask, chunk_size=chunk, impl="triton")
    loss = -logp.sum() / mask[:, 1:].sum()
    loss.backward()
    opt.step()
    opt.zero_grad()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() / GIB
    print(f"planned peak {p.peak:.2f} GiB, measured {measured:.2f} GiB")
    assert abs(p.peak - measured) <= 0.15 * measured, (p.peak, measured, format_plan(p))
