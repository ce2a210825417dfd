"""Benchmark: fused linear → log-prob + entropy, forward + backward, vs eager PyTorch,
torch.compile, the repo's chunked PyTorch path, and Liger-Kernel (cross-entropy only) if importable.

    python kernels/bench/bench_linear_logprob.py --out lp.json            # CUDA, the issue's shapes, bf16
    TRITON_INTERPRET=1 python kernels/bench/bench_linear_logprob.py --small --out lp.json   # CPU smoke

Effective TFLOP/s counts 6·N·H·V for forward + backward (the three N×H×V matmuls), whatever a
variant actually executes (the fused one recomputes the logits in backward: 8·N·H·V of work).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402

from moslim_mega.algos.logprob import chunked_linear_logprob_entropy  # noqa: E402
from moslim_mega.kernels.linear_logprob import fused_linear_logprob  # noqa: E402

SHAPES = [(8192, 4096, 131072), (8192, 3584, 152064)]  # (N, H, V): Llama-3-class and Qwen2-7B heads
SMALL = [(47, 40, 123)]


def eager(h_NH, w_VH, t_N):
    logits_NV = (h_NH @ w_VH.T).float()
    logp_NV = torch.log_softmax(logits_NV, dim=-1)
    entropy_N = -(logp_NV.exp() * logp_NV).sum(-1)
    return logp_NV.gather(1, t_N[:, None])[:, 0], entropy_N


def main():
    args = benchutil.parse_args(__doc__.splitlines()[0])
    dev = benchutil.device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the interpreter is fp32-only
    compiled = torch.compile(eager) if dev.type == "cuda" else None
    liger_fn = benchutil.liger()
    no_triton = benchutil.triton_runnable()
    shapes = []
    for n, h, v in SMALL if args.small else SHAPES:
        gen = torch.Generator(device=dev).manual_seed(0)
        hidden = torch.randn(n, h, device=dev, generator=gen).to(dtype).requires_grad_()
        weight = (torch.randn(v, h, device=dev, generator=gen) / h**0.5).to(dtype).requires_grad_()
        targets = torch.randint(0, v, (n,), device=dev, generator=gen)
        g_lp, g_ent = torch.randn(n, device=dev, generator=gen), torch.randn(n, device=dev, generator=gen)

        def step(fn):
            def run():
                hidden.grad = weight.grad = None
                lp, ent = fn(hidden, weight, targets)
                torch.autograd.backward([lp, ent], [g_lp, g_ent])
                return lp.detach()
            return run

        variants = {
            "eager": eager,
            "chunked_torch": lambda a, b, c: chunked_linear_logprob_entropy(a, b, c, chunk_size=8192),
        }
        if compiled is not None:
            variants["torch_compile"] = compiled
        if no_triton is None:
            variants["fused_triton"] = lambda a, b, c: fused_linear_logprob(a, b, c, impl="triton")
            if not args.small:  # larger chunks: fewer, bigger matmuls for N×C×4 more bytes of logits
                variants["fused_triton_chunk16k"] = lambda a, b, c: fused_linear_logprob(
                    a, b, c, chunk_size=16384, impl="triton")
        flops = 6.0 * n * h * v
        results = {}
        with torch.no_grad():
            want = eager(hidden, weight, targets)[0]
        for name, fn in variants.items():
            benchutil.run_variant(name, step(fn), args, results, flops)
            if "error" not in results[name]:
                with torch.no_grad():
                    got = fn(hidden, weight, targets)[0]
                results[name]["max_abs_diff_logp_vs_eager"] = (got.float() - want.float()).abs().max().item()
        if liger_fn is not None:  # CE = −mean log p(target) only: no entropy, so not like for like
            def liger_run():
                hidden.grad = weight.grad = None
                liger_fn.apply(hidden, weight, targets, None, None, -100, 0.0, 0.0, "sum")[0].backward()
            benchutil.run_variant("liger_flce_ce_only", liger_run, args, results, flops)
        if no_triton is not None:
            results["fused_triton"] = {"skipped": no_triton}
        summary = {}
        fused, base = results.get("fused_triton", {}), results.get("eager", {})
        if "ms" in fused:
            summary["fused_eff_tflops"] = fused.get("eff_tflops")
            if "ms" in base:
                summary["speedup_vs_eager"] = base["ms"] / fused["ms"]
            if fused.get("peak_extra_bytes") and base.get("peak_extra_bytes"):
                summary["peak_mem_fraction_of_eager"] = fused["peak_extra_bytes"] / base["peak_extra_bytes"]
        shapes.append({"N": n, "H": h, "V": v, "results": results, "summary": summary})
    benchutil.write(args.out, {
        "bench": "linear_logprob", "small": args.small, "dtype": str(dtype), "iters": args.iters,
        "targets": {"fused_eff_tflops": ">= 500", "peak_mem_fraction_of_eager": "<= 0.25"},
        "shapes": shapes,
    })


if __name__ == "__main__":
    main()
