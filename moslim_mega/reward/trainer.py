"""Train the multi-head classification reward model (``moslim rm train``).

The loop: AdamW with linear warm-up and linear decay, gradient clipping, per-head class
probability statistics recorded while training (reset each epoch so they follow the current
weights), periodic held-out evaluation, metrics to JSONL/TensorBoard, and at the end an optional
calibration pass that recomputes the Eq. 11 statistics with the final weights.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import Config, ConfigError, save_config
from ..models.build import build_backbone, build_tokenizer
from ..prefs import PreferenceSpec, spec_from_config
from ..algos.core import NonFiniteError
from ..engine import build_engine, micro_batch_count, split_rows
from ..engine.base import HeadIn
from ..training.loop import TrainLoop, loop_config
from ..checkpoint.hooks import StageCheckpoints
from ..checkpoint.state import write_reward_assets
from ..utils.logging import MetricsWriter
from ..utils.optim import Updater
from ..utils.seed import seed_everything
from ..parallel.parallelize import parallelize_rm
from ..parallel.stage import Stage
from ..profile import Profiler, model_flops
from .data import RMExamples, load_rm_examples
from .io import save_reward_model
from ..kernels.multihead_head import fused_multihead_head
from .losses import balanced_class_weights, paper_eq10_loss
from .mapping import RewardMapper, RunningClassStats
from .metrics import rm_report
from .model import MultiHeadRewardModel


# Training hit a non-finite value; the message names the step and the quantity. One class for
# every stage (RM, SFT, policy), kept under this name for the RM/SFT callers.
TrainingError = NonFiniteError


@torch.no_grad()
def predict_probs(model: MultiHeadRewardModel, examples: RMExamples, pad_id: int, batch_size: int = 128):
    """Per-head probabilities ``[N, K_i]`` over a whole data set (eval mode)."""
    was_training = model.training
    model.eval()
    chunks = []
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        ids_BT, mask_BT, _ = examples.batch(list(range(start, min(start + batch_size, len(examples)))), pad_id)
        chunks.append([torch.softmax(x.float(), -1).cpu() for x in model(ids_BT.to(device), mask_BT.to(device))])
    model.train(was_training)
    return [torch.cat([c[i] for c in chunks]) for i in range(len(model.num_classes))]


def single_target_rewards(mapper: RewardMapper, probs: list[torch.Tensor]) -> list[torch.Tensor]:
    """rewards[i][n, t] = mapped reward of example n when only head i is named, with target t."""
    N = probs[0].shape[0]
    out = []
    for i, k in enumerate(mapper.stats.num_classes):
        cols = []
        for t in range(k):
            targets_BH = torch.full((N, len(probs)), -1, dtype=torch.long)
            targets_BH[:, i] = t
            cols.append(mapper(probs, targets_BH))
        out.append(torch.stack(cols, dim=1))
    return out


def evaluate(model, examples: RMExamples, spec: PreferenceSpec, pad_id: int, mapper: RewardMapper | None = None):
    probs = predict_probs(model, examples, pad_id)
    rewards = single_target_rewards(mapper, probs) if mapper is not None else None
    return rm_report(probs, examples.labels_NH, examples.groups, list(spec.names), rewards)


def _data_paths(cfg: Config, out: Path, spec: PreferenceSpec) -> tuple[Path, Path]:
    if cfg.run.data_dir:
        d = Path(cfg.run.data_dir)
        return d / "rm_train.jsonl", d / "rm_eval.jsonl"
    from ..world.build import build_world

    paths = build_world(cfg.world, spec, out / "data")
    return paths["rm_train"], paths["rm_eval"]


def train_reward_model(cfg: Config, out_dir: str | Path, show_progress: bool = True) -> dict:
    """Train, evaluate, calibrate and save an RM into ``out_dir``; returns the final eval report."""
    out = Path(out_dir)
    stage = Stage(cfg.parallel, cfg.run.device)  # inert in one process; the mesh and dp shard under torchrun
    prof = Profiler(cfg.profile, "rm", stage, out)
    out.mkdir(parents=True, exist_ok=True)
    if stage.is_main:
        save_config(cfg, out)
    seed_everything(cfg.run.seed, cfg.run.num_threads)
    rc = cfg.rm
    spec = spec_from_config(cfg.prefs)
    train_path, eval_path = stage.broadcast(_data_paths(cfg, out, spec) if stage.is_main else None)
    tokenizer = build_tokenizer(cfg.rm.model, spec.names)
    pad_id = tokenizer.pad_token_id
    train = load_rm_examples(train_path, spec, tokenizer, rc.max_length)
    held = load_rm_examples(eval_path, spec, tokenizer, rc.max_length)
    model = stage.build(
        lambda: MultiHeadRewardModel(build_backbone(cfg.rm.model, tokenizer, cfg.run.seed), spec.num_classes),
        lambda config: _rm_skeleton(config, spec.num_classes), parallelize_rm,
    )
    model.train()

    weights = balanced_class_weights(train.labels_NH, spec.num_classes) if rc.class_weights == "balanced" else None
    steps_per_epoch = math.ceil(len(train) / rc.batch_size)
    total_steps = max(1, math.ceil(rc.epochs * steps_per_epoch))
    optim = dict(lr=rc.lr, weight_decay=rc.weight_decay, warmup_steps=rc.warmup_steps, grad_clip=rc.grad_clip,
                 total_steps=total_steps)
    engine = build_engine(cfg.parallel, lambda: model, lambda m: Updater(m.parameters(), **optim), "reward", "rm",
                          stage=stage, optim=optim, label="rm", init_dir=out / "megatron_init")
    n_micro = micro_batch_count(cfg.parallel)
    # Evaluation and calibration: the whole model in one process, the engine's forward under pp or
    # the megatron backend (no rank holds the whole model).
    scorer = PipelineScorer(engine, model.num_classes) if stage.skeleton else model
    stats = RunningClassStats(spec.num_classes, mode=rc.stats_mode, momentum=rc.stats_momentum)
    mapper = RewardMapper.from_config(stats, cfg.mapping)
    writer = stage.writer(lambda: MetricsWriter(out, tensorboard=cfg.run.tensorboard))
    gen = torch.Generator().manual_seed(cfg.run.seed)
    order: list[int] = []
    ckpt = StageCheckpoints(cfg.checkpoint, out, *engine.checkpoint_items(), writer,
                            lambda d: write_reward_assets(d, "rm", model, tokenizer, spec, stats, rc.max_length))
    loop = TrainLoop(loop_config("rm train", total_steps, rc, "rm", show_progress), stage, writer, ckpt, prof)
    flops = model_flops(model)

    def load_state(state: dict) -> None:
        nonlocal order
        order = state["order"]
        gen.set_state(state["gen"])
        engine.load_scheduler_state(state["sched"])
        stats.load_state_dict(state["stats"])

    def body(step: int) -> dict:
        nonlocal order
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train), generator=gen).tolist()
            if rc.stats_mode == "welford":
                stats.reset()  # statistics of the current epoch's weights only
        i0 = (step % steps_per_epoch) * rc.batch_size
        ids_BT, mask_BT, labels_BH = train.batch(stage.shard(order[i0 : i0 + rc.batch_size]), pad_id)
        prof.add_tokens(mask_BT.sum())
        prof.add_flops(mask_BT, flops, train=True, label="train")
        ids_BT, mask_BT = ids_BT.to(stage.device), mask_BT.to(stage.device)  # labels_BH stays on the CPU
        prof.mark("data")
        # Each head's loss is a mean over this rank's labelled rows; rescale so FSDP's gradient
        # average over dp equals the single-process mean over the global batch.
        denoms_H = _head_denominators(labels_BH, weights, rc.loss)
        scale_H = stage.dp_loss_scale(denoms_H) if stage.distributed else None
        kept: dict = {}  # the step's loss tensors, for the statistics and the metrics row
        micro = {"ids_BT": ids_BT, "mask_BT": mask_BT, "labels_BH": labels_BH.to(ids_BT.device)}
        if n_micro > len(labels_BH):
            raise ConfigError(f"rm.batch_size={rc.batch_size}: {len(labels_BH)} rows on this dp rank, fewer than the "
                              f"{n_micro} pipeline micro-batches (parallel.pp_microbatches / parallel.pp)")
        loss_fn = partial(_rm_micro_loss, num_classes=model.num_classes, weights=weights, loss_kind=rc.loss,
                          impl=cfg.kernels.impl, scale_H=scale_H, kept=kept,
                          shard_denoms_H=denoms_H if n_micro > 1 else None)
        res = engine.train_step(split_rows(micro, n_micro), loss_fn, step)
        if stage.pp > 1:
            kept = stage.from_last_stage(_detached(kept))  # only the last stage ran the loss
        with torch.no_grad():
            stats.update([stage.gather_dp(p_BK) for p_BK in kept["probs"]])
        row = {}
        if step % loop.lc.log_every == 0:
            row = {"loss": stage.sum_dp(kept["loss"].item()) / stage.dp, "grad_norm": res["grad_norm"], "lr": res["lr"]}
            row.update({f"loss_{n}": stage.sum_dp(v.item()) / stage.dp for n, v in zip(spec.names, kept["per_head"])})
        prof.mark("forward_backward_step")
        return row

    def evaluate_now(step: int) -> None:
        if rc.eval_every and step > 0 and step % rc.eval_every == 0:
            writer.write(step, evaluate(scorer, held, spec, pad_id)["mean"], tag="eval")
            prof.mark("eval")

    first = loop.resume(load_state)
    result = loop.run(first, body, lambda: {"order": order, "gen": gen.get_state(), "sched": engine.scheduler_state(),
                                            "stats": stats.state_dict()},
                      after=evaluate_now, postfix=lambda row: {"loss": f"{row['loss']:.3f}"})
    step = result["steps"] - 1
    if rc.calibrate:
        # Eq. 11's avg/std must describe the *final* RM: in-training statistics mix older weights.
        stats.reset()
        stats.update(predict_probs(scorer, train, pad_id))
    report = evaluate(scorer, held, spec, pad_id, mapper)
    report.update(result)
    if eval_path.with_name("rm_eval_ood.jsonl").is_file():  # the world's out-of-distribution slice
        ood = load_rm_examples(eval_path.with_name("rm_eval_ood.jsonl"), spec, tokenizer, rc.max_length)
        report["slices"] = {"ood": evaluate(scorer, ood, spec, pad_id, mapper)}
    writer.write(step + 1, {"mean": report["mean"], "heads": {n: _scalars(h) for n, h in report["heads"].items()}}, tag="final")
    writer.close()
    prof.mark("eval")  # calibration + final evaluation
    full = stage.full_model(model, lambda config: _rm_skeleton(config, spec.num_classes))
    if stage.is_main:
        save_reward_model(full, tokenizer, spec, stats, out, max_length=rc.max_length)
        (out / "eval.json").write_text(json.dumps(report, indent=2))
    stage.barrier()
    prof.mark("checkpoint")
    prof.write(out / "profile.json")
    return report


def _head_loss(model, ids_BT, mask_BT, labels_BH, weights, loss_kind: str, impl: str):
    """(total loss, per-head losses, per-head probabilities) of one batch through ``model``."""
    labels_BH = labels_BH.to(ids_BT.device)
    return model(ids_BT, mask_BT, head=lambda h, w, b: rm_head_loss(HeadIn(h, w, b), labels_BH, model.num_classes,
                                                                     weights, loss_kind, impl))


def rm_head_loss(out: HeadIn, labels_BH, num_classes, weights, loss_kind: str, impl: str):
    """(total loss, per-head losses, per-head probabilities) from the pooled hidden states and the
    stacked heads. Eq. 6-9 runs the fused head (linear → per-head log-softmax → masked CE in one
    kernel on CUDA, the eager reference elsewhere, issue 7); the Eq. 10 ablation stays eager."""
    if loss_kind == "paper_eq10":
        # The same linear as MultiHeadRewardModel's plain heads (nn.Linear is F.linear).
        logits = list(torch.split(F.linear(out.hidden_BD, out.weight_CD, out.bias_C), num_classes, dim=-1))
        loss, per_head = paper_eq10_loss(logits, labels_BH)
        return loss, per_head, [torch.softmax(x.detach().float(), -1) for x in logits]
    loss, per_head_H, probs_BC = fused_multihead_head(out.hidden_BD, out.weight_CD, out.bias_C, num_classes, labels_BH,
                                                      weights, impl=impl, return_probs=True)
    return loss, list(per_head_H.unbind(0)), [p.contiguous() for p in torch.split(probs_BC, num_classes, dim=1)]


def _rm_micro_loss(out: HeadIn, micro: dict, num_classes, weights, loss_kind: str, impl: str, scale_H, kept: dict,
                   shard_denoms_H: torch.Tensor | None = None):
    """The engine's loss function; ``kept`` receives the loss tensors (probabilities for the
    class statistics, per-head losses for the metrics) without a device sync per step.

    With several micro-batches (``shard_denoms_H``: the dp shard's per-head denominators) each
    head's mean is weighted by the micro-batch's share of its denominator, so the micro losses add
    up to the shard's; ``kept`` then sums the losses and per-head terms and concatenates the
    probabilities in row order (= the shard's)."""
    loss, per_head, probs = rm_head_loss(out, micro["labels_BH"], num_classes, weights, loss_kind, impl)
    if shard_denoms_H is not None:
        share_H = _head_denominators(micro["labels_BH"].cpu(), weights, loss_kind) / shard_denoms_H.clamp(min=1e-30)
        per_head = [f * h for f, h in zip(share_H.tolist(), per_head)]  # an empty head's loss is 0 already
        loss = sum(per_head)
    if scale_H is not None:
        loss = sum(s * h for s, h in zip(scale_H, per_head))
    if shard_denoms_H is not None and kept:
        kept.update(loss=kept["loss"] + loss.detach(), per_head=[a + b for a, b in zip(kept["per_head"], per_head)],
                    probs=[torch.cat([a, b]) for a, b in zip(kept["probs"], probs)])
    else:
        kept.update(loss=loss.detach(), per_head=per_head, probs=probs)
    return loss, {}


def _detached(kept: dict) -> dict:
    return {"loss": kept["loss"], "per_head": [h.detach() for h in kept["per_head"]], "probs": kept["probs"]} if kept else {}


class PipelineScorer:
    """What ``predict_probs`` / ``evaluate`` use of a MultiHeadRewardModel, through a pipeline
    engine's forward (every pp rank gets the last stage's head input): per-head logits from the
    stacked heads' linear, as the model's own forward computes them. No rank holds the whole model."""

    training = False  # the engine's forward runs its stages in eval mode itself

    def __init__(self, engine, num_classes):
        self.engine, self.num_classes = engine, list(num_classes)

    def eval(self) -> "PipelineScorer":
        return self

    def train(self, mode: bool = True) -> "PipelineScorer":
        return self

    def parameters(self):
        yield torch.empty(0, device=self.engine.device)  # where the batches go

    def __call__(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> list[torch.Tensor]:
        out: HeadIn = self.engine.forward({"ids_BT": ids_BT, "mask_BT": mask_BT})
        return list(torch.split(F.linear(out.hidden_BD, out.weight_CD, out.bias_C), self.num_classes, dim=-1))


def _rm_skeleton(config, num_classes):
    from transformers import AutoModel

    return MultiHeadRewardModel(AutoModel.from_config(config), num_classes)


def _head_denominators(labels_BH: torch.Tensor, weights, loss_kind: str) -> torch.Tensor:
    """What each head's loss is a mean over on this rank: labelled rows (weighted by the class
    weight when balanced, as F.cross_entropy's weighted mean), or all rows for Eq. 10."""
    if loss_kind == "paper_eq10":
        return torch.full((labels_BH.shape[1],), float(labels_BH.shape[0]))
    cols = []
    for i in range(labels_BH.shape[1]):
        lab = labels_BH[:, i][labels_BH[:, i] >= 0]
        cols.append(weights[i][lab].sum() if weights is not None else torch.tensor(float(lab.numel())))
    return torch.stack(cols).float()


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}
