"""The MOSLIM policy-optimisation loop (paper §2.3, Eq. 11-12, Appendix A).

One iteration, as in the paper's pipeline:
  prompts with preference prefixes → policy rollouts → prefixes stripped for the RM ("prompt
  alignment") → RM head probabilities → reward mapping (Eq. 11) → reference log-probs (and
  values for PPO) → advantages → mini-batch updates → metrics → periodic evaluation.

Legend: B rows (= P prompts × K samples), T tokens.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..algos import core, dpo, kl, ppo, rloo
from ..algos.rollout_correction import tis_weights_BT
from ..checkpoint.hooks import StageCheckpoints
from ..checkpoint.state import write_model_assets
from ..config import Config, ConfigError, PolicyConfig, SamplingConfig, save_config
from ..models.value import ValueModel
from ..prefs import PrefixError, parse_prefix
from ..reward.data import RecordError, read_jsonl
from ..reward.io import load_reward_model
from ..reward.mapping import RewardMapper
from ..rollout import build_rollout_engine, generate_texts, guard
from ..models.build import load_policy
from ..utils.logging import MetricsWriter
from ..utils.seed import seed_everything
from ..parallel.fp8 import apply_fp8_models
from ..parallel.policy import (build_policy_models, causal_lm_skeleton, check_policy_layout, mean_metrics,
                               megatron_policy_models, rollout_module, share_within_model_group)
from ..parallel.stage import Stage
from ..profile import Profiler, model_flops
from ..engine import build_engine
from ..engine.base import LogprobOut, MicroBatch, TrainEngine, mean_log_rows
from ..training.loop import LoopConfig, TrainLoop
from .workers import LogprobWorker, RewardOutput, RewardWorker, Updater, load_pipeline_reward_model


@dataclass
class Experience:
    """A rollout batch with everything the updates need (all detached)."""

    ids_BT: torch.Tensor
    attn_BT: torch.Tensor
    mask_BT: torch.Tensor  # response tokens
    old_logp_BT: torch.Tensor
    ref_logp_BT: torch.Tensor
    adv_BT: torch.Tensor | None = None  # PPO / RLOO
    returns_BT: torch.Tensor | None = None  # PPO
    old_values_BT: torch.Tensor | None = None  # PPO
    chosen_P: torch.Tensor | None = None  # Online-DPO: row index of the preferred sample per pair
    rejected_P: torch.Tensor | None = None
    is_weight_BT: torch.Tensor | None = None  # policy.rollout_correction's truncated importance weights

    _PER_ROW = ("ids_BT", "attn_BT", "mask_BT", "old_logp_BT", "ref_logp_BT", "adv_BT", "returns_BT", "old_values_BT",
                "is_weight_BT")

    def rows(self, idx: torch.Tensor) -> "Experience":
        """The per-row tensors of the selected rows (pair indices are not carried over)."""
        return Experience(**{f: None if getattr(self, f) is None else getattr(self, f)[idx] for f in self._PER_ROW})


def load_policy_prompts(path, spec) -> list[str]:
    """Prompts (with prefixes) from a jsonl file; each prefix must parse with the RM's spec."""
    prompts = []
    for where, rec in read_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise RecordError(f"{where}: missing string field 'prompt'")
        try:
            parse_prefix(rec["prompt"], spec)
        except PrefixError as e:
            raise RecordError(f"{where}: field 'prompt': {e}") from None
        prompts.append(rec["prompt"])
    if not prompts:
        raise RecordError(f"{path}: no prompts")
    return prompts


