"""Run by ``torchrun`` from test_pipeline_equivalence.py (not a test module itself).

``pipeline_scenarios.py OUT.json pp2``  (2 processes): SFT, RM and RLOO steps with pp=2 under GPipe
and 1F1B, a critic step, the RM under interleaved 1F1B (2 stages per rank), forward-only passes,
a DCP save/load of the pipeline-sharded model and optimizer, and SFT / RM steps under 1F1B with
``parallel.fp8`` (torchao's CPU emulation), compared with the same fp8 conversion in one process.
``pipeline_scenarios.py OUT.json pp2dp2`` (4 processes): the RM with pp=2 × dp=2 (FSDP2 per stage).
``pipeline_scenarios.py OUT.json pp2tp2`` (4 processes): SFT and the RM with pp=2 × tp=2 (TP per stage,
the vocab-parallel log-prob head on the last stage), also with ``parallel.fp8``.

Each case trains the same model (same seed) on the same micro-batches once through the pipeline
engine and once in this process with plain backward + AdamW; rank 0 writes the largest differences.
"""

import importlib.util
import json
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from moslim_mega.algos.logprob import sequence_logprobs
from moslim_mega.algos.ppo import ppo_policy_loss
from moslim_mega.checkpoint.state import apply_tensor_state, tensor_state
from moslim_mega.config import ParallelConfig
from moslim_mega.engine.base import HeadIn, LogprobOut
from moslim_mega.engine.pipeline import PipelineEngine, _unstride
from moslim_mega.parallel.fp8 import apply_fp8
from moslim_mega.kernels.multihead_head import fused_multihead_head
from moslim_mega.parallel.mesh import build_mesh
from moslim_mega.utils.optim import Updater

from moslim_mega.parallel.pipeline import layer_ranges
from tests.parallel.pipeline_models import LAYERS, NUM_CLASSES, build, micro_batches, skeleton

OPTIM = dict(lr=1e-3, weight_decay=0.01, warmup_steps=0, grad_clip=0.05)
TEMP = 0.7


def valid_BT(mask_BT):
    """Tokens that have a log-prob (attended, with an attended predecessor)."""
    v = torch.zeros_like(mask_BT, dtype=torch.bool)
    v[:, 1:] = (mask_BT[:, 1:] != 0) & (mask_BT[:, :-1] != 0)
    return v.float()


# ---- the trainers' loss functions: pure, weighted by their share of the step ('w') ---------------
def sft_loss(out: LogprobOut, mb):
    loss = -(out.logp_BT * valid_BT(mb["mask_BT"])).sum() * mb["w"]
    return loss, {"loss": float(loss)}


def rloo_loss(out: LogprobOut, mb):
    loss, stats = ppo_policy_loss(out.logp_BT, mb["old_logp_BT"], mb["adv_BT"], valid_BT(mb["mask_BT"]), 0.2)
    loss = loss * mb["w"]
    return loss, {"loss": float(loss), "clipfrac": stats["clipfrac"]}


def rm_loss(out: HeadIn, mb):
    total, _ = fused_multihead_head(out.hidden_BD, out.weight_CD, out.bias_C, NUM_CLASSES, mb["labels_BH"],
                                    impl="reference")
    loss = total * mb["w"]
    return loss, {"loss": float(loss)}


def value_loss(values_BT, mb):
    loss = ((values_BT - mb["adv_BT"]) ** 2 * valid_BT(mb["mask_BT"])).sum() * mb["w"]
    return loss, {"loss": float(loss)}


LOSSES = {"sft": ("causal_lm", sft_loss), "rloo": ("causal_lm", rloo_loss), "rm": ("reward", rm_loss),
          "value": ("value", value_loss)}


def weigh(mbs, kind, dp: int = 1, dp_rank: int = 0):
    """Micro-batches with their share ``w`` of the step; under dp, this rank's rows with the share
    × dp that FSDP's gradient average undoes (as Stage.dp_loss_scale)."""
    def count(mb):
        return mb["ids_BT"].shape[0] if kind == "rm" else int(valid_BT(mb["mask_BT"]).sum())

    total = sum(count(mb) for mb in mbs)
    out = []
    for mb in mbs:
        local = {k: v[dp_rank::dp] for k, v in mb.items()}
        # sft / value sum over tokens: 1 / all tokens; rloo / rm are means over the micro-batch's own
        # tokens / rows: their count / all.
        w = dp / total if kind in ("sft", "value") else dp * count(local) / total
        out.append({**local, "w": torch.tensor(w)})
    return out


def reference_head(model, role, mb):
    if role == "causal_lm":
        return LogprobOut(*sequence_logprobs(model, mb["ids_BT"], mb["mask_BT"], temperature=TEMP, impl="reference"))
    if role == "reward":
        return model(mb["ids_BT"], mb["mask_BT"], head=lambda h, w, b: HeadIn(h, w, b))
    return model(mb["ids_BT"], mb["mask_BT"])


