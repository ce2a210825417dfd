"""Run by ``torchrun --nproc_per_node=2`` from test_equivalence.py (not a test module itself).

One training step of the policy, the multi-head RM, the PPO critic and a Qwen2-MoE policy on a
2-process gloo mesh — FSDP2 (dp=2) and tensor parallel (tp=2) — next to the same step in this
process without any parallelism; rank 0 writes the differences as JSON to argv[1].
"""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen2MoeConfig

from moslim_mega.algos.logprob import sequence_logprobs
from moslim_mega.config import ParallelConfig
from moslim_mega.models.value import ValueModel
from moslim_mega.parallel.mesh import build_mesh
from moslim_mega.parallel.parallelize import build_sharded, parallelize_policy, parallelize_rm, parallelize_value
from moslim_mega.parallel.stage import plain_copy
from moslim_mega.parallel.vocab_parallel import vocab_shard_start
from moslim_mega.reward.losses import per_head_ce_loss
from moslim_mega.reward.model import MultiHeadRewardModel
from moslim_mega.utils.optim import Updater

V, B, T = 97, 4, 12  # an odd vocabulary: uneven vocab shards under tp=2
NUM_CLASSES = (5, 3)


def llama_cfg():
    return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def qwen_cfg():
    return Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def moe_cfg():
    return Qwen2MoeConfig(vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                          shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, tie_word_embeddings=False)


def seeded(fn):
    def build():
        torch.manual_seed(0)
        return fn()
    return build


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0  # a left-padded row
    mask[3, -2:] = 0  # a right-padded row
    labels = torch.stack([torch.randint(0, k, (B,), generator=g) for k in NUM_CLASSES], 1)
    return ids, mask, labels


def my_rows(mesh):
    """This dp rank's rows (tp ranks of one dp group see the same rows)."""
    dp_rank, dp = mesh["dp"].get_local_rank(), mesh["dp"].size()
    return slice(dp_rank * B // dp, (dp_rank + 1) * B // dp), dp


def policy_loss(model, ids, mask):
    # A per-sequence mean, so FSDP's mean over equal dp shards is the global mean.
    logp, ent = sequence_logprobs(model, ids, mask, temperature=0.7)
    return (-(logp.sum(1) / mask.sum(1)) - 0.1 * ent.sum(1) / mask.sum(1)).mean(), logp, ent


def step(model, loss_fn):
    upd = Updater(model.parameters(), lr=1e-3, weight_decay=0.01, warmup_steps=0, grad_clip=0.05)
    loss, *extra = loss_fn(model)
    loss.backward()
    norm = upd.step(0)
    return float(loss), norm, extra


def full_params(model, mesh):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd


def mean_over_dp(x, mesh):
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, group=mesh["dp"].get_group())
    return float(t) / mesh["dp"].size()


