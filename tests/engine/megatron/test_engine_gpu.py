"""The megatron engine on one GPU, unpatched (no CPU shim): its forward equals the HF forward within
bf16 tolerance, and one RLOO-style actor step in fp32 equals plain torch's (HF model, same loss,
clip, AdamW). Skipped without CUDA (tests/conftest.py); run by ``kernels/bench/run_gpu.sh megatron``."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")


@pytest.fixture
def single_process_group():
    with socket.socket() as s:  # a free port for the one-process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    yield
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _setup(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from moslim_mega.engine.megatron.dims import Layout
    from moslim_mega.engine.megatron.engine import EngineSettings, MegatronEngine

    from .engine_worker import batches
    from .tiny_hf import _randomise, hf_config

    config = hf_config("qwen2")
    ref = AutoModelForCausalLM.from_config(config)
    _randomise(ref, seed=1)
    ref = ref.to("cuda", dtype)
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    hf = {**config.to_dict(), "dtype": "bfloat16" if dtype == torch.bfloat16 else "float32"}
    settings = EngineSettings(lr=1e-2, weight_decay=0.1, warmup_steps=2, grad_clip=1.0)
    engine = MegatronEngine(hf, state.__getitem__, "causal_lm", Layout(), settings)
    micro = [{k: v.cuda() for k, v in m.items()} for m in batches(config.vocab_size, seed=2)]
    return ref, engine, settings, micro


@pytest.mark.gpu
def test_megatron_forward_equals_hf_in_bf16(single_process_group):
    from moslim_mega.algos.logprob import sequence_logprobs

    ref, engine, _, micro = _setup(torch.bfloat16)
    for m in micro:
        with torch.no_grad():
            want_BT, _ = sequence_logprobs(ref, m["ids_BT"], m["mask_BT"])
        got = engine.forward(m)
        # bf16 hidden states through 4 layers of random weights: log-probs agree to a few bf16 ulps
        # of their magnitude (measured on the tiny model; a mapping error is O(1)).
        scale = want_BT.abs().max().clamp(min=1.0)
        assert float((got.logp_BT - want_BT).abs().max() / scale) < 3e-2


@pytest.mark.gpu
def test_megatron_rloo_step_equals_torch_in_fp32(single_process_group):
    from moslim_mega.algos.logprob import sequence_logprobs
    from moslim_mega.engine.base import LogprobOut
    from moslim_mega.utils.optim import Updater

    from .engine_worker import actor_loss

    torch.backends.cuda.matmul.allow_tf32 = False
    ref, engine, settings, micro = _setup(torch.float32)
    for m in micro:
        with torch.no_grad():
            m["old_logp_BT"] = sequence_logprobs(ref, m["ids_BT"], m["mask_BT"])[0] + 0.01 * m["adv_BT"]
    total = sum(float((m["mask_BT"][:, 1:] * m["mask_BT"][:, :-1]).sum()) for m in micro)
    loss_fn = actor_loss(total)
    metrics = engine.train_step(micro, loss_fn, step=0)
    upd = Updater(ref.parameters(), settings.lr, settings.weight_decay, settings.warmup_steps, settings.grad_clip)
    for m in micro:
        loss_fn(LogprobOut(*sequence_logprobs(ref, m["ids_BT"], m["mask_BT"])), m)[0].backward()
    norm = upd.step(0)
    assert abs(metrics["grad_norm"] - norm) < 1e-4 * norm
    exported = dict(engine.export_weights())
    for name, p in ref.state_dict().items():
        assert float((exported[name].cuda() - p).abs().max()) < 1e-4, name


def _nll_loss(out, micro):
    """SFT's loss on the head output: the mean negative log-prob of the attended next tokens."""
    mask_BT = micro["mask_BT"]
    valid_BT = torch.zeros_like(mask_BT, dtype=torch.bool)
    valid_BT[:, 1:] = (mask_BT[:, 1:] != 0) & (mask_BT[:, :-1] != 0)
    loss = -(out.logp_BT * valid_BT).sum() / valid_BT.sum()
    return loss / 2, {"nll": float(loss)}  # two micro-batches, each half of the step


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_megatron_fp8_step_is_finite_and_near_bf16(single_process_group, recipe):
    """parallel.fp8 under the megatron backend: one training step of a tiny Qwen2-shaped model whose
    FP8 GEMM dims are multiples of 16, in TE FP8 and in bf16 from the same weights and batch. T=10
    with B=2 (20 tokens) also exercises the engine's padding of the token dimension to 16."""
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed: no FP8 in megatron-core")
    from transformers import AutoModelForCausalLM, Qwen2Config

    from moslim_mega.engine.megatron.dims import Layout
    from moslim_mega.engine.megatron.engine import EngineSettings, MegatronEngine

    from .engine_worker import batches

    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        pytest.skip(f"FP8 needs compute capability >= 8.9; this GPU is sm{major}{minor}")
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2)  # logits far from uniform, so the losses say something
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16)
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    hf = {**config.to_dict(), "dtype": "bfloat16"}
    micro = [{k: v.cuda() for k, v in m.items()} for m in batches(config.vocab_size, seed=2)]
    results = {}
    for fp8 in ("none", recipe):
        engine = MegatronEngine(hf, state.__getitem__, "causal_lm", Layout(), EngineSettings(lr=1e-3, fp8=fp8))
        metrics = engine.train_step(micro, _nll_loss, step=0)
        after = engine.forward(micro[0]).logp_BT
        results[fp8] = (metrics, after)
        del engine
    (base, _), (got, after) = results["none"], results[recipe]
    assert all(torch.isfinite(torch.tensor(v)) for v in (got["nll"], got["grad_norm"])), got
    assert bool(torch.isfinite(after).all())
    # E4M3 operands carry 3 mantissa bits: the loss of 2 layers moves by well under 5% (a missing
    # scale or a wrong format is O(1)); the gradient norm within 25%.
    assert abs(got["nll"] - base["nll"]) < 0.05 * abs(base["nll"]), (recipe, got, base)
    assert abs(got["grad_norm"] - base["grad_norm"]) < 0.25 * base["grad_norm"], (recipe, got, base)