def padded_head(model, role, mb, shape_BT):
    """``reference_head`` on ``mb`` padded to ``shape_BT`` as the engine pads a step's micro-batches
    (``_stack_padded``: id 0, mask 0, an extra row attends its first token), cut back to its own rows
    and tokens as ``_head_output`` does. Under tensorwise fp8 the activations' scale is the amax of
    the whole micro-batch tensor, padding included, so the single-process reference has to see the
    same tensors as the stages; everything else (right padding, causal attention) leaves the real
    tokens as they are."""
    (B, T), (b, t) = shape_BT, mb["ids_BT"].shape
    ids_BT = torch.zeros(B, T, dtype=mb["ids_BT"].dtype)
    mask_BT = torch.zeros(B, T, dtype=mb["mask_BT"].dtype)
    ids_BT[:b, :t], mask_BT[:b, :t], mask_BT[b:, 0] = mb["ids_BT"], mb["mask_BT"], 1
    out = reference_head(model, role, {"ids_BT": ids_BT, "mask_BT": mask_BT})
    if role == "causal_lm":
        return LogprobOut(out.logp_BT[:b, :t], out.entropy_BT[:b, :t])
    if role == "reward":
        return HeadIn(out.hidden_BD[:b], out.weight_CD, out.bias_C)
    return out[:b, :t]


def strided_head(model, role, mb, n):
    """``reference_head`` as ``PipelineEngine.forward`` computes it: the rows cut into ``n`` strided
    chunks, each its own tensor (for tensorwise fp8's per-tensor activation scale), then re-interleaved."""
    parts = [reference_head(model, role, {k: mb[k][i::n] for k in ("ids_BT", "mask_BT")}) for i in range(n)]
    return _unstride(parts, n, mb["ids_BT"].shape[0], role)


def reference_steps(kind, mbs, steps, pc=None):
    """``pc`` with ``fp8``: the whole model converted as the single-process path does, and each
    micro-batch run at the engine's padded shape (see padded_head)."""
    role, loss_fn = LOSSES[kind]
    model = build(role)
    fp8 = pc is not None and pc.fp8 != "none"
    model.fp8_names = apply_fp8(model, pc) if fp8 else []
    shape_BT = tuple(max(mb["ids_BT"].shape[d] for mb in mbs) for d in (0, 1))
    upd = Updater(model.parameters(), **OPTIM)
    losses, norms = [], []
    for step in range(steps):
        upd.zero_grad()
        total = 0.0
        for mb in weigh(mbs, kind):
            out = padded_head(model, role, mb, shape_BT) if fp8 else reference_head(model, role, mb)
            loss, _ = loss_fn(out, mb)
            loss.backward()
            total += float(loss)
        norms.append(upd.step(step))
        losses.append(total)
    return model, losses, norms


def head_diff(a, b):
    if isinstance(a, torch.Tensor):
        return float((a - b).abs().max())
    return max(float((x - y).abs().max()) for x, y in zip(vars(a).values(), vars(b).values()))


def run_case(kind, pc, mesh, steps=2, dp=1, dp_rank=0, checkpoint=False, rank0=False):
    """``rank0``: the engine is built as a large model would be — rank 0 alone builds the weights,
    the other ranks cut their stages from a meta-device skeleton and receive theirs."""
    role, loss_fn = LOSSES[kind]
    mbs = micro_batches(4 if pc.pp_schedule == "interleaved_1f1b" else 3, B=2 * dp)
    kw = dict(optim=OPTIM, temperature=TEMP, kernels_impl="reference")
    if rank0:
        engine = PipelineEngine.from_rank0(lambda: build(role), skeleton(role), role, mesh, pc, **kw)
    else:
        engine = PipelineEngine(build(role), role, mesh, pc, **kw)
    losses, norms = [], []
    for step in range(steps):
        row = engine.train_step(weigh(mbs, kind, dp, dp_rank), loss_fn, step)
        losses.append(row["loss"] * len(mbs))  # the mean of the micro-batch rows × m = the step's loss
        norms.append(row["grad_norm"])
    if dp > 1:  # the loss rows are this dp shard's, scaled by dp (see weigh): the step's loss is their mean
        t = torch.tensor(losses, dtype=torch.float64)
        dist.all_reduce(t, group=mesh["dp"].get_group())
        losses = (t / dp).tolist()
    ref, ref_losses, ref_norms = reference_steps(kind, mbs, steps, pc)
    ref_params = dict(ref.named_parameters())
    exported = dict(engine.export_weights())
    assert exported.keys() == ref_params.keys(), sorted(set(exported) ^ set(ref_params))
    init = dict(build(role).named_parameters())
    r = {
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
        "loss": ref_losses[0],
        "grad_norm_diff": max(abs(a - b) for a, b in zip(norms, ref_norms)),
        "grad_norm": ref_norms[0],
        "param_diff": max(float((exported[n] - p).abs().max()) for n, p in ref_params.items()),
        "param_change": max(float((init[n] - p).abs().max()) for n, p in ref_params.items()),
        "forward_diff": head_diff(engine.forward(mbs[0]),
                                  strided_head(ref, role, mbs[0], min(len(mbs[0]["ids_BT"]), pc.pp))
                                  if pc.fp8 != "none" else reference_head(ref, role, mbs[0])),
    }
    r["num_dtensor_params"] = sum(type(p).__name__ == "DTensor" for s in engine.stages for p in s.parameters())
    if pc.fp8 != "none":  # which linears each stage converted (gathered from every rank) vs one process
        mine = {s.stage: [n for n, m in s.named_modules() if type(m).__name__ == "Float8Linear"]
                for s in engine.stages}
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        r["fp8_stage_names"] = {str(k): v for d in every for k, v in d.items()}
        r["fp8_stage_layers"] = {str(s): list(ids) for s, ids in enumerate(layer_ranges(LAYERS, pc.pp))}
        r["fp8_ref_names"] = ref.fp8_names
    if checkpoint:
        r["ckpt_diff"] = checkpoint_round_trip(engine, mbs, kind)
    return r


