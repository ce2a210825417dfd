"""Chat templating shared by the reward model and the policy.

The RM and the policy may use different tokenizers and templates: each side renders the prompt
and the response with its *own* tokenizer's chat template. The policy renders the prompt with
its preference prefix; the RM renders the stripped prompt (prefix removed, ``strip_prefix``)
and the response — it re-tokenises the text, it never reuses the policy's token ids.

Prompts may be hh-rlhf transcripts (``"\\n\\nHuman: …\\n\\nAssistant: …\\n\\nHuman: …\\n\\nAssistant:"``):
:func:`to_messages` turns them into one chat message per turn, so a chat template renders a
multi-turn conversation as multi-turn (not as one user message full of ``Human:`` lines). A
preference prefix in front of a transcript goes into the first user turn.

A tokenizer without a template (a base model, or ``model.chat_template=none``) falls back to
plain text: ``prompt \\n response <eos>``, and for a transcript its own format,
``… \\n\\nAssistant: response <eos>``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

# A turn marker of an hh-rlhf transcript: "Human:" / "Assistant:" at the start or after a blank line.
_TURN_RE = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_ROLES = {"Human": "user", "Assistant": "assistant"}


class TemplateError(ValueError):
    """A chat-template choice that cannot be applied; the message names the config field."""


def to_messages(prompt: str) -> list[dict]:
    """Chat messages of a prompt: one user message, or one message per turn of a transcript.

    A transcript is text whose first turn marker is ``Human:`` and whose last marker is an empty
    ``Assistant:`` (an hh-rlhf prompt); that last, empty turn is the generation slot and is not
    a message. Text before the first marker (a preference prefix) joins the first user turn.
    """
    marks = list(_TURN_RE.finditer(prompt))
    if not is_transcript(prompt, marks):
        return [{"role": "user", "content": prompt}]
    head = prompt[: marks[0].start()].strip()
    messages = []
    for m, nxt in zip(marks[:-1], marks[1:]):
        messages.append({"role": _ROLES[m.group(1)], "content": prompt[m.end() : nxt.start()].strip()})
    if head:
        messages[0]["content"] = f"{head}{messages[0]['content']}" if head.endswith(">") else f"{head} {messages[0]['content']}"
    return messages


def is_transcript(prompt: str, marks: list | None = None) -> bool:
    """True for an hh-rlhf style prompt (see :func:`to_messages`)."""
    marks = list(_TURN_RE.finditer(prompt)) if marks is None else marks
    return (
        len(marks) >= 2
        and marks[0].group(1) == "Human"
        and marks[-1].group(1) == "Assistant"
        and not prompt[marks[-1].end() :].strip()
    )


def render_prompt(tokenizer, prompt: str) -> str:
    """The text the policy is conditioned on (generation prompt included)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(to_messages(prompt), tokenize=False, add_generation_prompt=True)
    if is_transcript(prompt):
        return prompt.rstrip()  # ends with "Assistant:"; the response brings its leading space
    return prompt + "\n"


def render_pair(tokenizer, prompt: str, response: str) -> str:
    """Prompt and response as one conversation, ending with the end-of-sequence marker."""
    if getattr(tokenizer, "chat_template", None):
        messages = to_messages(prompt) + [{"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if is_transcript(prompt):
        return prompt.rstrip() + " " + response + (tokenizer.eos_token or "")
    return prompt + "\n" + response + (tokenizer.eos_token or "")


def encode_pair(tokenizer, prompt: str, response: str, max_length: int) -> list[int]:
    """Token ids of the rendered pair, left-truncated so the response end (the RM's read-out
    token) always survives."""
    ids = tokenizer(render_pair(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]
    return ids[-max_length:] if max_length > 0 else ids


def apply_template_choice(tokenizer, choice: str, field: str = "model.chat_template"):
    """Set a tokenizer's chat template from a config value, in place; returns the tokenizer.

    ``''`` keeps the tokenizer's own template, ``none`` removes it (plain-text rendering), any
    other value is a Jinja template file. Saved with the tokenizer, so a trained RM or policy
    keeps the template it was trained with.
    """
    if not choice:
        return tokenizer
    if choice.lower() == "none":
        tokenizer.chat_template = None
        return tokenizer
    path = Path(choice).expanduser()
    if not path.is_file():
        raise TemplateError(f"{field}={choice!r}: expected '', 'none' or a Jinja chat-template file")
    tokenizer.chat_template = path.read_text()
    return tokenizer


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists → (input_ids_BT, attention_mask_BT)."""
    T = max(len(s) for s in seqs)
    ids_BT = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids_BT[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask_BT[b, : len(s)] = 1
    return ids_BT, mask_BT
