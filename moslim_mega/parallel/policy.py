"""The policy loop's models under torchrun: a sharded actor, reference and critic, and the module
each rank's ``hf`` rollout engine generates from.

Generation choice (the simplest correct one): every rank generates its dp shard of the prompts
with a plain, unsharded copy of the current actor, which the engine refreshes after each update
from the streamed full tensors of the actor's engine (``TrainEngine.export_weights``: FSDP/TP
shards gathered, or under ``parallel.pp > 1`` each stage's tensors broadcast by its pp rank).
Generation then has no collectives, so ranks whose responses end early never wait on — or
deadlock with — ranks still decoding, and the other ranks of a model-parallel group (the pp × tp
ranks of one dp index, which must train on identical rows) receive the rollouts of the group's
first rank by broadcast, so they train on identical rows by construction. The copy costs one full
model per rank — under pp too, where the trained stages are split: that is the ``hf`` engine's
price, and on GPU clusters the vLLM engine (``rollout.engine=vllm``, weights pushed through the
same stream) is the route for large policies.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from ..models.value import ValueModel
from .parallelize import parallelize_policy, parallelize_reference, parallelize_value
from .stage import Stage


def check_policy_layout(stage: Stage, pc) -> None:
    """Refuse layouts whose ranks would run different numbers of collective forward passes, and
    (under pp) update micro-batch counts that differ from ``parallel.pp_microbatches``."""
    from ..config import ConfigError

    if pc.prompts_per_step % stage.dp:
        raise ConfigError(f"policy.prompts_per_step={pc.prompts_per_step} must be divisible by parallel.dp={stage.dp}")
    if pc.algo == "online_dpo" and stage.dp > 1:
        # The number of valid (chosen, rejected) pairs differs between dp ranks, so their numbers of
        # mini-batches — and FSDP's collectives — would not match.
        raise ConfigError("policy.algo=online_dpo runs with parallel.dp=1 only (tensor and pipeline parallel are fine)")
    want = getattr(getattr(stage, "pc", None), "pp_microbatches", 0) if getattr(stage, "pp", 1) > 1 else 0
    if not want:
        return
    if pc.algo == "online_dpo":
        # Its micro-batches are cut from the valid pairs of each step, a number the rollouts decide.
        raise ConfigError(f"parallel.pp_microbatches={want} with policy.algo=online_dpo: the update's micro-batch "
                          "count follows each step's number of valid pairs; set parallel.pp_microbatches=0")
    counts = update_micro_counts(pc, pc.prompts_per_step // stage.dp * pc.samples_per_prompt)
    if set(counts) != {want}:
        raise ConfigError(
            f"parallel.pp_microbatches={want}: the policy updates cut each mini-batch (policy.mini_batch_size="
            f"{pc.mini_batch_size} of the {pc.prompts_per_step // stage.dp * pc.samples_per_prompt} rollout rows per "
            f"dp rank) into micro-batches of policy.micro_batch_size={pc.micro_batch_size or pc.mini_batch_size}, "
            f"i.e. {sorted(set(counts))} per pipelined step; make them agree or set parallel.pp_microbatches=0")


def update_micro_counts(pc, rows: int) -> list[int]:
    """Micro-batches of each mini-batch of one PPO/RLOO update over ``rows`` rollout rows (as the
    controller's ``_accumulate`` cuts them): one pipelined ``train_step`` per entry."""
    micro = pc.micro_batch_size or pc.mini_batch_size
    sizes = [min(pc.mini_batch_size, rows - m0) for m0 in range(0, rows, pc.mini_batch_size)]
    return [-(-size // micro) for size in sizes]


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
    """(actor, reference, critic or None, tokenizer), all from ``init_dir``; only rank 0 ever loads
    the full checkpoint."""
    from ..models.build import load_policy

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
    return actor, reference, critic, load_tokenizer(init_dir)


@torch.no_grad()
def megatron_policy_models(stage: Stage, init_dir, with_critic: bool):
    """(actor skeleton, reference, critic skeleton or None, tokenizer) under ``parallel.backend=megatron``.

    The actor's megatron engine loads ``init_dir`` itself, shard by shard (``engine.build_engine``
    with ``init_dir``); the actor here is a meta skeleton — its config for the checkpoint assets and
    the FLOPs, and the module ``Stage.full_model`` fills from the engine's export — holding the real
    buffers (rotary ``inv_freq``: not in the export), from which ``rollout_module`` copies them.
    The critic's engine loads the same directory's backbone with a zero value head (V ≡ 0, as
    ``ValueModel``); its skeleton gives the checkpoint assets their config.
    The reference is each rank's own plain, frozen copy of the initial policy; with the ``hf``
    rollout engine's plain copy that makes two full models per rank — the vLLM engine
    (``rollout.engine=vllm``) saves the second."""
    from ..models.build import load_policy

    reference = load_policy(init_dir)[0].to(stage.device).requires_grad_(False).eval()
    with torch.device("meta"):
        actor = causal_lm_skeleton(reference.config).to(next(reference.parameters()).dtype)
    for name, buf in reference.named_buffers():
        owner_name, _, attr = name.rpartition(".")
        (actor.get_submodule(owner_name) if owner_name else actor)._buffers[attr] = buf.detach().clone().cpu()
    critic = None
    if with_critic:
        with torch.device("meta"):
            critic = value_skeleton(reference.config).train()
    return actor.train(), reference, critic, load_tokenizer(init_dir)


def rollout_module(stage: Stage, actor):
    """An empty plain module of the actor's architecture on this rank's device, for the ``hf``
    engine: its parameters are filled by the engine's first ``update_weights`` (the one export
    path); its buffers (rotary ``inv_freq``, never sharded, not in the stream) are copied here."""
    with torch.device("meta"):
        plain = causal_lm_skeleton(actor.config)
    plain = plain.to(next(actor.parameters()).dtype).to_empty(device=stage.device)
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()  # to_empty makes a new tensor per module: re-tie lm_head to the embedding
    buffers = dict(actor.named_buffers())
    for name, buf in plain.named_buffers():
        if name in buffers:
            buf.copy_(buffers[name].to(buf.device))
    return plain.eval()


def share_within_model_group(stage: Stage, obj):
    """``obj`` of the model-parallel group's first rank (pp rank 0, tp rank 0 of this dp index) on
    every rank of the group: the pp × tp ranks that train one model replica must see identical
    rollouts (and rewards, pairs) or their collectives would not match. Identity for pp = tp = 1.

    Two broadcasts instead of one over a flattened pp × tp group: first within tp (every rank then
    holds its pp rank's tp-rank-0 object), then within pp from pp rank 0."""
    if stage.mesh is None:
        return obj
    for dim in ("tp", "pp"):
        if stage.mesh[dim].size() > 1:
            box = [obj]
            dist.broadcast_object_list(box, group=stage.mesh[dim].get_group(), group_src=0)
            obj = box[0]
    return obj


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