# ---- losses on one micro-batch -------------------------------------------------------------
def actor_loss(pc: PolicyConfig, logp_BT, entropy_BT, exp: Experience, kl_coef: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (PPO and RLOO) + optional KL loss term − entropy bonus; token mean."""
    loss, stats = ppo.ppo_policy_loss(logp_BT, exp.old_logp_BT, exp.adv_BT, exp.mask_BT, pc.clip_range,
                                      exp.is_weight_BT)
    if not pc.kl_in_reward:
        kl_BT = kl.kl_penalty(logp_BT, exp.ref_logp_BT, pc.kl_estimator)
        loss = loss + kl_coef * core.masked_mean(kl_BT, exp.mask_BT)
    if pc.entropy_coef:
        loss = loss - pc.entropy_coef * ppo.entropy_bonus(entropy_BT, exp.mask_BT)
    return loss, stats


def update_actor(engine: TrainEngine, exp: Experience, pc: PolicyConfig, kl_coef: float, gen: torch.Generator,
                 step: int = 0) -> dict:
    """Clipped-surrogate updates of the policy (PPO, RLOO) or the DPO loss (Online-DPO), through the
    actor's ``causal_lm`` engine (its temperature is the sampler's)."""
    if exp.chosen_P is not None:
        return _update_dpo(engine, exp, pc, gen, step)
    check = _loss_check(engine, step)

    def mini_loss(mini):
        share_denom = exp.mask_BT[mini].sum().clamp(min=1)

        def loss_fn(out: LogprobOut, micro: MicroBatch):
            part = _experience(micro)
            loss, stats = actor_loss(pc, out.logp_BT, out.entropy_BT, part, kl_coef)
            check(loss, "pg_loss")
            stats.update(pg_loss=float(loss.detach()),
                         entropy=float(core.masked_mean(out.entropy_BT.detach(), part.mask_BT)))
            return loss * _token_share(part, share_denom), stats

        return loss_fn

    micro = pc.micro_batch_size or pc.mini_batch_size
    return _accumulate(exp.ids_BT.shape[0], pc.mini_batch_size, micro, pc, gen, engine, step, "policy",
                       lambda rows: _micro_batch(exp.rows(rows)), mini_loss)


def _update_dpo(engine: TrainEngine, exp: Experience, pc: PolicyConfig, gen, step: int) -> dict:
    """Mini- and micro-batches count pairs (two rows each: the chosen rows, then the rejected
    ones); each micro-batch's mean pair loss is weighted by its share of the mini-batch's pairs."""
    seq_ref_B = core.masked_sum(exp.ref_logp_BT, exp.mask_BT, dim=1)
    check = _loss_check(engine, step)

    def micro_batch(pairs):
        rows = torch.cat([exp.chosen_P[pairs], exp.rejected_P[pairs]])
        return {**_micro_batch(exp.rows(rows)), "seq_ref_B": seq_ref_B[rows]}

    def mini_loss(mini):
        def loss_fn(out: LogprobOut, micro: MicroBatch):
            seq_B = core.masked_sum(out.logp_BT, micro["response_mask_BT"], dim=1)
            ref_B, n = micro["seq_ref_B"], seq_B.shape[0] // 2
            loss, stats = dpo.dpo_loss(seq_B[:n], seq_B[n:], ref_B[:n], ref_B[n:], pc.dpo_beta, pc.dpo_loss)
            check(loss, "dpo_loss")
            stats["dpo_loss"] = float(loss.detach())
            return loss * n / len(mini), stats

        return loss_fn

    pairs_per_mini = max(1, pc.mini_batch_size // 2)
    micro = max(1, (pc.micro_batch_size or pc.mini_batch_size) // 2)
    return _accumulate(exp.chosen_P.shape[0], pairs_per_mini, micro, pc, gen, engine, step, "policy", micro_batch,
                       mini_loss)


def update_critic(engine: TrainEngine, exp: Experience, pc: PolicyConfig, gen, step: int = 0) -> dict:
    """Clipped value-loss updates of the PPO critic through its ``value`` engine."""
    check = _loss_check(engine, step)

    def mini_loss(mini):
        share_denom = exp.mask_BT[mini].sum().clamp(min=1)

        def loss_fn(values_BT: torch.Tensor, micro: MicroBatch):
            part = _experience(micro)
            loss, stats = ppo.ppo_value_loss(values_BT, part.old_values_BT, part.returns_BT, part.mask_BT,
                                             pc.value_clip_range)
            check(loss, "value_loss")
            stats["value_loss"] = float(loss.detach())
            return loss * _token_share(part, share_denom), stats

        return loss_fn

    micro = pc.micro_batch_size or pc.mini_batch_size
    return _accumulate(exp.ids_BT.shape[0], pc.mini_batch_size, micro, pc, gen, engine, step, "critic",
                       lambda rows: _micro_batch(exp.rows(rows)), mini_loss)


def _micro_batch(part: Experience) -> MicroBatch:
    """The engine's micro-batch of some rows: ``ids_BT``/``mask_BT`` are the tokens and attention
    mask the engine runs; the response mask and the rest are the loss function's."""
    micro = {"ids_BT": part.ids_BT, "mask_BT": part.attn_BT, "response_mask_BT": part.mask_BT}
    for f in Experience._PER_ROW[3:]:
        if getattr(part, f) is not None:
            micro[f] = getattr(part, f)
    return micro


