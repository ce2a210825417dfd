"""RL algorithms for MOSLIM policy optimisation (paper §3.3, Eq. 12) as small pure tensor functions.

PPO (:mod:`.ppo`), RLOO (:mod:`.rloo`), online DPO (:mod:`.dpo`), the KL penalty (:mod:`.kl`), masked
reductions (:mod:`.core`) and chunked LM-head log-probs (:mod:`.logprob`). The controller loop
composes these; nothing here owns a model, an optimiser or a process group.
"""

from .core import AlgoError, NonFiniteError, check_finite, masked_mean, masked_sum, masked_var, masked_whiten
from .dpo import DPO_KINDS, dpo_loss, select_pairs
from .kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_penalty
from .logprob import (
    chunked_linear_logprob_entropy,
    linear_logprob_entropy_reference,
    sequence_logprobs,
)
from .ppo import entropy_bonus, gae_advantages, ppo_policy_loss, ppo_value_loss, token_level_rewards
from .rloo import rloo_advantages, sequence_kl_rewards

__all__ = [
    "AlgoError",
    "NonFiniteError",
    "check_finite",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "KL_ESTIMATORS",
    "kl_penalty",
    "FixedKLController",
    "AdaptiveKLController",
    "token_level_rewards",
    "gae_advantages",
    "ppo_policy_loss",
    "ppo_value_loss",
    "entropy_bonus",
    "rloo_advantages",
    "sequence_kl_rewards",
    "DPO_KINDS",
    "select_pairs",
    "dpo_loss",
    "linear_logprob_entropy_reference",
    "chunked_linear_logprob_entropy",
    "sequence_logprobs",
]
