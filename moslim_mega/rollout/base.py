"""The rollout seam: what the controller asks of any generation engine (HF now, vLLM later).

Shape legend: B = rows (prompts × n), T = prompt_width + response width (P + R).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import SamplingConfig


class RolloutError(ValueError):
    """Bad arguments to ``generate``; the message names the field."""


@dataclass
class RolloutBatch:
    """Sampled responses for a list of prompts, ``n`` contiguous rows per prompt."""

    prompts: list[str]
    """The prompt text of each row, as given (preference prefix included)."""
    responses: list[str]
    """Decoded response text of each row (special tokens skipped)."""
    prompt_index: list[int]
    """Which input prompt each row came from; rows of prompt i are i*n .. i*n+n-1."""
    input_ids_BT: torch.Tensor
    """Left-padded rendered prompt (P columns) then the response (R columns), pad after EOS."""
    attention_mask_BT: torch.Tensor
    """1 on real prompt tokens and on response tokens up to and including the first EOS."""
    response_mask_BT: torch.Tensor
    """1 only on response tokens up to and including the first EOS."""
    logprobs_BT: torch.Tensor
    """float32 log-prob of each response token under the sampling distribution, 0 elsewhere."""
    prompt_width: int
    """P: the number of (left-padded) prompt columns."""
    finished_B: torch.Tensor
    """bool: the row ended with EOS within max_new_tokens."""

    def __len__(self) -> int:
        return len(self.prompts)


class Generator(Protocol):
    """A rollout engine. ``sync_weights`` pushes the trainer's current weights into the engine."""

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingConfig, seed: int | None = None
    ) -> RolloutBatch: ...

    def sync_weights(self, model) -> None: ...


def check_generate_args(prompts: list[str], n: int, sampling: SamplingConfig) -> None:
    """Validate ``generate``'s inputs (shared by every engine)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise RolloutError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise RolloutError("prompts: the prompt list is empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise RolloutError(f"prompts[{i}]: expected a string, got {type(p).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RolloutError(f"n: samples per prompt must be an integer >= 1, got {n!r}")
    if sampling.temperature < 0:
        raise RolloutError(f"sampling.temperature: must be >= 0 (0 = greedy), got {sampling.temperature}")
    if not 0.0 < sampling.top_p <= 1.0:
        raise RolloutError(f"sampling.top_p: must be in (0, 1], got {sampling.top_p}")
    if sampling.top_k < 0:
        raise RolloutError(f"sampling.top_k: must be >= 0 (0 = off), got {sampling.top_k}")
    if sampling.max_new_tokens < 1:
        raise RolloutError(f"sampling.max_new_tokens: must be >= 1, got {sampling.max_new_tokens}")
