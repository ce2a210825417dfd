"""The rollout seam: what every call site asks of a generation engine (``hf`` or ``vllm``).

A call site renders its prompts to token ids once (:func:`encode_prompts`), so every engine sees
identical inputs, asks the engine for ``n`` samples per prompt, and gets a :class:`RolloutBatch`
built by :func:`assemble_batch` (the one place that lays the tensors out, for every engine).
Engines are made by :func:`moslim_mega.rollout.factory.build_rollout_engine` from the ``rollout``
config section; the trainer pushes its weights with ``update_weights`` (HF names, full tensors,
streamed by :func:`moslim_mega.parallel.export.export_hf_weights`).

Shape legend: B = rows (prompts × n), T = prompt_width + response width (P + R).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Protocol, Sequence

import torch

from ..config import SamplingConfig
from ..data.template import render_prompt


class RolloutError(ValueError):
    """Bad arguments to an engine; the message names the field."""


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

    def to(self, device) -> "RolloutBatch":
        """The batch with its tensors on ``device`` (engines return CPU tensors)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v.to(device)
        return RolloutBatch(**kw)


class RolloutEngine(Protocol):
    """A rollout engine (see ROLLOUT-SEAM contract in the module docstring)."""

    name: str
    """``hf`` or ``vllm``."""

    def generate(self, prompts: list[str], prompt_ids: list[list[int]], n: int, sampling: SamplingConfig,
                 seed: int | None = None) -> RolloutBatch:
        """``n`` samples per prompt; ``logprobs_BT`` = log-prob of each sampled token under the
        distribution it was drawn from (temperature, top-k, top-p applied); greedy: under the
        unscaled softmax."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Full tensors with HF parameter names (possibly a stream, consumed once)."""
        ...

    def sleep(self, level: int = 1) -> None:
        """Free memory while the trainer runs (a no-op where the platform cannot; recorded)."""
        ...

    def wake_up(self) -> None: ...

    def close(self) -> None:
        """Release the engine (vLLM: shut the in-process engine down, free its KV cache); whoever
        built the engine calls it once, at the end of its run. The engine is unusable afterwards."""
        ...


def check_generate_args(prompts: list[str], n: int, sampling: SamplingConfig,
                        prompt_ids: Sequence[Sequence[int]] | None = None) -> None:
    """Validate ``generate``'s inputs (shared by every engine)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise RolloutError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise RolloutError("prompts: the prompt list is empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise RolloutError(f"prompts[{i}]: expected a string, got {type(p).__name__}")
    if prompt_ids is not None:
        if len(prompt_ids) != len(prompts):
            raise RolloutError(f"prompt_ids: {len(prompt_ids)} id lists for {len(prompts)} prompts")
        for i, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise RolloutError(f"prompt_ids[{i}]: empty (prompt {prompts[i]!r})")
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


def eos_and_pad(tokenizer) -> tuple[int, int]:
    """(eos_id, pad_id) of a tokenizer; pad falls back to EOS. No EOS → RolloutError."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise RolloutError("tokenizer.eos_token_id: the tokenizer has no EOS token; responses could never end")
    return eos_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt rendered with the chat template and tokenised (no extra specials: the template
    has them). Rendered once here, so every engine sees identical ids."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise RolloutError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
    seqs = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise RolloutError(f"prompts[{i}]: expected a string, got {type(p).__name__}")
        ids = tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
        if not ids:
            raise RolloutError(f"prompts[{i}]: {p!r} renders to zero tokens")
        seqs.append(list(ids))
    return seqs


def generate_texts(engine: RolloutEngine, tokenizer, prompts: list[str], n: int, sampling: SamplingConfig,
                   seed: int | None = None) -> RolloutBatch:
    """Render + generate: what most call sites want."""
    return engine.generate(prompts, encode_prompts(tokenizer, prompts), n, sampling, seed=seed)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists → (ids_BP, mask_BP): decoder-only generation continues from the last column."""
    P = max(len(s) for s in seqs)
    ids_BP = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(seqs), P), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids_BP[b, P - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask_BP[b, P - len(s) :] = 1
    return ids_BP, mask_BP


def cut_at_eos(ids: Sequence[int], logprobs: Sequence[float], eos_id: int) -> tuple[list[int], list[float], bool]:
    """The response up to and including its first EOS (pad may equal EOS, so "first" matters)."""
    ids = [int(t) for t in ids]
    if eos_id in ids:
        k = ids.index(eos_id) + 1
        return ids[:k], [float(x) for x in logprobs[:k]], True
    return ids, [float(x) for x in logprobs[: len(ids)]], False


def assemble_batch(prompts: list[str], n: int, prompt_ids: list[list[int]], response_ids: list[Sequence[int]],
                   response_logprobs: list[Sequence[float]], eos_id: int, pad_id: int, tokenizer) -> RolloutBatch:
    """The left-padded :class:`RolloutBatch` (CPU tensors) from per-row unpadded responses.

    Rows are prompt-major (``n`` contiguous rows per prompt); each response is kept up to and
    including its first EOS, its log-probs alike; R = the longest kept response, shorter rows are
    right-padded with ``pad_id`` (log-prob 0, masks 0).
    """
    B = len(prompts) * n
    if len(prompt_ids) != len(prompts) or len(response_ids) != B or len(response_logprobs) != B:
        raise RolloutError(f"assemble_batch: {len(prompts)} prompts × n={n} need {B} responses, got "
                           f"{len(response_ids)} responses, {len(response_logprobs)} log-prob rows and "
                           f"{len(prompt_ids)} prompt id lists")
    kept = [cut_at_eos(r, lp, eos_id) for r, lp in zip(response_ids, response_logprobs)]
    for b, (ids, lps, _) in enumerate(kept):
        if len(lps) != len(ids):
            raise RolloutError(f"assemble_batch: row {b} has {len(ids)} tokens but {len(lps)} log-probs")
    ids_BP, mask_BP = left_pad([prompt_ids[b // n] for b in range(B)], pad_id)
    R = max(1, max(len(ids) for ids, _, _ in kept))
    resp_BR = torch.full((B, R), pad_id, dtype=torch.long)
    keep_BR = torch.zeros((B, R), dtype=torch.long)
    logp_BR = torch.zeros((B, R), dtype=torch.float32)
    for b, (ids, lps, _) in enumerate(kept):
        resp_BR[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        keep_BR[b, : len(ids)] = 1
        logp_BR[b, : len(ids)] = torch.tensor(lps, dtype=torch.float32)
    zeros_BP = torch.zeros_like(mask_BP)
    return RolloutBatch(
        prompts=[p for p in prompts for _ in range(n)],
        responses=[tokenizer.decode(ids, skip_special_tokens=True) for ids, _, _ in kept],
        prompt_index=[i for i in range(len(prompts)) for _ in range(n)],
        input_ids_BT=torch.cat([ids_BP, resp_BR], dim=1),
        attention_mask_BT=torch.cat([mask_BP, keep_BR], dim=1),
        response_mask_BT=torch.cat([zeros_BP, keep_BR], dim=1),
        logprobs_BT=torch.cat([zeros_BP.float(), logp_BR], dim=1),
        prompt_width=ids_BP.shape[1],
        finished_B=torch.tensor([done for _, _, done in kept], dtype=torch.bool),
    )
