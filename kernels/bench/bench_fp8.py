"""Benchmark: bf16 vs float8 training (parallel.fp8 = tensorwise, rowwise) on one GPU — step time
and tokens/s of a full training step (forward, causal-LM loss, backward, AdamW) of a ~1B
Qwen2-shaped model built from its config (random weights, no download), side by side in one run.

    python kernels/bench/bench_fp8.py --out fp8.json             # CUDA (sm89+), B=4, T=2048, bf16 weights
    python kernels/bench/bench_fp8.py --small --out fp8.json     # CPU smoke: tiny model, emulated fp8, eager

Variants: ``bf16`` eager, then ``bf16``/``fp8_tensorwise``/``fp8_rowwise`` with each decoder layer
under ``torch.compile`` (torchao's float8 casts and amax reductions only pay when fused into the
neighbouring ops; eager float8 is usually slower than bf16). The float8 conversion is the
project's own (``moslim_mega.parallel.fp8.apply_fp8``): decoder-layer linears only, the LM head
and embedding stay bf16. The losses of the timed steps are recorded too, so the JSON shows fp8
training the same model as bf16 from the same weights and batch.
"""

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402

from moslim_mega.config import ParallelConfig  # noqa: E402
from moslim_mega.parallel.fp8 import apply_fp8  # noqa: E402

# Qwen2-shaped, ~1.0B parameters (Qwen2's vocabulary, GQA with 2 KV heads, tied embeddings as the
# small Qwen2 checkpoints): 16 × 43M decoder + 311M embedding. Every decoder dim is a multiple of 16.
SHAPE = dict(vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
SMALL_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
VARIANTS = [("bf16_eager", "none", False), ("bf16", "none", True), ("fp8_tensorwise", "tensorwise", True),
            ("fp8_rowwise", "rowwise", True)]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--small", action="store_true", help="tiny model on CPU, emulated fp8, eager (a smoke test)")
    ap.add_argument("--iters", type=int, default=10, help="timed training steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compile happens here)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS), help="comma-separated subset")
    args = ap.parse_args()
    if not args.small and not torch.cuda.is_available():
        sys.exit("refusing to benchmark: no CUDA device (fp8 needs an sm89+ GPU: H100/H200/L40/B200); "
                 "use --small for a CPU smoke test")
    if args.small:
        args.batch, args.seq = min(args.batch, 2), min(args.seq, 32)
    return args


def build(shape, dtype, device, recipe: str, compile_layers: bool):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=dtype)
    converted = apply_fp8(model, ParallelConfig(fp8=recipe))
    if compile_layers:
        for i, layer in enumerate(model.model.layers):  # per-block compile, as torchtitan does
            model.model.layers[i] = torch.compile(layer, fullgraph=False)
    return model.train(), len(converted)


def run_variant(name, recipe, compiled, args, shape, dtype, dev, batch_BT):
    model, converted = build(shape, dtype, dev, recipe, compiled)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    losses = []

    def step():
        loss = model(input_ids=batch_BT, labels=batch_BT).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    t0 = time.perf_counter()
    r = benchutil.measure(step, args.warmup, args.iters)
    r["wall_s_incl_warmup"] = time.perf_counter() - t0
    tokens = batch_BT.numel()
    r.update(recipe=recipe, compiled=compiled, float8_linears=converted, tokens_per_step=tokens,
             tokens_per_s=tokens / (r["ms"] * 1e-3), losses=[float(x) for x in losses])
    del model, opt
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return r


def main():
    args = parse_args()
    dev = benchutil.device()
    shape = SMALL_SHAPE if args.small else SHAPE
    dtype = torch.bfloat16
    wanted = args.variants.split(",")
    unknown = set(wanted) - {v[0] for v in VARIANTS}
    if unknown:
        sys.exit(f"--variants: unknown {sorted(unknown)}; choose from {[v[0] for v in VARIANTS]}")
    gen = torch.Generator().manual_seed(1)
    batch_BT = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), generator=gen).to(dev)
    results = {}
    for name, recipe, compiled in VARIANTS:
        if name not in wanted:
            continue
        compiled = compiled and not args.small  # CPU smoke: eager (inductor on CPU only adds minutes)
        try:
            results[name] = run_variant(name, recipe, compiled, args, shape, dtype, dev, batch_BT)
        except Exception as exc:  # an OOM or a torchao/compile failure is recorded, not raised
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        print(name, {k: v for k, v in results[name].items() if k != "losses"}, flush=True)
    base = results.get("bf16", {}).get("tokens_per_s")
    for r in results.values():
        if base and "tokens_per_s" in r:
            r["speedup_vs_bf16_compiled"] = r["tokens_per_s"] / base
    from transformers import Qwen2Config

    cfg = Qwen2Config(**shape)  # parameters counted from the shape (tied embeddings counted once)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_layer = (2 * cfg.hidden_size * cfg.hidden_size + 2 * cfg.hidden_size * cfg.num_key_value_heads * head_dim
                 + 3 * cfg.hidden_size * cfg.intermediate_size)
    n_params = cfg.num_hidden_layers * per_layer + cfg.vocab_size * cfg.hidden_size
    benchutil.write(args.out, {
        "benchmark": "fp8_training_step", "small": args.small, "dtype": "bfloat16", "model": "qwen2-shaped",
        "shape": shape, "approx_params": n_params, "batch": args.batch, "seq": args.seq,
        "iters": args.iters, "warmup": args.warmup, "emulated_fp8": dev.type != "cuda", "results": results,
    })


if __name__ == "__main__":
    main()