def _experience(micro: MicroBatch) -> Experience:
    """Back from :func:`_micro_batch` (the per-row fields only)."""
    return Experience(micro["ids_BT"], micro["mask_BT"], micro["response_mask_BT"],
                      **{f: micro.get(f) for f in Experience._PER_ROW[3:]})


def _loss_check(engine: TrainEngine, step: int):
    """``check(loss, name)`` inside a loss function: the finite check where every rank runs the
    losses; a no-op under the pipeline engine, whose last stage alone runs them — raising there would
    leave the other stages waiting in the schedule. ``_accumulate`` checks the returned rows instead,
    on every rank (and the gradient-norm check is collective)."""
    if engine.losses_on_every_rank:
        return lambda loss, name: core.check_finite(loss, name, step)
    return lambda loss, name: None


def _token_share(part: Experience, mini_tokens: torch.Tensor):
    """A micro-batch's token-mean loss × this = its exact share of the mini-batch's token mean,
    so accumulating 8 micro-batches of 1 equals one batch of 8 (a tested invariant)."""
    return part.mask_BT.sum() / mini_tokens


def _accumulate(units: int, mini_size: int, micro_size: int, pc: PolicyConfig, gen, engine: TrainEngine, step: int,
                who: str, micro_batch, mini_loss) -> dict:
    """update_epochs × shuffled mini-batches (one ``engine.train_step`` each) × micro-batches
    (gradient accumulation in the engine) over ``units`` rows or pairs. ``micro_batch(units)`` is
    the engine's micro-batch of some units; ``mini_loss(mini)`` the loss function of a mini-batch,
    returning each micro-batch's loss already weighted by its share of the mini-batch.

    The metrics are the mean over every micro-batch's log row of the whole update (all epochs and
    mini-batches), and ``{who}_grad_norm`` the mean over its optimizer steps.

    Under the pipeline engine the loss functions run on the last stage only, so this rank may log
    nothing: the rows are then the per-step means ``train_step`` returns (broadcast from the last
    stage to every pp rank), one per micro-batch of the step, which gives the same per-key mean
    over all micro-batches (every row of one update has the same keys)."""
    logs: list[dict] = []
    local = engine.losses_on_every_rank

    def logged(loss_fn):
        def wrapped(out, micro):
            loss, row = loss_fn(out, micro)
            logs.append(row)
            return loss, row

        return wrapped

    for _ in range(pc.update_epochs):
        order = torch.randperm(units, generator=gen)
        for m0 in range(0, units, mini_size):
            mini = order[m0 : m0 + mini_size]
            micros = [micro_batch(mini[u0 : u0 + micro_size]) for u0 in range(0, len(mini), micro_size)]
            res = engine.train_step(micros, logged(mini_loss(mini)) if local else mini_loss(mini), step)
            if not local:
                row = {k: v for k, v in res.items() if k not in ("grad_norm", "lr")}
                for k, v in row.items():
                    if k.endswith("_loss") and not math.isfinite(v):  # the check the loss functions skipped
                        raise core.NonFiniteError(f"step {step}: {k} is not finite")
                logs.extend(dict(row) for _ in micros)
            logs[-1][f"{who}_grad_norm"] = res["grad_norm"]
    return mean_log_rows(logs)


