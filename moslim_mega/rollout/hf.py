"""The ``hf`` rollout engine: HF ``model.generate`` (KV cache) on a module the engine owns.

Single process, the module is the trainer's actor itself (no copy: ``update_weights`` sees the
same storage and skips it). Under torchrun it is each rank's plain, unsharded copy of the sharded
actor, refreshed by ``update_weights`` from the streamed full tensors
(:func:`moslim_mega.parallel.export.export_hf_weights`); see parallel/policy.py for why.

Shape legend: B = rows (prompts × n), P = prompt columns (left-padded), R = response columns,
T = P + R, V = vocabulary.
"""

from __future__ import annotations

from typing import Iterable

import torch
from transformers import GenerationConfig

from ..config import SamplingConfig
from .base import RolloutBatch, RolloutError, assemble_batch, check_generate_args, eos_and_pad, left_pad

__all__ = ["HFEngine", "build_generation_config", "left_pad"]


def build_generation_config(sampling: SamplingConfig, eos_id: int, pad_id: int) -> GenerationConfig:
    """An explicit config, so the sampling distribution is exactly the one SamplingConfig describes.

    generate() fills every field left None from the model's own generation_config (a checkpoint may
    ship a repetition penalty, min_length, top_k=50 ...); those would silently change what the
    logprobs describe, so the ones with a neutral value are pinned to it here.
    """
    do_sample = sampling.temperature > 0
    kw = dict(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=do_sample,
        num_beams=1,
        use_cache=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        output_scores=True,
        return_dict_in_generate=True,
        min_length=0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
    )
    if do_sample:
        # Set only when sampling: greedy ignores them, and setting them would log a warning.
        kw.update(
            temperature=sampling.temperature,
            top_k=sampling.top_k,  # 0 = off (HF's own default would be 50)
            top_p=sampling.top_p,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
        )
    return GenerationConfig(**kw)


class HFEngine:
    """The :class:`~moslim_mega.rollout.base.RolloutEngine` over a HF causal LM module."""

    name = "hf"

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id, self.pad_id = eos_and_pad(tokenizer)
        self.pushes = 0
        """Completed ``update_weights`` calls."""
        self.tensors_copied = 0
        """Tensors copied by the last push (0 when the engine shares the trainer's module)."""
        self.sleep_calls: list[int] = []
        """Levels ``sleep`` was asked for: a no-op here (the module is the trainer's or a plain copy
        that generation needs next step), recorded so tests and logs can see the bracket."""
        self.asleep = False

    # ---- weights ---------------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full HF-named tensors into the module; every parameter must arrive exactly once."""
        params = dict(self.model.named_parameters())
        seen: set[str] = set()
        copied = 0
        for name, full in named_tensors:
            p = params.get(name)
            if p is None:
                raise RolloutError(f"update_weights: {name!r} is not a parameter of the rollout model")
            if tuple(full.shape) != tuple(p.shape):
                raise RolloutError(f"update_weights: {name!r} has shape {tuple(full.shape)}, the rollout "
                                   f"model's is {tuple(p.shape)}")
            if name in seen:
                raise RolloutError(f"update_weights: {name!r} pushed twice in one update")
            seen.add(name)
            if full.device == p.device and full.data_ptr() == p.data_ptr():
                continue  # the engine generates with the trainer's own module: already current
            p.copy_(full)
            copied += 1
        missing = sorted(set(params) - seen)
        if missing:
            raise RolloutError(f"update_weights: {len(missing)} parameters were not pushed (the rollout "
                               f"model would keep stale weights), e.g. {missing[:3]}")
        self.pushes += 1
        self.tensors_copied = copied

    def sleep(self, level: int = 1) -> None:
        self.sleep_calls.append(level)
        self.asleep = True

    def wake_up(self) -> None:
        self.asleep = False

    def close(self) -> None:
        """Nothing to release: the module belongs to the caller (the trainer's actor or its copy)."""

    # ---- sampling --------------------------------------------------------------------------
    def generate(self, prompts: list[str], prompt_ids: list[list[int]], n: int, sampling: SamplingConfig,
                 seed: int | None = None) -> RolloutBatch:
        check_generate_args(prompts, n, sampling, prompt_ids)
        device = next(self.model.parameters()).device
        ids_BP, mask_BP = left_pad(prompt_ids, self.pad_id)
        # repeat_interleave keeps the n rows of one prompt contiguous (i*n .. i*n+n-1).
        ids_BP = ids_BP.repeat_interleave(n, dim=0).to(device)
        mask_BP = mask_BP.repeat_interleave(n, dim=0).to(device)
        gen_cfg = build_generation_config(sampling, self.eos_id, self.pad_id)
        if seed is not None:
            torch.manual_seed(seed)
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling
        try:
            with torch.no_grad():
                out = self.model.generate(input_ids=ids_BP, attention_mask=mask_BP, generation_config=gen_cfg)
        finally:
            self.model.train(was_training)
        resp_BR = out.sequences[:, ids_BP.shape[1] :]
        assert len(out.scores) == resp_BR.shape[1], (len(out.scores), resp_BR.shape)
        # One step at a time: stacking [B, R, V] scores would cost B·R·V floats for big vocabularies.
        # The scores are the *processed* logits (temperature/top-k/top-p applied), so their
        # log-softmax is the distribution each token was actually drawn from; greedy: raw logits.
        logp_BR = torch.stack(
            [torch.log_softmax(s_BV.float(), -1).gather(-1, resp_BR[:, t, None])[:, 0] for t, s_BV in enumerate(out.scores)],
            dim=1,
        )
        # assemble_batch cuts each row after its first EOS (top-k's -inf on the pad after EOS goes too).
        return assemble_batch(prompts, n, prompt_ids, resp_BR.cpu().tolist(), logp_BR.cpu().tolist(),
                              self.eos_id, self.pad_id, self.tokenizer)
