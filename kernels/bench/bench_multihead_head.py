"""Benchmark: fused multi-head reward head — training (linear → per-head CE, forward + backward)
and inference (probabilities → Eq. 11 reward) — vs eager PyTorch and torch.compile.

    python kernels/bench/bench_multihead_head.py --out head.json       # CUDA, B=4096, D=8192, K=(5,5,2), bf16
    TRITON_INTERPRET=1 python kernels/bench/bench_multihead_head.py --small --out head.json   # CPU smoke
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402

from moslim_mega.kernels.multihead_head import (  # noqa: E402
    fused_multihead_head,
    fused_multihead_reward,
    multihead_head_loss_reference,
)
from moslim_mega.reward.mapping import RewardMapper, RunningClassStats  # noqa: E402

K = (5, 5, 2)
SHAPES = [(4096, 8192)]  # (B, D)
SMALL = [(47, 40)]


def eager_reward(h_BD, w_CD, b_C, targets_BH, mapper):
    probs = [torch.softmax(z.float(), -1) for z in torch.split(F.linear(h_BD, w_CD, b_C), list(K), dim=-1)]
    return mapper(probs, targets_BH)


def main():
    args = benchutil.parse_args(__doc__.splitlines()[0])
    dev = benchutil.device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the interpreter is fp32-only
    no_triton = benchutil.triton_runnable()
    shapes = []
    for b, d in SMALL if args.small else SHAPES:
        gen = torch.Generator(device=dev).manual_seed(0)
        hidden = torch.randn(b, d, device=dev, generator=gen).to(dtype).requires_grad_()
        weight = (torch.randn(sum(K), d, device=dev, generator=gen) / d**0.5).to(dtype).requires_grad_()
        bias = torch.zeros(sum(K), device=dev, dtype=dtype, requires_grad=True)
        labels = torch.stack([torch.randint(-1, k, (b,), device=dev, generator=gen) for k in K], 1)
        stats = RunningClassStats(K)
        stats.update([torch.softmax(torch.randn(256, k), 1) for k in K])
        mapper = RewardMapper(stats)
        targets = torch.stack([torch.randint(-1, k, (b,), device=dev, generator=gen) for k in K], 1)

        def train(fn):
            def run():
                hidden.grad = weight.grad = bias.grad = None
                fn(hidden, weight, bias, K, labels)[0].backward()
            return run

        train_variants = {"eager": multihead_head_loss_reference}
        if dev.type == "cuda":
            train_variants["torch_compile"] = torch.compile(multihead_head_loss_reference)
        if no_triton is None:
            train_variants["fused_triton"] = lambda *a: fused_multihead_head(*a, impl="triton")
        train_res, infer_res = {}, {}
        want = multihead_head_loss_reference(hidden, weight, bias, K, labels)[1].detach()
        for name, fn in train_variants.items():
            benchutil.run_variant(name, train(fn), args, train_res)
            if "error" not in train_res[name]:
                got = fn(hidden, weight, bias, K, labels)[1].detach()
                train_res[name]["max_abs_diff_per_head_loss_vs_eager"] = (got - want).abs().max().item()
        infer_variants = {"eager": lambda: eager_reward(hidden, weight, bias, targets, mapper)}
        if no_triton is None:
            infer_variants["fused_triton"] = lambda: fused_multihead_reward(
                hidden, weight, bias, K, targets, **mapper.kernel_args(), impl="triton")[1]
        with torch.no_grad():
            want_r = infer_variants["eager"]()
            for name, fn in infer_variants.items():
                benchutil.run_variant(name, fn, args, infer_res)
                if "error" not in infer_res[name]:
                    infer_res[name]["max_abs_diff_reward_vs_eager"] = (fn() - want_r).abs().max().item()
        if no_triton is not None:
            train_res["fused_triton"] = infer_res["fused_triton"] = {"skipped": no_triton}
        summary = {}
        for label, res in (("train_fwd_bwd", train_res), ("inference_reward", infer_res)):
            if "ms" in res.get("fused_triton", {}) and "ms" in res.get("eager", {}):
                summary[f"{label}_speedup_vs_eager"] = res["eager"]["ms"] / res["fused_triton"]["ms"]
        shapes.append({"B": b, "D": d, "K": list(K), "train": train_res, "inference": infer_res, "summary": summary})
    benchutil.write(args.out, {
        "bench": "multihead_head", "small": args.small, "dtype": str(dtype), "iters": args.iters,
        "targets": {"train_fwd_bwd_speedup_vs_eager": ">= 3"}, "shapes": shapes,
    })


if __name__ == "__main__":
    main()
