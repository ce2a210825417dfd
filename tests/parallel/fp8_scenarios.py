"""Run by ``torchrun --nproc_per_node=2`` from test_fp8_equivalence.py (not a test module itself).

One fp8 training step (torchao emulation on CPU) of the policy and the multi-head RM on a
2-process gloo mesh — FSDP2 (dp=2) and tensor parallel (tp=2), both recipes — next to the same
fp8 step in this process; rank 0 writes the differences as JSON to argv[1].

The single-process reference of a dp=2 step is the mean of two half-batch steps, not one
full-batch step: tensorwise scales the activations by their amax over the tensor, and under FSDP
each rank only sees its own rows (the weights' scales are over the full weight either way).
"""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModel, AutoModelForCausalLM, Qwen2Config

from moslim_mega.config import ParallelConfig
from moslim_mega.parallel.mesh import build_mesh
from moslim_mega.parallel.parallelize import build_sharded, parallelize_policy, parallelize_rm
from moslim_mega.parallel.stage import plain_copy
from moslim_mega.reward.losses import per_head_ce_loss
from moslim_mega.reward.model import MultiHeadRewardModel
from moslim_mega.utils.optim import Updater
from scenarios import B, NUM_CLASSES, V, batch, full_params, mean_over_dp, my_rows, policy_loss, seeded


def cfg():
    # Every decoder linear has dims % 16 == 0 (k/v: 2 heads × 16 = 32), so all of them are float8.
    return Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def updater(model):
    return Updater(model.parameters(), lr=1e-3, weight_decay=0.01, warmup_steps=0, grad_clip=0.05)


def reference_step(model, loss_fn, parts):
    """fp8 step of one process whose gradient is the mean over ``parts`` row slices."""
    upd = updater(model)
    losses = []
    for rows in parts:
        loss = loss_fn(model, rows)[0]
        (loss / len(parts)).backward()
        losses.append(loss.item())
    return sum(losses) / len(losses), upd.step(0)


def compare(name, build, skeleton, apply, loss_fn, mesh, pc, out):
    rows, dp = my_rows(mesh)
    ref = build()
    apply(ref, None, pc)  # the single-process path: float8 conversion only
    parts = [slice(r * B // dp, (r + 1) * B // dp) for r in range(dp)]
    ref_loss, ref_norm = reference_step(ref, loss_fn, parts)
    model = build_sharded(build, skeleton, apply, mesh, pc)
    local_types = sorted({type(getattr(p, "_local_tensor", p)).__name__ for p in model.parameters()})
    upd = updater(model)
    loss = loss_fn(model, rows)[0]
    loss.backward()
    norm = upd.step(0)
    sd = full_params(model, mesh)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in model.named_parameters()}
    res = {"loss_diff": abs(mean_over_dp(float(loss), mesh) - ref_loss), "grad_norm_diff": abs(norm - ref_norm),
           "grad_norm": ref_norm, "local_param_types": local_types,
           "num_float8_linears": sum(type(m).__name__ == "Float8Linear" for m in model.modules())}
    if dist.get_rank() == 0:
        ref_sd = ref.state_dict()
        assert set(sd) == set(ref_sd), (set(sd) ^ set(ref_sd))
        res["state_dict_types"] = sorted({type(t).__name__ for t in sd.values()})
        res["param_diff"] = max(float((sd[k] - ref_sd[k]).abs().max()) for k in sd)
        res["param_change"] = max(float((ref_sd[k] - v).abs().max()) for k, v in build().state_dict().items())
        res["grad_diff"] = max(float((grads[n] - p.grad).abs().max()) for n, p in ref.named_parameters())
        res["num_dtensor_params"] = sum(type(p).__name__ == "DTensor" for p in model.parameters())
        plain = plain_copy(model, sd, skeleton)  # what the trainers save / export: plain modules
        res["plain_copy_float8"] = sum(type(m).__name__ == "Float8Linear" for m in plain.modules())
    out[name] = res


def main():
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    ids, mask, labels = batch()
    out = {}

    def pol(m, r):
        return policy_loss(m, ids[r], mask[r])

    def rm_loss(m, r):
        logits = m(ids[r], mask[r])
        return per_head_ce_loss(logits, labels[r])[0], logits

    lm = seeded(lambda: AutoModelForCausalLM.from_config(cfg()))
    rm = seeded(lambda: MultiHeadRewardModel(AutoModel.from_config(cfg()), NUM_CLASSES))
    for layout in ("fsdp2", "tp2"):
        for recipe in ("tensorwise", "rowwise"):
            pc = ParallelConfig(dp=2 if layout == "fsdp2" else 1, tp=2 if layout == "tp2" else 1, fp8=recipe)
            mesh = build_mesh(pc)
            compare(f"policy_{layout}_{recipe}", lm, lambda c: AutoModelForCausalLM.from_config(c), parallelize_policy,
                    pol, mesh, pc, out)
            compare(f"rm_{layout}_{recipe}", rm, lambda c: MultiHeadRewardModel(AutoModel.from_config(c), NUM_CLASSES),
                    parallelize_rm, rm_loss, mesh, pc, out)
    # Activation checkpointing recomputes the float8 layers in backward: the same step.
    pc = ParallelConfig(dp=2, tp=1, fp8="tensorwise", activation_checkpointing=True)
    compare("policy_fsdp2_tensorwise_ac", lm, lambda c: AutoModelForCausalLM.from_config(c), parallelize_policy,
            pol, build_mesh(pc), pc, out)
    # FSDP2's bf16 MixedPrecisionPolicy under float8: bf16 compute around the fp8 matmuls, float8
    # all-gather of the fp32 master shards, fp32 gradient reduce-scatter (vs the fp32 fp8 step).
    pc = ParallelConfig(dp=2, tp=1, fp8="tensorwise", mixed_precision="bf16")
    compare("policy_fsdp2_tensorwise_bf16", lm, lambda c: AutoModelForCausalLM.from_config(c), parallelize_policy,
            pol, build_mesh(pc), pc, out)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from moslim_mega.parallel.dist import exit_process

    main()
    exit_process(0)