def checkpoint_round_trip(engine, mbs, kind):
    """DCP save of the pipeline-sharded model + optimizer, one more step, load: the weights and the
    next step are back where they were (the optimizer state came back too)."""
    models, optims = engine.checkpoint_items()
    path = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    dcp.save(tensor_state(models, optims), checkpoint_id=path[0])
    _, loss_fn = LOSSES[kind]
    engine.train_step(weigh(mbs, kind), loss_fn, 10)
    after = {n: t.clone() for n, t in engine.export_weights()}
    sd = tensor_state(models, optims)
    dcp.load(sd, checkpoint_id=path[0])
    apply_tensor_state(sd, models, optims)
    engine.train_step(weigh(mbs, kind), loss_fn, 10)
    again = dict(engine.export_weights())
    return max(float((after[n] - again[n]).abs().max()) for n in after)


def fp8_cases(results):
    """parallel.fp8 inside the stages: both recipes for the RM, rowwise for SFT. Two are built from
    rank 0's weights, so the float8 conversion also runs on meta-device stages before they are filled."""
    for kind, recipe, rank0 in (("sft", "rowwise", True), ("rm", "rowwise", False), ("rm", "tensorwise", True)):
        pc = ParallelConfig(pp=2, pp_schedule="1f1b", fp8=recipe)
        results[f"{kind}_1f1b_fp8_{recipe}"] = run_case(kind, pc, build_mesh(pc), rank0=rank0)


def main():
    out, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {}
    if mode == "pp2":
        for sched in ("gpipe", "1f1b"):
            pc = ParallelConfig(pp=2, pp_schedule=sched)
            mesh = build_mesh(pc)
            for kind in ("sft", "rm", "rloo"):
                results[f"{kind}_{sched}"] = run_case(kind, pc, mesh, checkpoint=(kind == "rm" and sched == "1f1b"),
                                                      rank0=(sched == "1f1b"))
        pc = ParallelConfig(pp=2, pp_schedule="1f1b")
        results["value_1f1b"] = run_case("value", pc, build_mesh(pc), rank0=True)
        pc = ParallelConfig(pp=2, pp_schedule="interleaved_1f1b", pp_stages_per_rank=2)
        results["rm_interleaved_1f1b"] = run_case("rm", pc, build_mesh(pc), checkpoint=True, rank0=True)
        if importlib.util.find_spec("torchao") is not None:  # the fp8 extra; its tests skip without it
            fp8_cases(results)
    elif mode == "pp2tp2":
        pc = ParallelConfig(pp=2, tp=2, pp_schedule="1f1b")
        mesh = build_mesh(pc)
        results["sft_pp2_tp2"] = run_case("sft", pc, mesh, rank0=True)
        results["rm_pp2_tp2"] = run_case("rm", pc, mesh)
        if importlib.util.find_spec("torchao") is not None:
            # float8 linears under the stages' TP plan (DTensor weights; the policy's last stage runs the
            # vocab-parallel log-prob head, which stays high precision).
            for kind, recipe in (("sft", "rowwise"), ("rm", "tensorwise")):
                pc = ParallelConfig(pp=2, tp=2, pp_schedule="1f1b", fp8=recipe)
                results[f"{kind}_pp2_tp2_fp8_{recipe}"] = run_case(kind, pc, build_mesh(pc), rank0=(kind == "sft"))
    else:
        pc = ParallelConfig(pp=2, dp=2, pp_schedule="1f1b")
        mesh = build_mesh(pc)
        dp_rank = mesh["dp"].get_local_rank()
        results["rm_pp2_dp2"] = run_case("rm", pc, mesh, dp=2, dp_rank=dp_rank, rank0=True)
    if dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(results, fh, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
