"""Workers the controller calls through narrow interfaces: generate (rollout engine), score
(reward), logprobs (the frozen reference's forward); the actor's and critic's forwards and updates
go through their training engines (``engine/torch_engine.py``).

Legend: B rows (sequences), T tokens, H reward heads, K samples per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algos.logprob import sequence_logprobs
from ..config import KernelsConfig
from ..prefs import parse_prefix, targets_to_tensor
from ..reward.io import LoadedRewardModel
from ..reward.mapping import RewardMapper
from ..utils.optim import Updater  # noqa: F401  (re-exported: what the controller's engines step with)


@dataclass
class RewardOutput:
    reward_B: torch.Tensor  # Eq. 11 mapped reward
    terms_BH: torch.Tensor  # each named head's term (0 where not named)
    targets_BH: torch.Tensor  # target class per head, −1 = not named


class RewardWorker:
    """The multi-head RM plus the reward mapping: prefix → targets, stripped prompt → RM."""

    def __init__(self, rm: LoadedRewardModel, mapper: RewardMapper, impl: str | None = None):
        self.rm, self.mapper, self.impl = rm, mapper, impl
        self.spec = rm.spec

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> RewardOutput:
        parsed = [parse_prefix(p, self.rm.spec) for p in prompts]
        targets_BH = targets_to_tensor([t for t, _ in parsed], self.rm.spec)
        # "Prompt alignment" (paper §2.3): the RM sees the prompt without its preference prefix.
        # One fused head pass gives the probabilities and the Eq. 11 reward (issue 7).
        probs, reward_B = self.rm.score([stripped for _, stripped in parsed], responses, targets_BH, self.mapper,
                                        impl=self.impl)
        # per_head also checks the probabilities (NaN / Inf → MappingError naming the head).
        terms_BH = self.mapper.per_head(probs, targets_BH)
        return RewardOutput(reward_B, terms_BH, targets_BH)


class LogprobWorker:
    """Token log-probs / entropy of a causal LM over rollout sequences (actor or reference)."""

    def __init__(self, model, temperature: float = 1.0, kernels: KernelsConfig | None = None):
        self.model = model
        # Log-probs are taken under the same temperature the sampler used, so that ratios and KL
        # compare like with like (as verl/OpenRLHF do).
        self.temperature = temperature if temperature > 0 else 1.0
        self.kernels = kernels or KernelsConfig()

    def logprobs(self, ids_BT, mask_BT, grad: bool = False):
        with torch.set_grad_enabled(grad):
            return sequence_logprobs(self.model, ids_BT, mask_BT, temperature=self.temperature,
                                     chunk_size=self.kernels.logprob_chunk, impl=self.kernels.impl)
