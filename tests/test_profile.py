"""profile.json of every stage (SFT, RM, policy) on a tiny world, `moslim profile`'s report, the
FLOPs / MFU formula against a hand computation, aggregation over ranks and the torch trace window.
The torchrun (2-process) profile.json is checked in tests/parallel/test_torchrun_stages.py."""

import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moslim_mega.cli import main
from moslim_mega.config import ConfigError, ProfileConfig, load_config
from moslim_mega.data.template import render_prompt
from moslim_mega.models.build import build_tokenizer
from moslim_mega.policy.controller import load_policy_prompts, train_policy
from moslim_mega.prefs import PreferenceSpec, spec_from_config
from moslim_mega.profile import ModelFlops, Profiler, aggregate, flops_from_config, peak_tflops
from moslim_mega.reward.data import load_rm_examples
from moslim_mega.models.build import load_policy
from moslim_mega.sft import load_sft_examples

from tiny_stage import build_tiny_stage

TINY = ["hidden_size=32", "intermediate_size=64", "num_layers=1", "num_heads=2"]
OVERRIDES = [f"sft.model.{x}" for x in TINY] + [f"rm.model.{x}" for x in TINY] + [
    "run.tensorboard=false", "run.num_threads=1",
    "sft.epochs=2", "sft.batch_size=16", "sft.warmup_steps=1",
    "rm.epochs=2", "rm.batch_size=16", "rm.eval_every=3", "rm.warmup_steps=1",
    "policy.steps=3", "policy.prompts_per_step=4", "policy.samples_per_prompt=2", "policy.mini_batch_size=8",
    "policy.eval_every=0", "sampling.max_new_tokens=5",
    "profile.torch_trace_steps=1:3",
]
P, K, STEPS = 4, 2, 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("profiled")
    built = build_tiny_stage(root, OVERRIDES)  # SFT (8 steps) and RM (8 steps) into root/sft, root/rm
    cfg = load_config(None, built["overrides"])
    train_policy(cfg, root / "policy", built["sft_dir"], built["rm_dir"], built["paths"]["policy_train"],
                 show_progress=False)
    return {"root": root, "cfg": cfg, **built}


def _profile(d):
    return json.loads((d / "profile.json").read_text())


def _check_common(p, stage, phases, tokens):
    wall = p["wall_seconds"]
    assert p["stage"] == stage and wall > 0
    assert p["devices"] == {"kind": "cpu", "name": p["devices"]["name"], "count": 1} and p["devices"]["name"]
    spent = sum(p["phases"]["seconds"].values())
    assert set(phases) <= set(p["phases"]["seconds"]), p["phases"]["seconds"]
    assert all(p["phases"]["seconds"][k] > 0 for k in phases)
    # Phases never exceed the wall time and cover most of it (the rest: the start and end gaps).
    assert spent <= wall + 1e-9 and spent >= 0.9 * wall, (spent, wall)
    assert abs(p["phases"]["other_seconds"] - (wall - spent)) < 1e-9
    assert p["tokens"]["total"] == tokens
    assert p["tokens"]["per_second"] == pytest.approx(tokens / wall)
    assert p["tokens"]["per_second_per_device"] == pytest.approx(tokens / wall)
    assert p["device_hours"]["unit"] == "core-hours"
    assert p["device_hours"]["value"] == pytest.approx(wall * 1 / 3600)  # run.num_threads=1, one rank
    assert p["flops"]["total"] > 0 and p["flops"]["achieved_tflops_per_device"] > 0
    assert p["mfu"]["value"] is None and "CPU" in p["mfu"]["reason"]
    assert p["peak_memory"]["bytes"] > 50 * 2**20 and "RSS" in p["peak_memory"]["kind"]
    assert p["cpu_seconds"] > 0


def test_sft_profile_counts_every_attended_token(runs):
    cfg = runs["cfg"]
    tok = build_tokenizer(cfg.sft.model, spec_from_config(cfg.prefs).names)
    data = load_sft_examples(runs["paths"]["sft"], tok, cfg.sft.max_length)
    expected = 2 * sum(len(ids) for ids in data.input_ids)  # 2 epochs, every example once per epoch
    p = _profile(runs["root"] / "sft")
    _check_common(p, "sft", ["setup", "data", "forward_backward_step", "checkpoint"], expected)
    assert set(p["flops"]["per_token"]) == {"train"}


def test_rm_profile_counts_every_attended_token(runs):
    cfg = runs["cfg"]
    spec = spec_from_config(cfg.prefs)
    tok = build_tokenizer(cfg.rm.model, spec.names)
    data = load_rm_examples(runs["root"] / "world" / "rm_train.jsonl", spec, tok, cfg.rm.max_length)
    expected = 2 * sum(len(ids) for ids in data.input_ids)
    p = _profile(runs["rm_dir"])
    _check_common(p, "rm", ["setup", "data", "forward_backward_step", "eval", "checkpoint"], expected)


def test_policy_profile_counts_prompt_and_response_tokens(runs):
    cfg, out = runs["cfg"], runs["root"] / "policy"
    _, tok = load_policy(runs["sft_dir"])
    prompts = load_policy_prompts(runs["paths"]["policy_train"], PreferenceSpec.datatype(4))
    rng = random.Random(cfg.run.seed)  # the controller's prompt draw, replayed
    prompt_tokens = sum(K * len(tok(render_prompt(tok, rng.choice(prompts)), add_special_tokens=False)["input_ids"])
                        for _ in range(STEPS) for _ in range(P))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    generated = sum(r["response_length"] * P * K for r in rows if r["tag"] == "train")
    p = _profile(out)
    _check_common(p, "policy", ["setup", "generation", "reward", "ref_old_logprobs", "advantages", "actor_update",
                                "weight_sync", "metrics", "checkpoint"], prompt_tokens + round(generated))
    assert p["tokens"]["counters"]["generated_tokens"] == round(generated)
    assert set(p["flops"]["per_token"]) == {"generation", "reward", "ref_old_logprobs", "actor_update"}


