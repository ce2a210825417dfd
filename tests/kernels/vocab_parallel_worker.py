"""One rank of the 2-process gloo check of vocab_parallel_linear_logprob (run by torchrun).

Each rank holds half of W's rows (V odd, so the shards are unequal: explicit vocab_start); both
impls must give the single-process reference's log-probs, entropies, full hidden gradient and
this rank's slice of the weight gradient."""

import os
import sys

import torch
import torch.distributed as dist

from moslim_mega.kernels.linear_logprob import linear_logprob_reference, vocab_parallel_linear_logprob

N, H, V, TEMP = 23, 19, 61, 0.9


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(0)  # same full tensors on every rank
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.5
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::5] = -100
    g_lp, g_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)

    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp_ref, ent_ref = linear_logprob_reference(h_ref, w_ref, targets, TEMP)
    ((lp_ref * g_lp).sum() + (ent_ref * g_ent).sum()).backward()

    bounds = [0, 31, V]  # rank 0: 31 rows, rank 1: 30 rows
    lo, hi = bounds[rank], bounds[rank + 1]
    impls = ["reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    for impl in impls:
        h = hidden.clone().requires_grad_()
        w_shard = weight[lo:hi].clone().requires_grad_()
        lp, ent = vocab_parallel_linear_logprob(
            h, w_shard, targets, dist.group.WORLD, vocab_start=lo, vocab_size=V, temperature=TEMP, chunk_size=16,
            impl=impl,
        )
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        for name, a, b in [("logp", lp, lp_ref), ("entropy", ent, ent_ref), ("grad_hidden", h.grad, h_ref.grad),
                           ("grad_weight_shard", w_shard.grad, w_ref.grad[lo:hi])]:
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-5, msg=f"{impl} rank {rank} {name}")
    with open(os.path.join(out_dir, f"ok_rank{rank}"), "w") as f:
        f.write(",".join(impls))
    dist.destroy_process_group()


if __name__ == "__main__":
    from moslim_mega.parallel.dist import exit_process

    main(sys.argv[1])
    exit_process(0)  # as the CLI does (moslim_mega/parallel/dist.py)
