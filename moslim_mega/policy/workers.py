"""Workers the controller calls through narrow interfaces: generate (rollout engine), score
(reward), logprobs (the frozen reference's forward); the actor's and critic's forwards and updates
go through their training engines (``engine/torch_engine.py``).

Legend: B rows (sequences), T tokens, H reward heads, K samples per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..algos.logprob import sequence_logprobs
from ..config import KernelsConfig
from ..prefs import parse_prefix, targets_to_tensor
from ..reward.io import LoadedRewardModel, load_reward_model
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


@dataclass
class PipelineRewardModel(LoadedRewardModel):
    """A :class:`LoadedRewardModel` whose model runs as a frozen, forward-only pipeline engine
    (``parallel.pp > 1``): ``model`` is this rank's pruned part of the RM (its stages), and every
    rank of the pp group must score the same rows together — the policy loop's ranks of one
    model-parallel group do, on their shared rollout. The head input comes from the last stage to
    every rank, so the fused head (and the Eq. 11 mapping) runs as in one process."""

    engine: object = None

    def _head_in(self, ids_BT, mask_BT):
        return self.engine.forward({"ids_BT": ids_BT, "mask_BT": mask_BT})

    @torch.no_grad()
    def probs(self, prompts: list[str], responses: list[str], batch_size: int = 64) -> list[torch.Tensor]:
        chunks = []
        for _, ids_BT, mask_BT in self._batches(prompts, responses, batch_size):
            h = self._head_in(ids_BT, mask_BT)
            logits = torch.split(F.linear(h.hidden_BD, h.weight_CD, h.bias_C), list(self.model.num_classes), dim=-1)
            chunks.append([torch.softmax(x.float(), dim=-1).cpu() for x in logits])
        return [torch.cat([c[i] for c in chunks]) for i in range(len(self.spec))]

    @torch.no_grad()
    def score(self, prompts, responses, targets_BH, mapper, impl=None, batch_size: int = 64):
        probs, rewards = [], []
        for start, ids_BT, mask_BT in self._batches(prompts, responses, batch_size):
            t_BH = targets_BH[start : start + ids_BT.shape[0]].to(ids_BT.device)
            h = self._head_in(ids_BT, mask_BT)
            probs_BC, reward_B = mapper.head_rewards(h.hidden_BD, h.weight_CD, h.bias_C, self.model.num_classes, t_BH,
                                                     impl=impl)
            probs.append(probs_BC.float().cpu())
            rewards.append(reward_B.float().cpu())
        probs_NC = torch.cat(probs)
        return list(torch.split(probs_NC, list(self.model.num_classes), dim=1)), torch.cat(rewards)


def load_pipeline_reward_model(stage, rm_dir, kernels: KernelsConfig | None = None) -> PipelineRewardModel:
    """The RM in ``rm_dir`` cut into pipeline stages over ``stage``'s mesh (under ``parallel.pp > 1``):
    rank 0 alone loads the weights (``Stage.build``), every rank its tokenizer, spec and statistics."""
    from transformers import AutoModel

    from ..engine import build_engine
    from ..reward.model import MultiHeadRewardModel

    meta = load_reward_model(rm_dir, weights=False)
    num_classes = tuple(meta.stats.num_classes)
    model = stage.build(lambda: load_reward_model(rm_dir).model,
                        lambda config: MultiHeadRewardModel(AutoModel.from_config(config), num_classes), None)
    model.eval().requires_grad_(False)
    kc = kernels or KernelsConfig()
    engine = build_engine(stage.pc, lambda: model, None, "reward", "rm", stage=stage, optim=None, train=False,
                          label="reward model", kernels=kc)
    return PipelineRewardModel(model, meta.tokenizer, meta.spec, meta.stats, meta.max_length, engine=engine)