def test_torch_trace_window_writes_a_chrome_trace(runs):
    for d in (runs["root"] / "sft", runs["rm_dir"], runs["root"] / "policy"):
        trace = d / "torch_trace" / "rank0.json"
        assert _profile(d)["torch_trace"] == str(trace.parent)
        events = json.loads(trace.read_text())["traceEvents"]
        assert any("aten::" in e.get("name", "") for e in events)


@pytest.mark.parametrize("text", ["3:1", "2:2", "a:b", "5", "-1:2"])
def test_bad_trace_window_is_a_config_error_naming_the_field(text):
    with pytest.raises(ConfigError, match="profile.torch_trace_steps"):
        Profiler(ProfileConfig(torch_trace_steps=text), "sft")


def test_disabled_profiler_writes_nothing(tmp_path):
    prof = Profiler(ProfileConfig(enabled=False), "sft")
    prof.mark("data")
    prof.add_tokens(5)
    assert prof.write(tmp_path / "profile.json") is None and not (tmp_path / "profile.json").exists()


def test_profile_cli_renders_markdown_and_png(runs, tmp_path, capsys):
    assert main(["profile", str(runs["root"]), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "profile_report.md").read_text()
    assert md == capsys.readouterr().out.split("\nreport: ")[0]
    for part in ("sft", "rm", "policy"):
        p = _profile(runs["root"] / part)
        assert f"| {runs['root'].name} | {part} |" in md
        assert f"| {p['tokens']['total']} | {p['tokens']['per_second']:.0f} |" in md
    assert "Table 8 analogue" in md and "| generation |" in md and "core-hours" in md
    png = (tmp_path / "profile_report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_profile_cli_without_profiles_is_a_clear_error(tmp_path, capsys):
    assert main(["profile", str(tmp_path)]) == 2
    assert "no profile.json" in capsys.readouterr().err


# ---- the formulas ------------------------------------------------------------------------------
def test_flops_per_token_and_mfu_match_a_hand_computation():
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    f = flops_from_config(cfg, cfg.vocab_size)
    # Per layer: q, o 64·64 each; k, v 64·32 each (2 kv heads of 16); MLP 3·64·128. LM head 64·100.
    n = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 64 * 100
    assert f == ModelFlops(params=n, layers=2, attn_width=64)
    # N equals the weights of every nn.Linear of the real model (embedding excluded, LM head included).
    model = LlamaForCausalLM(cfg)
    assert n == sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert f.per_token(10, train=True) == 6 * n + 12 * 2 * 64 * 10
    assert f.per_token(10, train=False) == 2 * n + 4 * 2 * 64 * 10
    # MFU = FLOPs / (wall × devices × peak): 1e12 FLOPs in 4 s on one device of 0.5 TFLOP/s → 50 %.
    rank = {"wall": 4.0, "phases": {"data": 1.0}, "counters": {"tokens": 100}, "flops": 1e12, "flops_known": True,
            "peak_memory": 1, "cpu_seconds": 1.0, "threads": 2, "tp_rank": 0}
    rec = aggregate([rank], "sft", ProfileConfig(peak_tflops=0.5), torch.device("cpu"), {}, None)
    assert rec["mfu"]["value"] == pytest.approx(0.5) and rec["mfu"]["peak_source"] == "config profile.peak_tflops"
    assert rec["flops"]["achieved_tflops_per_device"] == pytest.approx(0.25)
    assert rec["device_hours"]["value"] == pytest.approx(4 * 2 / 3600)


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                       ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                       ("NVIDIA GeForce RTX 4090", None)])
def test_peak_table_by_gpu_name(name, peak):
    got, source = peak_tflops(ProfileConfig(), "cuda", name)
    assert got == peak
    assert ("set profile.peak_tflops" in source) == (peak is None)
    assert peak_tflops(ProfileConfig(peak_tflops=123.0), "cuda", name) == (123.0, "config profile.peak_tflops")


def test_ranks_aggregate_tokens_over_dp_once_per_tp_group_and_phases_by_mean():
    def rank(wall, data, tokens, tp_rank):
        return {"wall": wall, "phases": {"data": data}, "counters": {"tokens": tokens}, "flops": 10.0 * tokens,
                "flops_known": True, "peak_memory": int(wall), "cpu_seconds": 1.0, "threads": 1, "tp_rank": tp_rank}

    dp2 = aggregate([rank(10.0, 4.0, 100, 0), rank(12.0, 8.0, 60, 0)], "rm", ProfileConfig(), torch.device("cpu"), {}, None)
    assert dp2["wall_seconds"] == 12.0 and dp2["devices"]["count"] == 2
    assert dp2["tokens"]["total"] == 160 and dp2["flops"]["total"] == 1600.0
    assert dp2["phases"]["seconds"]["data"] == 6.0 and dp2["phases"]["other_seconds"] == 6.0
    assert dp2["tokens"]["per_second_per_device"] == pytest.approx(160 / 12 / 2)
    assert dp2["peak_memory"]["bytes"] == 12
    tp2 = aggregate([rank(10.0, 4.0, 100, 0), rank(10.0, 4.0, 100, 1)], "rm", ProfileConfig(), torch.device("cpu"), {}, None)
    assert tp2["tokens"]["total"] == 100  # the tp ranks processed the same shard
