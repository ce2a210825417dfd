"""The stale-weight guard: does the rollout engine sample from the weights the trainer has?

After every weight push (a probe: a fixed prompt, a few tokens) and on every step's rollout batch,
the engine's sampled-token log-probs are compared with the trainer's recomputation of the same
tokens (the "old" log-probs the loop needs anyway). Statistics: :func:`logprob_mismatch`; the run
stops with :class:`StaleWeightsError` when the mean |Δ log-prob| exceeds ``rollout.max_logprob_diff``.

Truncation: the engine's log-probs are *processed* (top-k / top-p renormalise over the kept
tokens), the trainer's are the temperature-scaled full softmax. With ``sampling.top_k > 0`` or
``sampling.top_p < 1`` they legitimately differ, so the per-step batch is then only logged, not
enforced; the probe always samples without truncation (same temperature), so it stays enforced.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..algos.core import NonFiniteError

from ..algos.rollout_correction import logprob_mismatch
from ..config import RolloutConfig, SamplingConfig
from .base import RolloutEngine, encode_prompts

PROBE_TOKENS = 4
PROBE_SEED = 20240531


class StaleWeightsError(RuntimeError):
    """The rollout engine's weights are not the trainer's (a push that did not take)."""


def truncation_active(sampling: SamplingConfig) -> bool:
    """Whether the sampler's log-probs are renormalised over a truncated vocabulary."""
    return sampling.temperature > 0 and (sampling.top_k > 0 or sampling.top_p < 1.0)


def probe_sampling(sampling: SamplingConfig) -> SamplingConfig:
    """The probe's sampling: the loop's temperature (the trainer's log-probs use it), no truncation."""
    return SamplingConfig(temperature=sampling.temperature, top_p=1.0, top_k=0, max_new_tokens=PROBE_TOKENS)


def world_max(stats: dict) -> dict[str, float]:
    """Each statistic's maximum over all ranks (every rank then takes the same stop decision)."""
    t = torch.tensor([float(v) for v in stats.values()], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        t = t.to(dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(stats, t.cpu().tolist()))


def mismatch_metrics(trainer_logp_BT, rollout_logp_BT, mask_BT, prefix: str = "rollout/") -> dict[str, float]:
    """``rollout/logprob_abs_diff_mean``, ``…_max`` and ``rollout/mismatch_kl`` (worst rank)."""
    s = logprob_mismatch(trainer_logp_BT, rollout_logp_BT.to(trainer_logp_BT.device), mask_BT)
    s = world_max({"logprob_abs_diff_mean": s["abs_diff_mean"], "logprob_abs_diff_max": s["abs_diff_max"],
                   "mismatch_kl": s["mismatch_kl"]})
    return {prefix + k: v for k, v in s.items()}


def check_stale(metrics: dict, rc: RolloutConfig, engine_name: str, when: str, prefix: str = "rollout/") -> None:
    """Raise :class:`StaleWeightsError` when the mean |Δ| is above ``rollout.max_logprob_diff`` (0 = off)."""
    mean, mx = metrics[prefix + "logprob_abs_diff_mean"], metrics[prefix + "logprob_abs_diff_max"]
    if not math.isfinite(mean):  # a diverged policy, not a stale engine
        raise NonFiniteError(f"{when}: rollout/trainer log-prob difference is not finite")
    if rc.max_logprob_diff > 0 and mean > rc.max_logprob_diff:
        raise StaleWeightsError(
            f"{when}: the rollout weights are stale — the {engine_name} engine's sampled-token log-probs differ "
            f"from the trainer's by {mean:.4g} on average (max {mx:.4g}) > rollout.max_logprob_diff="
            f"{rc.max_logprob_diff}; the last weight push did not reach the engine")


def probe(engine: RolloutEngine, tokenizer, prompt: str, sampling: SamplingConfig, trainer_logprobs, device,
          share=lambda batch: batch) -> dict[str, float]:
    """Sample a few tokens of ``prompt`` and compare their log-probs with the trainer's:
    ``trainer_logprobs(ids_BT, attn_BT) -> logp_BT`` (a collective under torchrun: every rank probes).
    ``share``: makes tensor-parallel peers use the same batch. Metrics keys ``rollout/probe_…``."""
    batch = engine.generate([prompt], encode_prompts(tokenizer, [prompt]), 1, probe_sampling(sampling),
                            seed=PROBE_SEED)
    batch = share(batch).to(device)
    mask = batch.response_mask_BT.float()
    logp = trainer_logprobs(batch.input_ids_BT, batch.attention_mask_BT) * mask
    return mismatch_metrics(logp, batch.logprobs_BT, mask, prefix="rollout/probe_")