# ---- advantages ------------------------------------------------------------------------------
def compute_advantages(pc: PolicyConfig, exp: Experience, reward_B, kl_coef: float, K: int, critic=None, step: int = 0) -> dict:
    """Fill the Experience with the algorithm's advantages (PPO: GAE; RLOO: leave-one-out;
    Online-DPO: best/worst pairs by mapped reward). Returns metrics."""
    kl_BT = kl.kl_penalty(exp.old_logp_BT, exp.ref_logp_BT, pc.kl_estimator) * exp.mask_BT
    beta = kl_coef if pc.kl_in_reward else 0.0
    metrics = {"kl": float(core.masked_sum(kl_BT, exp.mask_BT, dim=1).mean())}
    if pc.algo == "ppo":
        with torch.no_grad():
            exp.old_values_BT = critic(exp.ids_BT, exp.attn_BT)
        rewards_BT = ppo.token_level_rewards(reward_B, kl_BT, exp.mask_BT, beta)
        adv_BT, exp.returns_BT = ppo.gae_advantages(rewards_BT, exp.old_values_BT, exp.mask_BT, pc.gamma, pc.lam)
        exp.adv_BT = core.masked_whiten(adv_BT, exp.mask_BT) if pc.whiten_advantages else adv_BT
    elif pc.algo == "rloo":
        seq_B = rloo.sequence_kl_rewards(reward_B, kl_BT, exp.mask_BT, beta)
        adv_B = rloo.rloo_advantages(seq_B.view(-1, K)).flatten()
        if pc.whiten_advantages:
            adv_B = (adv_B - adv_B.mean()) / (adv_B.std() + 1e-8)
        exp.adv_BT = adv_B[:, None] * exp.mask_BT
    else:
        chosen_P, rejected_P, valid_P = dpo.select_pairs(reward_B.view(-1, K))
        base_P = torch.arange(chosen_P.shape[0], device=chosen_P.device) * K
        exp.chosen_P, exp.rejected_P = (base_P + chosen_P)[valid_P], (base_P + rejected_P)[valid_P]
        metrics["dpo_pairs"] = int(valid_P.sum())
    if exp.adv_BT is not None:
        core.check_finite(exp.adv_BT, "advantages", step)
    return metrics


