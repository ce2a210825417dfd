"""The HF rollout engine as it was before the rollout seam (issue 14), frozen verbatim from
moslim_mega/rollout/hf.py at commit 2c0f5b7 (class HFGenerator): the reference the new
HFEngine must reproduce token for token. Not imported by the package."""
from __future__ import annotations

import torch
from transformers import GenerationConfig

from moslim_mega.config import SamplingConfig
from moslim_mega.data.template import render_prompt
from moslim_mega.rollout.base import RolloutBatch, RolloutError, check_generate_args


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists → (ids_BP, mask_BP): decoder-only generation continues from the last column."""
    P = max(len(s) for s in seqs)
    ids_BP = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(seqs), P), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids_BP[b, P - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask_BP[b, P - len(s) :] = 1
    return ids_BP, mask_BP


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


class HFGenerator:
    """The :class:`~moslim_mega.rollout.base.Generator` for a HF causal LM shared with the trainer."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        if self.eos_id is None:
            raise RolloutError("tokenizer.eos_token_id: the tokenizer has no EOS token; responses could never end")

    def sync_weights(self, model) -> None:
        # No-op: this engine generates with the trainer's module itself, so it always has the
        # current weights. (A vLLM engine copies the state dict here.)
        return None

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rendered, tokenised (no extra specials: the template has them) and left-padded prompts."""
        seqs = []
        for i, p in enumerate(prompts):
            ids = self.tokenizer(render_prompt(self.tokenizer, p), add_special_tokens=False)["input_ids"]
            if not ids:
                raise RolloutError(f"prompts[{i}]: renders to zero tokens")
            seqs.append(ids)
        return left_pad(seqs, self.pad_id)

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingConfig, seed: int | None = None
    ) -> RolloutBatch:
        check_generate_args(prompts, n, sampling)
        device = next(self.model.parameters()).device
        ids_BP, mask_BP = self.encode_prompts(prompts)
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
        return self._assemble(prompts, n, ids_BP, mask_BP, out.sequences, out.scores)

    def _assemble(self, prompts, n, ids_BP, mask_BP, seq_BT, scores) -> RolloutBatch:
        P = ids_BP.shape[1]
        resp_BR = seq_BT[:, P:]
        assert len(scores) == resp_BR.shape[1], (len(scores), resp_BR.shape)
        # One step at a time: stacking [B, R, V] scores would cost B·R·V floats for big vocabularies.
        # The scores are the *processed* logits (temperature/top-k/top-p applied), so their
        # log-softmax is the distribution each token was actually drawn from.
        logp_BR = torch.stack(
            [torch.log_softmax(s_BV.float(), -1).gather(-1, resp_BR[:, t, None])[:, 0] for t, s_BV in enumerate(scores)],
            dim=1,
        )
        is_eos_BR = resp_BR == self.eos_id
        # Keep tokens with no EOS strictly before them: the response up to and including the first EOS.
        # HF fills finished rows with pad, which may equal EOS, so "first" matters.
        keep_BR = (is_eos_BR.long().cumsum(-1) - is_eos_BR.long()) == 0
        resp_BR = torch.where(keep_BR, resp_BR, torch.full_like(resp_BR, self.pad_id))
        # where(), not a product: top-k gives -inf to the pad tokens after EOS, and -inf·0 = nan.
        logp_BR = torch.where(keep_BR, logp_BR, torch.zeros_like(logp_BR))
        keep_long_BR = keep_BR.long()
        zeros_BP = torch.zeros_like(mask_BP)
        responses = [
            self.tokenizer.decode(r[k].tolist(), skip_special_tokens=True)
            for r, k in zip(resp_BR.cpu(), keep_BR.cpu())
        ]
        return RolloutBatch(
            prompts=[p for p in prompts for _ in range(n)],
            responses=responses,
            prompt_index=[i for i in range(len(prompts)) for _ in range(n)],
            input_ids_BT=torch.cat([ids_BP, resp_BR], dim=1),
            attention_mask_BT=torch.cat([mask_BP, keep_long_BR], dim=1),
            response_mask_BT=torch.cat([zeros_BP, keep_long_BR], dim=1),
            logprobs_BT=torch.cat([zeros_BP.float(), logp_BR.float()], dim=1),
            prompt_width=P,
            finished_B=is_eos_BR.any(-1),
        )