def compare(name, build, skeleton, apply, loss_fn, mesh, pc, out):
    ref = build()
    ref_loss, ref_norm, ref_extra = step(ref, lambda m: loss_fn(m, slice(0, B)))
    model = build_sharded(build, skeleton, apply, mesh, pc)
    rows, _ = my_rows(mesh)
    saved = []  # tensors autograd keeps for backward; checkpointed layers keep only their inputs

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, norm, extra = step(model, lambda m: loss_fn(m, rows))
    sd = full_params(model, mesh)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in model.named_parameters()}
    res = {"loss_diff": abs(mean_over_dp(loss, mesh) - ref_loss), "grad_norm_diff": abs(norm - ref_norm),
           "grad_norm": ref_norm, "saved_numel": sum(saved)}
    if dist.get_rank() == 0:
        ref_sd = ref.state_dict()
        assert set(sd) == set(ref_sd), (set(sd) ^ set(ref_sd))
        res["param_diff"] = max(float((sd[k] - ref_sd[k]).abs().max()) for k in sd)
        res["param_change"] = max(float((ref_sd[k] - v).abs().max()) for k, v in build().state_dict().items())
        ref_grads = dict((n, p.grad) for n, p in ref.named_parameters())
        res["grad_diff"] = max(float((grads[n] - g).abs().max()) for n, g in ref_grads.items())
        res["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
        res["num_dtensor_params"] = sum(type(p).__name__ == "DTensor" for p in model.parameters())
        if name.startswith("policy"):  # log-probs and entropies of this rank's rows (before the step)
            res["logp_diff"] = max(float((a[rows] - b).abs().max()) for a, b in zip(ref_extra, extra))
        if name == "rm_fsdp2":
            res["plain_copy_diff"] = max(float((plain_copy(model, sd, skeleton).state_dict()[k] - sd[k]).abs().max()) for k in sd)
    out[name] = res


def main():
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    ids, mask, labels = batch()
    out = {}
    meshes = {"fsdp2": ParallelConfig(dp=2, tp=1), "tp2": ParallelConfig(dp=1, tp=2)}
    for tag, pc in meshes.items():
        mesh = build_mesh(pc)

        def pol(m, r):
            return policy_loss(m, ids[r], mask[r])

        compare(f"policy_{tag}", seeded(lambda: AutoModelForCausalLM.from_config(llama_cfg())),
                lambda c: AutoModelForCausalLM.from_config(c), parallelize_policy, pol, mesh, pc, out)

        def rm_loss(m, r):
            logits = m(ids[r], mask[r])
            return per_head_ce_loss(logits, labels[r])[0], logits

        compare(f"rm_{tag}", seeded(lambda: MultiHeadRewardModel(AutoModel.from_config(qwen_cfg()), NUM_CLASSES)),
                lambda c: MultiHeadRewardModel(AutoModel.from_config(c), NUM_CLASSES), parallelize_rm, rm_loss, mesh, pc, out)

        def value_loss(m, r):
            v = m(ids[r], mask[r])
            return ((v - 0.5) ** 2 * mask[r]).sum(1).div(mask[r].sum(1)).mean(), v

        def build_value():
            vm = ValueModel(AutoModel.from_config(llama_cfg()))
            torch.nn.init.normal_(vm.value_head.weight, std=0.1)  # V ≡ 0 would hide the head's gradient
            return vm

        compare(f"value_{tag}", seeded(build_value), lambda c: ValueModel(AutoModel.from_config(c)),
                parallelize_value, value_loss, mesh, pc, out)
        if tag == "tp2":
            # The LM head's plain call under tp: this rank's logits slice, whose partial input
            # gradient the head all-reduces; a loss over every logit equals the unsharded one.
            def logits_loss(m, r):
                z = m(input_ids=ids[r], attention_mask=mask[r]).logits.float()
                start = vocab_shard_start(V, dist.get_rank(), 2) if z.shape[-1] < V else 0
                w = torch.linspace(-1.0, 1.0, V)[start : start + z.shape[-1]]
                local = (z.pow(2) * w).sum() / (z.shape[0] * z.shape[1] * V)
                if z.shape[-1] == V:
                    return (local,)
                total = local.detach().clone()
                dist.all_reduce(total)
                return (local + (total - local.detach()),)  # the global value, this rank's gradient

            compare("logits_tp2", seeded(lambda: AutoModelForCausalLM.from_config(llama_cfg())),
                    lambda c: AutoModelForCausalLM.from_config(c), parallelize_policy, logits_loss, mesh, pc, out)
        if tag == "fsdp2":
            # Activation checkpointing recomputes each layer in backward: same numbers.
            pc_ac = ParallelConfig(dp=2, tp=1, activation_checkpointing=True)
            compare("policy_fsdp2_ac", seeded(lambda: AutoModelForCausalLM.from_config(llama_cfg())),
                    lambda c: AutoModelForCausalLM.from_config(c), parallelize_policy, pol, mesh, pc_ac, out)
            # bf16 compute and all-gathers, fp32 reduce-scatter, fp32 master weights in the shards.
            pc_bf16 = ParallelConfig(dp=2, tp=1, mixed_precision="bf16")
            compare("policy_fsdp2_bf16", seeded(lambda: AutoModelForCausalLM.from_config(llama_cfg())),
                    lambda c: AutoModelForCausalLM.from_config(c), parallelize_policy, pol, mesh, pc_bf16, out)
            compare("moe_policy_fsdp2", seeded(lambda: AutoModelForCausalLM.from_config(moe_cfg())),
                    lambda c: AutoModelForCausalLM.from_config(c), parallelize_policy, pol, mesh, pc, out)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from moslim_mega.parallel.dist import exit_process

    main()
    exit_process(0)  # as the CLI does (moslim_mega/parallel/dist.py)
