"""Benchmark: the torch path vs the megatron engine on one GPU — tokens/s, MFU and peak memory of
one RLOO-style actor training step (forward, fused linear → log-prob, PPO clipped loss, backward,
AdamW) of a ~1B Qwen2-shaped causal LM built from its config (random weights, no download), the
same weights and batch for both, side by side in one run.

    python kernels/bench/bench_megatron.py --out megatron.json            # CUDA: B=4, T=2048, bf16
    python kernels/bench/bench_megatron.py --small --out megatron.json    # tiny model (see below)
    python kernels/bench/bench_megatron.py --fp8 tensorwise --out m.json  # + megatron with TE FP8

Variants: ``torch`` — the HF model, ``algos.logprob.sequence_logprobs`` (the fused kernel),
``torch.optim.AdamW`` on the bf16 parameters; ``megatron`` — ``MegatronEngine`` (tp = pp = 1, the
TE layer spec when transformer_engine imports, else the local spec — recorded as ``layer_spec``),
megatron's DDP and distributed optimizer (fp32 main parameters and Adam states: more memory than
``torch`` by design). The first step's mean token log-prob of each variant is recorded: both start
from the same weights and batch, so they agree to bf16 precision.

``--fp8 RECIPE`` (tensorwise, delayed, blockwise, mxfp8: ``parallel.fp8`` under the megatron
backend) adds a third variant, ``megatron_fp8``: the same engine with Transformer Engine FP8 in the
decoder layers, side by side with bf16 (``speedup_vs_megatron_bf16``). Without transformer_engine
it is skipped with a line that says so (recorded as ``skipped``); a refusal of the engine (a GPU
below sm89, MXFP8 below Blackwell) is recorded as its ``error``.

``--small`` builds a tiny model; the torch variant runs anywhere, the megatron one needs CUDA — on
CPU only the test-only shim (tests/engine/megatron/cpu_shim.py) makes it run, which is how
tests/engine/megatron/test_bench_megatron.py smoke-tests this script by calling :func:`run`.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402

# Qwen2-shaped, ~1.0B parameters, as bench_fp8.py; untied embeddings (megatron's output layer is
# its own weight then, as Qwen2-1.5B and larger).
SHAPE = dict(vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
SMALL_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
VARIANTS = ("torch", "megatron")
FP8_RECIPES = ("tensorwise", "delayed", "blockwise", "mxfp8")  # engine/megatron/config.FP8_RECIPES


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--small", action="store_true", help="tiny model (a smoke test, not a benchmark)")
    ap.add_argument("--iters", type=int, default=10, help="timed training steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--fp8", default="none", choices=("none",) + FP8_RECIPES,
                    help="also run the megatron engine with this Transformer Engine FP8 recipe (needs TE)")
    args = ap.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    for name in ("iters", "batch", "seq"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        ap.error(f"--warmup: must be >= 0, got {args.warmup}")
    if not args.small and not torch.cuda.is_available():
        ap.error("refusing to benchmark: no CUDA device (the ~1B model needs an H100/H200); use --small")
    if args.small:
        args.batch, args.seq = min(args.batch, 2), min(args.seq, 32)
    return args


def _batch(shape, args, dev):
    gen = torch.Generator().manual_seed(1)
    ids_BT = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), generator=gen)
    mask_BT = torch.ones_like(ids_BT)
    adv_BT = torch.randn(args.batch, args.seq, generator=gen)
    return {"ids_BT": ids_BT.to(dev), "mask_BT": mask_BT.to(dev), "adv_BT": adv_BT.to(dev)}


def _loss_fn(out, micro):
    """RLOO-style actor loss on the head output: PPO clip around the detached log-probs (ratio 1)."""
    from moslim_mega.algos.ppo import ppo_policy_loss

    action_BT = torch.zeros_like(micro["mask_BT"])
    action_BT[:, 1:] = 1
    loss, _ = ppo_policy_loss(out.logp_BT, out.logp_BT.detach(), micro["adv_BT"], action_BT, 0.2)
    # The loss at ratio 1 is −mean(adv) whatever the model; the mean log-prob is the model's own.
    logp_mean = float((out.logp_BT.detach() * action_BT).sum() / action_BT.sum())
    return loss, {"loss": float(loss), "logp_mean": logp_mean}


def _hf_model(shape, dtype, dev):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    with torch.device(dev):
        return AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=dtype)


def run_torch(shape, dtype, dev, micro, args):
    from moslim_mega.algos.logprob import sequence_logprobs
    from moslim_mega.engine.base import LogprobOut

    model = _hf_model(shape, dtype, dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    losses = []

    def step():
        out = LogprobOut(*sequence_logprobs(model, micro["ids_BT"], micro["mask_BT"]))
        loss, row = _loss_fn(out, micro)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(row["logp_mean"])

    r = benchutil.measure(step, args.warmup, args.iters)
    return r, losses  # model and optimizer die with this frame, before the next variant


def run_megatron(shape, dtype, dev, micro, args, fp8: str = "none"):
    from transformers import Qwen2Config

    from moslim_mega.engine.megatron.dims import Layout
    from moslim_mega.engine.megatron.engine import EngineSettings, MegatronEngine

    model = _hf_model(shape, dtype, dev)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    config = {**Qwen2Config(**shape).to_dict(), "dtype": "bfloat16" if dtype == torch.bfloat16 else "float32"}
    engine = MegatronEngine(config, state.__getitem__, "causal_lm", Layout(),
                            EngineSettings(lr=1e-6, grad_clip=1.0, fp8=fp8))
    del model, state
    gc.collect()
    losses = []

    def step():
        metrics = engine.train_step([micro], _loss_fn, step=len(losses))
        losses.append(metrics["logp_mean"])

    r = benchutil.measure(step, args.warmup, args.iters)
    r["layer_spec"] = "transformer_engine" if engine.use_te else "local"
    r["fp8"] = fp8
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    return r, losses


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _init_single_process(dev):
    if dist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=0, world_size=1)
    if dev.type == "cuda":
        torch.cuda.set_device(0)
    return True


def run(args) -> dict:
    """Both variants; returns (and writes to ``args.out``) the JSON record."""
    from transformers import Qwen2Config

    from moslim_mega.config import ProfileConfig
    from moslim_mega.profile import flops_from_config, peak_tflops

    dev = benchutil.device()
    shape = SMALL_SHAPE if args.small else SHAPE
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    micro = _batch(shape, args, dev)
    owns_pg = _init_single_process(dev)
    cfg = Qwen2Config(**shape)
    flops = flops_from_config(cfg, cfg.vocab_size)
    tokens = args.batch * args.seq
    peak, peak_src = peak_tflops(ProfileConfig(), dev.type, torch.cuda.get_device_name() if dev.type == "cuda" else "")
    results = {}
    names = args.variants.split(",") + (["megatron_fp8"] if args.fp8 != "none" else [])
    try:
        for name in names:
            t0 = time.perf_counter()
            if name == "megatron_fp8" and not _te_importable():
                line = (f"megatron_fp8 skipped: transformer_engine is not importable, and FP8 in megatron-core "
                        f"needs it (--fp8 {args.fp8} compares nothing here)")
                print(line, flush=True)
                results[name] = {"skipped": line, "fp8": args.fp8}
                continue
            try:
                if name == "torch":
                    r, losses = run_torch(shape, dtype, dev, micro, args)
                else:
                    r, losses = run_megatron(shape, dtype, dev, micro, args,
                                             fp8=args.fp8 if name == "megatron_fp8" else "none")
            except Exception as exc:  # an OOM or a missing megatron-core is recorded, not raised
                r, losses = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}, []
            if "ms" in r:
                r["tokens_per_s"] = tokens / (r["ms"] * 1e-3)
                achieved = flops.per_token(args.seq / 2, train=True) * r["tokens_per_s"]
                r["mfu"] = achieved / (peak * 1e12) if peak else None
            r["wall_s_incl_warmup"] = time.perf_counter() - t0
            r["first_logp_mean"] = losses[0] if losses else None
            results[name] = r
            print(name, r, flush=True)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if owns_pg:
            dist.destroy_process_group()
    if all("ms" in results.get(v, {}) for v in VARIANTS):
        results["megatron"]["speedup_vs_torch"] = results["megatron"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
    if "ms" in results.get("megatron", {}) and "ms" in results.get("megatron_fp8", {}):
        fp8 = results["megatron_fp8"]
        fp8["speedup_vs_megatron_bf16"] = fp8["tokens_per_s"] / results["megatron"]["tokens_per_s"]
        # Same weights and batch: the first step's mean log-prob differs by FP8's rounding only.
        fp8["first_logp_mean_diff_vs_bf16"] = fp8["first_logp_mean"] - results["megatron"]["first_logp_mean"]
    record = {"benchmark": "megatron_vs_torch_actor_step", "small": args.small, "device": dev.type,
              "dtype": str(dtype).removeprefix("torch."), "model": "qwen2-shaped", "shape": shape,
              "approx_params": flops.params, "batch": args.batch, "seq": args.seq, "iters": args.iters,
              "warmup": args.warmup, "fp8": args.fp8, "peak_tflops": peak, "peak_source": peak_src,
              "results": results}
    benchutil.write(args.out, record)
    return record


if __name__ == "__main__":
    run(parse_args())
