"""Chat templating shared by the reward model and the policy.

The RM and the policy may use different tokenizers and templates: each side renders the
(stripped) prompt and the response with its *own* tokenizer's chat template. A tokenizer
without a template (a base model) falls back to ``prompt \\n response <eos>``.
"""

from __future__ import annotations

import torch


def render_prompt(tokenizer, prompt: str) -> str:
    """The text the policy is conditioned on (generation prompt included)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


def render_pair(tokenizer, prompt: str, response: str) -> str:
    """Prompt and response as one conversation, ending with the end-of-sequence marker."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
    return prompt + "\n" + response + (tokenizer.eos_token or "")


def encode_pair(tokenizer, prompt: str, response: str, max_length: int) -> list[int]:
    """Token ids of the rendered pair, left-truncated so the response end (the RM's read-out
    token) always survives."""
    ids = tokenizer(render_pair(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]
    return ids[-max_length:] if max_length > 0 else ids


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists → (input_ids_BT, attention_mask_BT)."""
    T = max(len(s) for s in seqs)
    ids_BT = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids_BT[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask_BT[b, : len(s)] = 1
    return ids_BT, mask_BT