# ---- the loop --------------------------------------------------------------------------------
def train_policy(
    cfg: Config,
    out_dir,
    init_dir,
    rm_dir,
    prompts_path,
    eval_fn: Callable[[int, Callable], dict] | None = None,
    show_progress: bool = True,
    rewarder=None,
    monitor: Callable | None = None,
) -> dict:
    """Train a MOSLIM policy from ``init_dir`` (HF checkpoint) against the RM in ``rm_dir``.

    ``rewarder`` replaces the RM + Eq. 11 mapping (``rm_dir`` is then unused): any object with a
    ``spec`` and ``score(prompts, responses) -> RewardOutput``, e.g. a baseline's reward
    (moslim_mega.baselines.morlhf).

    ``monitor(prompts, responses, scored, rewarder) -> metrics`` is called on every step's
    rollouts, e.g. :class:`~moslim_mega.eval.overopt.OracleMonitor` (the world's oracle beside
    the RM: reward over-optimisation measured on the policy's own samples); the summary then
    carries ``overoptimisation`` (:func:`~moslim_mega.eval.overopt.detect_overoptimisation`).

    Under torchrun the actor, critic and reference are sharded by ``parallel.*``. With
    ``parallel.pp > 1`` each is a pipeline engine (engine/pipeline.py) — the actor and critic
    trained, the reference frozen and forward-only — so no rank holds any of them whole; their
    log-probs and values come through the schedule, broadcast from the last stage. The reward model
    is a frozen pipeline engine too (``PipelineRewardModel``: rank 0 alone loads it); under dp / tp
    it is replicated, loaded whole per rank. One thing stays whole per rank under pp: the ``hf``
    rollout engine's plain copy of the actor (parallel/policy.py; vLLM is the route at scale).
    """
    pc, sc = cfg.policy, cfg.sampling
    out = Path(out_dir)
    megatron = cfg.parallel.backend == "megatron"
    if megatron and cfg.parallel.pp > 1:  # refused before any model, RM or rollout engine is built
        raise ConfigError(f"parallel.backend=megatron with parallel.pp={cfg.parallel.pp}: the policy's reference and "
                          "RM are not megatron engines (frozen pipeline models are the torch backend's); use "
                          "parallel.tp / parallel.dp, or parallel.backend=torch")
    stage = Stage(cfg.parallel, cfg.run.device)  # inert in one process; the mesh and dp shard under torchrun
    prof = Profiler(cfg.profile, "policy", stage, out)
    out.mkdir(parents=True, exist_ok=True)
    if stage.is_main:
        save_config(cfg, out)
    seed_everything(cfg.run.seed, cfg.run.num_threads)
    K = pc.samples_per_prompt
    if pc.algo == "rloo" and K < 2:
        raise ValueError(f"policy.samples_per_prompt={K}: RLOO needs at least 2 samples per prompt")
    if pc.algo == "online_dpo" and K < 2:
        raise ValueError(f"policy.samples_per_prompt={K}: Online-DPO needs at least 2 samples per prompt to rank")
    if pc.algo == "online_dpo" and pc.rollout_correction != "none":
        # The DPO loss compares whole-sequence log-ratios of a chosen and a rejected response; it has no
        # importance ratio against the sampling policy to truncate, so TIS does not apply.
        raise ConfigError(f"policy.rollout_correction={pc.rollout_correction}: applies to the policy-gradient "
                          "algorithms (ppo, rloo); Online-DPO's loss has no sampling ratio — set it to none")

    if rewarder is None:
        if stage.pp > 1:  # cut into stages like the policy's models: no rank holds it whole
            rm = load_pipeline_reward_model(stage, rm_dir, cfg.kernels)
        else:  # replicated under dp / tp (on GPUs: the fused RM head on CUDA)
            rm = load_reward_model(rm_dir, device=stage.device)
        rewarder = RewardWorker(rm, RewardMapper.from_config(rm.stats, cfg.mapping), impl=cfg.kernels.impl)
    prompts = load_policy_prompts(prompts_path, rewarder.spec)
    critic = None
    if stage.distributed and megatron:
        check_policy_layout(stage, pc)
        actor, reference, critic, tokenizer = megatron_policy_models(stage, init_dir, pc.algo == "ppo")
    elif stage.distributed:
        check_policy_layout(stage, pc)
        # Under pp: meta skeletons (rank 0 keeps the real weights), cut into stages by the engines below.
        actor, reference, critic, tokenizer = build_policy_models(stage, init_dir, pc.algo == "ppo")
    else:
        actor, tokenizer = load_policy(init_dir)
        actor = actor.to(stage.device)
        reference = copy.deepcopy(actor).eval().requires_grad_(False)  # π_SFT of Eq. 12
        actor.train()
        gen_module = actor  # hf: generates with the actor itself (pushes are then free)
        if pc.algo == "ppo":
            critic = ValueModel(copy.deepcopy(getattr(actor, actor.base_model_prefix))).train()
        apply_fp8_models(cfg.parallel, actor, critic)  # parallel.fp8 (the reference, copied above, stays exact)
    # Under pp, float8 is applied per stage by the pipeline engines (trained ones only), as
    # parallelize_policy does under dp / tp.
    # The trained models sit behind training engines: the updates hand them micro-batches and pure
    # loss functions; log-probs are taken under the sampler's temperature. Under pp the engines
    # build their own updaters from these keywords (gradient norm over all stages); the megatron
    # backend's actor engine also takes init_dir, which it loads itself.
    actor_optim = dict(lr=pc.lr, weight_decay=pc.weight_decay, warmup_steps=pc.warmup_steps, grad_clip=pc.grad_clip)
    critic_optim = {**actor_optim, "lr": pc.critic_lr}
    actor_engine = build_engine(cfg.parallel, lambda: actor, lambda m: Updater(m.parameters(), **actor_optim),
                                "causal_lm", "actor", stage=stage, optim=actor_optim, label="policy",
                                temperature=sc.temperature, kernels=cfg.kernels, init_dir=init_dir)
    critic_engine = None if critic is None else build_engine(
        cfg.parallel, lambda: critic, lambda m: Updater(m.parameters(), **critic_optim), "value", "critic",
        stage=stage, optim=critic_optim, init_dir=init_dir)
    engines = [e for e in (actor_engine, critic_engine) if e is not None]
    if stage.pp > 1:
        # π_SFT of Eq. 12, frozen and forward-only, cut into stages like the actor: no rank holds it whole.
        ref_engine = build_engine(cfg.parallel, lambda: reference, None, "causal_lm", "reference", stage=stage,
                                  optim=None, train=False, label="reference", temperature=sc.temperature,
                                  kernels=cfg.kernels)

        def ref_logprobs(ids_BT, attn_BT):
            return ref_engine.forward({"ids_BT": ids_BT, "mask_BT": attn_BT}).logp_BT
    else:
        ref_worker = LogprobWorker(reference, sc.temperature, cfg.kernels)

        def ref_logprobs(ids_BT, attn_BT):
            return ref_worker.logprobs(ids_BT, attn_BT)[0]
    if stage.distributed:
        # hf: each rank's plain copy, filled by the first push below (see parallel/policy.py). Made
        # after the engines: under pp the actor skeleton's buffers (rotary inv_freq) are real only
        # once its engine has materialised its stages.
        gen_module = rollout_module(stage, actor) if cfg.rollout.engine == "hf" else None

    def old_logprobs(ids_BT, attn_BT):
        return actor_engine.forward({"ids_BT": ids_BT, "mask_BT": attn_BT}).logp_BT

    def values(ids_BT, attn_BT):
        return critic_engine.forward({"ids_BT": ids_BT, "mask_BT": attn_BT})

    kl_ctl = (kl.AdaptiveKLController(pc.kl_coef, pc.kl_target, pc.kl_horizon) if pc.adaptive_kl
              else kl.FixedKLController(pc.kl_coef))
    writer = stage.writer(lambda: MetricsWriter(out, tensorboard=cfg.run.tensorboard))
    rng, gen = random.Random(cfg.run.seed), torch.Generator().manual_seed(cfg.run.seed)
    names = rewarder.spec.names
    engine = build_rollout_engine(cfg.rollout, model=gen_module, tokenizer=tokenizer, model_dir=init_dir)
    try:  # the engine (vLLM: an in-process engine with its KV cache) is released however the run ends
        push = _weight_pusher(cfg, engine, actor_engine, tokenizer, prompts[0], old_logprobs, stage)

        def sample_for_eval(batch_prompts: list[str]) -> list[str]:
            sampling = SamplingConfig(temperature=cfg.eval.temperature, max_new_tokens=sc.max_new_tokens)
            return generate_texts(engine, tokenizer, batch_prompts, 1, sampling, seed=cfg.eval.seed).responses

        history: list[dict] = []
        ckpt = _checkpoints(cfg, out, engines, actor, critic, tokenizer, writer)
        loop = TrainLoop(LoopConfig(f"policy {pc.algo}", pc.steps, pc.max_minutes, "policy.max_minutes", 1,
                                    show_progress), stage, writer, ckpt, prof)

        def load_state(state: dict) -> None:
            history[:] = state["history"]
            rng.setstate(state["rng"])
            gen.set_state(state["gen"])
            kl_ctl.__dict__.update(state["kl_ctl"])
            actor_engine.load_scheduler_state(state["actor_sched"])
            if critic_engine is not None:
                critic_engine.load_scheduler_state(state["critic_sched"])

        def save_state() -> dict:
            return {"history": history, "rng": rng.getstate(), "gen": gen.get_state(), "kl_ctl": dict(vars(kl_ctl)),
                    "actor_sched": actor_engine.scheduler_state(),
                    "critic_sched": critic_engine.scheduler_state() if critic_engine is not None else None}

        def body(step: int) -> dict:
            t0 = time.time()
            batch_prompts = stage.shard([rng.choice(prompts) for _ in range(pc.prompts_per_step)])  # this dp rank's
            with _finite_sampling(f"step {step}"):
                rollout = generate_texts(engine, tokenizer, batch_prompts, K, sc,
                                         seed=cfg.run.seed * 100003 + step + 7919 * stage.dp_rank)
            push.sleep()  # the trainer's phase: a GPU engine frees its memory (rollout.sleep_level)
            if stage.distributed:  # the pp × tp ranks of one dp index train one replica on the same rows
                rollout = share_within_model_group(stage, rollout)
            rollout = rollout.to(stage.device)
            t_gen = time.time() - t0
            prof.mark("generation")
            scored = rewarder.score(rollout.prompts, rollout.responses)
            if stage.pp > 1:
                # The group's ranks must cut the same micro-batches (Online-DPO's pairs follow the
                # rewards): one rank's scores, not each rank's own fused-head pass (last bits on GPUs).
                scored = share_within_model_group(stage, RewardOutput(*(t.cpu() for t in (
                    scored.reward_B, scored.terms_BH, scored.targets_BH))))  # CPU: a pickled CUDA tensor keeps its index
            core.check_finite(scored.reward_B, "mapped reward", step)
            ids, attn, mask = rollout.input_ids_BT, rollout.attention_mask_BT, rollout.response_mask_BT.float()
            scored = RewardOutput(*(t.to(ids.device) for t in (scored.reward_B, scored.terms_BH, scored.targets_BH)))
            prof.mark("reward")
            old_logp = old_logprobs(ids, attn)
            ref_logp = ref_logprobs(ids, attn)
            exp = Experience(ids, attn, mask, old_logp * mask, ref_logp * mask)
            prof.mark("ref_old_logprobs")
            guard_metrics, tis_metrics = _check_rollout(cfg, engine.name, exp, rollout.logprobs_BT, step)
            metrics = {**compute_advantages(pc, exp, scored.reward_B, kl_ctl.value, K,
                                            None if critic_engine is None else values, step), **tis_metrics}
            if monitor is not None:
                metrics.update(monitor(rollout.prompts, rollout.responses, scored, rewarder))
            prof.mark("advantages")
            metrics.update(update_actor(actor_engine, exp, pc, kl_ctl.value, gen, step))
            prof.mark("actor_update")
            if critic_engine is not None:
                metrics.update(update_critic(critic_engine, exp, pc, gen, step))
                prof.mark("critic_update")
            _count_step(prof, flops, pc, exp)
            if stage.distributed:
                metrics = mean_metrics(stage, {**metrics, "response_length": float(mask.sum(1).mean())})
                # Per-dimension rewards over the global batch (ranks name each dimension different times).
                metrics.update(_reward_metrics(RewardOutput(*(stage.gather_dp(t) for t in (
                    scored.reward_B, scored.terms_BH, scored.targets_BH))), names))
                prof.mark("metrics")
            metrics.update(guard_metrics)  # already reduced over ranks (worst rank)
            kl_ctl.update(metrics["kl"], ids.shape[0] * stage.dp)
            metrics.update(push(step))
            prof.mark("weight_sync")
            if not stage.distributed:
                metrics.update(_reward_metrics(scored, names), response_length=float(mask.sum(1).mean()))
            metrics.update(kl_coef=kl_ctl.value, gen_seconds=t_gen, step_seconds=time.time() - t0)
            history.append(metrics)
            return metrics

        def after(step: int) -> None:
            prof.mark("metrics")
            if eval_fn is not None and stage.is_main and pc.eval_every and step > 0 and step % pc.eval_every == 0:
                writer.write(step, eval_fn(step, sample_for_eval), tag="eval")
                prof.mark("eval")
            if pc.save_every and step > 0 and step % pc.save_every == 0:
                _save_policy(stage, actor, tokenizer, out / "checkpoints" / f"step_{step}")

        first = loop.resume(load_state)
        push(first, setup=True)  # fills a torchrun rank's empty copy; after a resume, the checkpoint's weights
        flops = _step_flops(prof, actor, critic, rewarder)
        result = loop.run(first, body, save_state, after,
                          postfix=lambda m: {"reward": f"{m['reward']:.3f}", "kl": f"{m['kl']:.3f}"})
        writer.close()
        _save_policy(stage, actor, tokenizer, out / "policy")
        summary = {**result, "algo": pc.algo, "final": history[-1] if history else {},
                   "policy_dir": str(out / "policy")}
        if monitor is not None:
            from ..eval.overopt import detect_overoptimisation

            summary["overoptimisation"] = detect_overoptimisation(history)
        if stage.is_main:
            (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        stage.barrier()
        prof.mark("checkpoint")
        prof.write(out / "profile.json")
        return summary
    finally:
        engine.close()


@contextmanager
def _finite_sampling(when: str):
    """torch.multinomial on inf/nan logits means the policy has diverged: say so, naming the step."""
    try:
        yield
    except RuntimeError as e:
        if "probability tensor" not in str(e):
            raise
        raise core.NonFiniteError(f"{when}: policy sampling distribution is not finite") from e


def _weight_pusher(cfg: Config, engine, actor: TrainEngine, tokenizer, probe_prompt: str, old_logprobs, stage: Stage):
    """``push(step) -> metrics``: wake the engine, stream the actor's full HF-named weights into it
    (the one export path), and — with ``rollout.probe`` — check at once that they took (guard)."""
    rc = cfg.rollout
    asleep = [False]

    def sleep() -> None:
        if rc.sleep_level:
            engine.sleep(rc.sleep_level)
            asleep[0] = True

    def push(step: int, setup: bool = False) -> dict:
        """Push before ``step`` (setup) or after ``step``'s update."""
        if asleep[0]:
            engine.wake_up()
            asleep[0] = False
        engine.update_weights(actor.export_weights(rc.push_bucket_mb << 20))
        if not rc.probe:
            return {}
        share = (lambda b: share_within_model_group(stage, b)) if stage.distributed else (lambda b: b)
        when = f"before step {step}" if setup else f"step {step}"
        with _finite_sampling(when):
            m = guard.probe(engine, tokenizer, probe_prompt, cfg.sampling, old_logprobs,
                            stage.device, share)
        guard.check_stale(m, rc, engine.name, f"{when} (probe after the weight push)", prefix="rollout/probe_")
        return m

    push.sleep = sleep
    return push


def _check_rollout(cfg: Config, engine_name: str, exp: Experience, rollout_logp_BT, step: int) -> tuple[dict, dict]:
    """The per-step guard on the rollout batch (enforced only without top-k/top-p truncation: see
    rollout/guard.py; its metrics are the worst rank's) and ``policy.rollout_correction``'s weights,
    stored in ``exp`` (their metrics are this rank's)."""
    rollout_logp_BT = rollout_logp_BT.to(exp.old_logp_BT.device) * exp.mask_BT
    m = guard.mismatch_metrics(exp.old_logp_BT, rollout_logp_BT, exp.mask_BT)
    if not guard.truncation_active(cfg.sampling):
        guard.check_stale(m, cfg.rollout, engine_name, f"step {step} (rollout batch)")
    exp.is_weight_BT, stats = tis_weights_BT(cfg.policy.rollout_correction, exp.old_logp_BT, rollout_logp_BT,
                                             exp.mask_BT, cfg.policy.rollout_correction_cap)
    return m, {f"rollout/{k}": v for k, v in stats.items()}


def _step_flops(prof: Profiler, actor, critic, rewarder) -> dict:
    """ModelFlops of the models one step runs (profile.json's FLOPs and MFU)."""
    rm = getattr(getattr(rewarder, "rm", None), "model", None)
    if rm is None:
        prof.note("reward scoring FLOPs not counted: a custom rewarder (not one multi-head RM)")
    return {"actor": model_flops(actor), "critic": None if critic is None else model_flops(critic),
            "rm": None if rm is None else model_flops(rm)}


def _count_step(prof: Profiler, fl: dict, pc: PolicyConfig, exp: Experience) -> None:
    """Model FLOPs of one iteration: generation (prompt prefill + sampled tokens), reward scoring
    (counted over the rollout's tokens: the RM sees the prompt without its prefix, so this is a
    slight overcount), old and reference log-probs, the PPO value forward, and update_epochs passes
    of forward + backward over the rows the updates train on (Online-DPO: its pairs' rows)."""
    attn = exp.attn_BT
    prof.add_tokens(attn.sum())
    prof.add_tokens(exp.mask_BT.sum(), kind="generated_tokens")
    prof.add_flops(attn, fl["actor"], False, "generation")
    if fl["rm"] is not None:
        prof.add_flops(attn, fl["rm"], False, "reward")
    prof.add_flops(attn, fl["actor"], False, "ref_old_logprobs", repeat=2)
    rows = attn if exp.chosen_P is None else attn[torch.cat([exp.chosen_P, exp.rejected_P])]
    prof.add_flops(rows, fl["actor"], True, "actor_update", repeat=pc.update_epochs)
    if fl["critic"] is not None:
        prof.add_flops(attn, fl["critic"], False, "values")
        prof.add_flops(attn, fl["critic"], True, "critic_update", repeat=pc.update_epochs)


def _checkpoints(cfg, out, engines: list[TrainEngine], actor, critic, tokenizer, writer) -> StageCheckpoints:
    """Resumable checkpoints of the policy stage: actor (+ critic) and their optimizers. The
    reference is not saved: it is the initial policy, reloaded from ``policy.init``."""
    models, optims = {}, {}
    for e in engines:
        m, o = e.checkpoint_items()
        models.update(m)
        optims.update(o)

    def assets(d):
        write_model_assets(d, "actor", "causal_lm", actor, tokenizer)
        if critic is not None:
            write_model_assets(d, "critic", "value", critic, tokenizer)

    return StageCheckpoints(cfg.checkpoint, out, models, optims, writer, assets)


def _save_policy(stage: Stage, actor, tokenizer, path: Path) -> None:
    """Rank 0 writes the HF directory; a sharded actor is gathered first (every rank calls this)."""
    if not stage.distributed:
        return _save_hf(actor, tokenizer, path)
    full = stage.full_model(actor, causal_lm_skeleton)
    if stage.is_main:
        _save_hf(full, tokenizer, path)


def _save_hf(model, tokenizer, path: Path) -> None:
    """A standard HF directory (safetensors + config + tokenizer) that transformers loads as is."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _reward_metrics(scored, names) -> dict:
    out = {"reward": float(scored.reward_B.mean())}
    for i, name in enumerate(names):
        named_B = scored.targets_BH[:, i] >= 0
        if bool(named_B.any()):
            out[f"reward_{name}"] = float(scored.terms_BH[named_B, i].mean())
    return out
