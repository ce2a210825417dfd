"""The policy loop's models under torchrun: a sharded actor, reference and critic, and a rollout
engine that generates from each rank's own plain copy of the actor.

Generation choice (the simplest correct one): every rank generates its dp shard of the prompts
with a plain, unsharded copy of the current actor, refreshed after each update from the sharded
actor's full state dict (an all-gather). Generation then has no collectives, so ranks whose
responses end early never wait on — or deadlock with — ranks still decoding, and tensor-parallel
peers receive the rollouts of their tp group's first rank by broadcast, so they train on identical
rows by construction. The copy costs one full model per rank: on GPU clusters the vLLM engine
(weights pushed the same way) is the route for large policies.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from ..models.value import ValueModel
from .parallelize import parallelize_policy, parallelize_reference, parallelize_value
from .stage import Stage, plain_copy


def check_policy_layout(stage: Stage, pc) -> None:
    """Refuse layouts whose ranks would run different numbers of collective forward passes."""
    from ..config import ConfigError

    if pc.prompts_per_step % stage.dp:
        raise ConfigError(f"policy.prompts_per_step={pc.prompts_per_step} must be divisible by parallel.dp={stage.dp}")
    if pc.algo == "online_dpo" and stage.dp > 1:
        # The number of valid (chosen, rejected) pairs differs between dp ranks, so their numbers of
        # mini-batches — and FSDP's collectives — would not match.
        raise ConfigError("policy.algo=online_dpo runs with parallel.dp=1 only (tensor parallel is fine)")


def causal_lm_skeleton(config):
    return AutoModelForCausalLM.from_config(config)


def value_skeleton(config):
    return ValueModel(AutoModel.from_config(config))


def load_tokenizer(init_dir):
    tok = AutoTokenizer.from_pretrained(init_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_policy_models(stage: Stage, init_dir, with_critic: bool):
    """(actor, reference, critic or None, rollout copy of the actor, tokenizer), all from ``init_dir``;
    only rank 0 ever loads the full checkpoint."""
    from ..sft import load_policy

    def load():
        return load_policy(init_dir)[0]

    actor = stage.build(load, causal_lm_skeleton, parallelize_policy).train()
    reference = stage.build(load, causal_lm_skeleton, parallelize_reference).eval().requires_grad_(False)
    critic = None
    if with_critic:
        def load_critic():
            m = load()
            return ValueModel(getattr(m, m.base_model_prefix))

        critic = stage.build(load_critic, value_skeleton, parallelize_value).train()
    rollout_model = everywhere_copy(stage, actor).eval()
    return actor, reference, critic, rollout_model, load_tokenizer(init_dir)


def _full_state_everywhere(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def everywhere_copy(stage: Stage, model):
    """A plain copy of a sharded causal LM on every rank (collective)."""
    return plain_copy(model, {k: v.detach().clone() for k, v in _full_state_everywhere(model).items()}, causal_lm_skeleton)


@torch.no_grad()
def sync_rollout_copy(model, copy_) -> None:
    """Refresh the rollout copy from the sharded actor after an update (collective)."""
    copy_.load_state_dict(_full_state_everywhere(model))


def share_within_tp(stage: Stage, rollout):
    """The rollout of the tp group's first rank on every rank of the group (identity for tp=1)."""
    if stage.mesh is None or stage.mesh["tp"].size() == 1:
        return rollout
    box = [rollout]
    dist.broadcast_object_list(box, group=stage.mesh["tp"].get_group(), group_src=0)
    return box[0]


def mean_metrics(stage: Stage, row: dict) -> dict:
    """Average each metric over the dp ranks that report it (keys may differ between ranks:
    a per-dimension reward exists only where a prompt named that dimension)."""
    if stage.mesh is None:
        return row
    rows = [None] * stage.dp
    dist.all_gather_object(rows, row, group=stage.mesh["dp"].get_group())
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r]
        out[k] = sum(vals) / len(vals) if all(isinstance(v, (int, float)) for v in vals) else vals[0]
    return out
