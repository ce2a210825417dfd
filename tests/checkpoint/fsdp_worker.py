"""Run by test_fsdp.py under ``torchrun --nproc_per_node=2`` (gloo): an FSDP2-sharded tiny Llama
takes one data-parallel step, is checkpointed (each rank writes its own shards), is reloaded into
a freshly sharded model + optimizer, and both take one more identical step.

Writes into OUT: ``ckpt/`` and ``logits.pt`` (the sharded model's full logits on a fixed batch
after the first step, from rank 0), and ``ok_rank<r>`` when every check on that rank passed."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, LlamaConfig

from moslim_mega.checkpoint.manager import CheckpointManager
from moslim_mega.checkpoint.state import write_model_assets
from moslim_mega.config import CheckpointConfig


def build(seed: int):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def step(model, opt, ids_BT):
    rank = dist.get_rank()
    local = ids_BT[2 * rank: 2 * rank + 2]  # data parallel: each rank its half of the batch
    model(input_ids=local, labels=local).loss.backward()
    opt.step()
    opt.zero_grad()


def local_state(model, opt):
    params = [p.to_local().clone() for p in model.parameters()]
    moments = [opt.state[p][k].to_local().clone() for p in model.parameters() for k in ("exp_avg", "exp_avg_sq")]
    return params + moments


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    ids_BT = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    model, opt = build(0)
    assert type(next(model.parameters())).__name__ == "DTensor"
    step(model, opt, ids_BT)
    mgr = CheckpointManager(CheckpointConfig(every=1), out)
    mgr.save(1, {"actor": model}, {"actor": (model, opt)}, {"rank": rank},
             assets=lambda d: write_model_assets(d, "actor", "causal_lm", model, None))
    with torch.no_grad():
        logits = model(input_ids=ids_BT).logits
    model.reshard()  # the root keeps its parameters gathered after a forward (for the backward)
    if rank == 0:
        torch.save(logits, out / "logits.pt")

    fresh, fresh_opt = build(1)  # another init and an empty optimizer
    assert mgr.load(mgr.resume_path(), {"actor": fresh}, {"actor": (fresh, fresh_opt)}) == {"rank": rank}
    assert all(torch.equal(a, b) for a, b in zip(local_state(model, opt), local_state(fresh, fresh_opt)))
    step(model, opt, ids_BT.flip(0))
    step(fresh, fresh_opt, ids_BT.flip(0))
    assert all(torch.equal(a, b) for a, b in zip(local_state(model, opt), local_state(fresh, fresh_opt)))
    dist.barrier()
    (out / f"ok_rank{rank}").write_text("ok\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    from moslim_mega.parallel.dist import exit_process

    main(Path(sys.argv[1]))
    exit_process(0)  # as the CLI does (moslim_mega/parallel/dist.py)
