"""Answers from a local HF causal LM for single- and multi-turn conversations.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}`` ending with
a user turn. Tokenizers with a chat template render it with ``apply_chat_template``; a base model
(no template) gets an hh-rlhf style transcript. The rendered ids go to a rollout engine from
:func:`~moslim_mega.rollout.build_rollout_engine` (``rollout.engine``: hf or vllm), as every other
sampler of the repo. One path cannot: ``chat_detailed(top_logprobs=k)`` (the server's ``logprobs``
field) needs each step's raw distribution and its top-k alternatives, which the seam does not
return (it gives the sampled token's processed log-prob only), so it runs HF ``generate`` on the
same module with the engine's explicit :func:`~moslim_mega.rollout.hf.build_generation_config`
(a checkpoint's own generation_config cannot change the decoding silently).

Shape legend: B = conversations in a batch, P = prompt columns (left-padded), R = new tokens.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..config import RolloutConfig, SamplingConfig
from ..rollout import build_rollout_engine
from ..rollout.hf import build_generation_config, left_pad

ROLES = ("system", "user", "assistant")


class ConversationError(ValueError):
    """A malformed conversation; the message names its index and turn."""


def check_conversation(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f"{where}: expected a non-empty list of messages")
    for t, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ConversationError(f"{where}[{t}]: expected {{role: system|user|assistant, content: str}}, got {m!r}")
    if messages[-1]["role"] != "user":
        raise ConversationError(f"{where}: the last message must be a user turn, got {messages[-1]['role']!r}")


def render_conversation(tokenizer, messages: list[dict]) -> str:
    """The text the model continues from (generation prompt included)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # No template (a base model): the hh-rlhf transcript format, which base models continue well.
    parts = []
    for m in messages:
        tag = {"system": "", "user": "\n\nHuman: ", "assistant": "\n\nAssistant: "}[m["role"]]
        parts.append(tag + m["content"])
    return "".join(parts) + "\n\nAssistant:"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ChatModel:
    """A HF causal LM answering conversations; thread-safe (one generate at a time).

    ``rollout``/``model_dir``: which engine samples (default ``hf`` on ``model``; ``vllm`` loads
    ``model_dir``)."""

    def __init__(self, model, tokenizer, name: str = "local", rollout: RolloutConfig | None = None, model_dir=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ConversationError("tokenizer.eos_token_id: the tokenizer has no EOS token; answers could never end")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_positions = int(limit) if limit else None
        self.num_truncated = 0
        """Prompts cut from the left to fit the context window (reported by the suites)."""
        self._lock = threading.Lock()
        self.engine = build_rollout_engine(rollout or RolloutConfig(), model=self.model, tokenizer=tokenizer,
                                           model_dir=model_dir)

    @classmethod
    def from_dir(cls, path, device: str | None = None, rollout: RolloutConfig | None = None) -> "ChatModel":
        """Load a HF directory; on the GPU when there is one (``device=None``)."""
        from ..models.build import load_policy

        model, tokenizer = load_policy(path)
        return cls(model.to(device or default_device()), tokenizer, name=str(path), rollout=rollout, model_dir=path)

    def close(self) -> None:
        """Release the rollout engine (vLLM: shut the in-process engine down)."""
        self.engine.close()

    def _encode(self, conversations: list[list[dict]], max_new_tokens: int) -> list[list[int]]:
        seqs = []
        for i, msgs in enumerate(conversations):
            check_conversation(msgs, f"conversations[{i}]")
            ids = self.tokenizer(render_conversation(self.tokenizer, msgs), add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConversationError(f"conversations[{i}]: renders to zero tokens")
            if self.max_positions and len(ids) + max_new_tokens > self.max_positions:
                # Keep the end: it holds the latest turn and the generation prompt.
                keep = max(self.max_positions - max_new_tokens, 1)
                ids = ids[-keep:]
                self.num_truncated += 1
            seqs.append(ids)
        return seqs

    def chat(
        self,
        conversations: list[list[dict]],
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        batch_size: int = 8,
    ) -> list[str]:
        """One answer per conversation (special tokens skipped, surrounding space stripped)."""
        return [d.text for d in self.chat_detailed(conversations, max_new_tokens, temperature, seed, batch_size)]

    @torch.no_grad()
    def chat_detailed(
        self,
        conversations: list[list[dict]],
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        batch_size: int = 8,
        top_logprobs: int | None = None,
    ) -> list["Answer"]:
        """Answers with token counts and whether each ended with EOS (the server's usage fields).

        ``top_logprobs`` not None: each answer also carries, per generated token (EOS excluded), its
        log-probability and the ``top_logprobs`` most likely alternatives under the model's own
        distribution (raw logits: before temperature, as vLLM's default ``raw_logprobs``)."""
        if max_new_tokens < 1:
            raise ConversationError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ConversationError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
        sampling = SamplingConfig(temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens)
        answers: list[Answer] = []
        with self._lock:
            seqs = self._encode(conversations, max_new_tokens)
            for start in range(0, len(seqs), max(batch_size, 1)):
                chunk = seqs[start : start + max(batch_size, 1)]
                chunk_seed = None if seed is None else seed + start
                if top_logprobs is None:
                    answers += self._engine_answers(chunk, sampling, chunk_seed)
                else:
                    answers += self._hf_answers_with_logprobs(chunk, sampling, chunk_seed, top_logprobs)
        return answers

    def _engine_answers(self, chunk: list[list[int]], sampling: SamplingConfig, seed: int | None) -> list["Answer"]:
        """One chunk through the rollout engine (rendered ids in, texts and token counts out)."""
        batch = self.engine.generate([self.tokenizer.decode(ids) for ids in chunk], chunk, 1, sampling, seed=seed)
        lengths = batch.response_mask_BT.sum(1).tolist()  # response tokens, EOS included when it ended
        return [Answer(text.strip(), len(ids), int(n), bool(done))
                for ids, text, n, done in zip(chunk, batch.responses, lengths, batch.finished_B.tolist())]

    def _hf_answers_with_logprobs(self, chunk: list[list[int]], sampling: SamplingConfig, seed: int | None,
                                  top_logprobs: int) -> list["Answer"]:
        """HF generate for the top-k log-prob path (see the module docstring for why not the engine)."""
        gen_cfg = build_generation_config(sampling, self.eos_id, self.pad_id)
        gen_cfg.output_scores = False  # the processed scores are never needed here
        gen_cfg.output_logits = True
        device = next(self.model.parameters()).device
        ids_BP, mask_BP = left_pad(chunk, self.pad_id)
        if seed is not None:
            torch.manual_seed(seed)
        out = self.model.generate(input_ids=ids_BP.to(device), attention_mask=mask_BP.to(device),
                                  generation_config=gen_cfg)
        resp_BR = out.sequences[:, ids_BP.shape[1] :].cpu()
        answers: list[Answer] = []
        for b, (prompt_ids, row) in enumerate(zip(chunk, resp_BR.tolist())):
            finished = self.eos_id in row
            if finished:
                row = row[: row.index(self.eos_id)]
            text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
            answer = Answer(text, len(prompt_ids), len(row) + int(finished), finished)
            answer.tokens = self._token_logprobs(out.logits, b, row, top_logprobs)
            answers.append(answer)
        return answers

    def _token_logprobs(self, logits, b: int, row: list[int], k: int) -> list["TokenLogprob"]:
        """Per generated token of batch row ``b``: (id, logprob, top-k [(id, logprob)])."""
        out = []
        for t, token_id in enumerate(row):
            logp_V = torch.log_softmax(logits[t][b].float(), -1).cpu()
            top = torch.topk(logp_V, k) if k > 0 else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            out.append(TokenLogprob(token_id, float(logp_V[token_id]), alts))
        return out


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list
    """The most likely tokens at this step as (token id, logprob), best first."""


@dataclass
class Answer:
    text: str
    num_prompt_tokens: int
    num_completion_tokens: int
    finished: bool
    """Ended with EOS (False: cut at max_new_tokens)."""
    tokens: list[TokenLogprob] | None = None
    """Per-token logprobs, when asked for (``chat_detailed(top_logprobs=...)``)."""
