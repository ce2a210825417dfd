"""TEMPORARY (issue 14, branch i14-vllm): the two shared helpers of the rollout seam, written to the
contract in ROLLOUT-SEAM.md until engineer SEAM's ``rollout/base.py`` (``encode_prompts``,
``assemble_batch``) is merged. At merge: import both from ``.base`` in ``rollout/vllm.py`` and the
vLLM tests, and delete this file.

Shape legend: B = rows (prompts × n), P = prompt columns (left-padded), R = response columns.
"""

from __future__ import annotations

import torch

from ..data.template import render_prompt
from .base import RolloutBatch, RolloutError


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Rendered (chat template) and tokenised prompts, no extra specials (the template has them)."""
    out = []
    for i, p in enumerate(prompts):
        ids = tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
        if not ids:
            raise RolloutError(f"prompts[{i}]: renders to zero tokens")
        out.append(list(ids))
    return out


def assemble_batch(prompts, n, prompt_ids, response_ids, response_logprobs, eos_id, pad_id, tokenizer) -> RolloutBatch:
    """Left-padded prompt then response per row (prompt-major, n contiguous rows per prompt); each
    response kept up to and including its first EOS, pad (and log-prob 0) after it."""
    B = len(prompts) * n
    assert len(prompt_ids) == len(prompts) and len(response_ids) == B == len(response_logprobs)
    kept = [_upto_first_eos(r, eos_id) for r in response_ids]
    P = max(len(p) for p in prompt_ids)
    R = max(1, max(len(k) for k in kept))
    ids_BT = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn_BT = torch.zeros((B, P + R), dtype=torch.long)
    resp_mask_BT = torch.zeros((B, P + R), dtype=torch.long)
    logp_BT = torch.zeros((B, P + R), dtype=torch.float32)
    for row in range(B):
        p = prompt_ids[row // n]
        k = len(kept[row])
        ids_BT[row, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        attn_BT[row, P - len(p) : P + k] = 1
        resp_mask_BT[row, P : P + k] = 1
        if k:
            ids_BT[row, P : P + k] = torch.tensor(kept[row], dtype=torch.long)
            logp_BT[row, P : P + k] = torch.tensor(response_logprobs[row][:k], dtype=torch.float32)
    return RolloutBatch(
        prompts=[p for p in prompts for _ in range(n)],
        responses=[tokenizer.decode(k, skip_special_tokens=True) for k in kept],
        prompt_index=[i for i in range(len(prompts)) for _ in range(n)],
        input_ids_BT=ids_BT,
        attention_mask_BT=attn_BT,
        response_mask_BT=resp_mask_BT,
        logprobs_BT=logp_BT,
        prompt_width=P,
        finished_B=torch.tensor([eos_id in k for k in kept], dtype=torch.bool),
    )


def _upto_first_eos(ids: list[int], eos_id: int) -> list[int]:
    ids = list(ids)
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids
