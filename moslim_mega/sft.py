"""Supervised warm start of the policy on prefix-free ``{"prompt", "response"}`` records.

The stand-in for an off-the-shelf SFT checkpoint (the paper starts from one). The loss is
token-level cross-entropy on the response tokens only (EOS included): the prompt conditions the
model but is not a target. The result is a standard HF directory ``out_dir/model`` that
``models.build.load_policy`` (or ``AutoModelForCausalLM.from_pretrained``) reads back.

Shape legend: B = sequences in a batch, T = tokens, V = vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .algos.logprob import sequence_logprobs
from .config import Config, KernelsConfig, save_config
from .data.template import pad_batch, render_pair, render_prompt
from .models.build import build_causal_lm, build_tokenizer
from .prefs import spec_from_config
from .reward.data import RecordError, check_prompt_response, read_jsonl
from .checkpoint.hooks import StageCheckpoints
from .checkpoint.state import write_model_assets
from .utils.optim import Updater
from .utils.logging import MetricsWriter
from .utils.seed import seed_everything
from .parallel.parallelize import parallelize_policy
from .parallel.stage import Stage
from .profile import Profiler, model_flops
from .engine import build_engine, micro_batch_count, split_rows
from .engine.base import LogprobOut
from .training.loop import TrainLoop, loop_config

IGNORE = -100
"""Label of tokens that carry no loss (prompt and padding); F.cross_entropy's ignore_index."""


@dataclass
class SFTExamples:
    """A tokenised SFT set: the rendered pair's ids and how many of them are prompt."""

    input_ids: list[list[int]]
    prompt_lens: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, idx: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded (ids_BT, mask_BT, labels_BT); labels are IGNORE on prompt and padding."""
        ids_BT, mask_BT = pad_batch([self.input_ids[i] for i in idx], pad_id)
        labels_BT = ids_BT.masked_fill(mask_BT == 0, IGNORE)
        for b, i in enumerate(idx):
            labels_BT[b, : self.prompt_lens[i]] = IGNORE
        return ids_BT, mask_BT, labels_BT


def parse_sft_record(rec, where: str) -> tuple[str, str]:
    """Validate one record → (prompt, response); RecordError names file:line and field."""
    check_prompt_response(rec, where)
    return rec["prompt"], rec["response"]


def encode_sft_example(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], int]:
    """(ids of the rendered pair, number of prompt tokens), truncated to ``max_length`` (0 = off).

    The prompt is cut from the left first (keeping one token, which predicts the response's first
    token); only a response longer than that is cut at its end.
    """
    ids = tokenizer(render_pair(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    # The loss mask relies on the rendered prompt tokenising to a prefix of the rendered pair.
    assert ids[: len(prompt_ids)] == prompt_ids, "render_prompt does not tokenise to a prefix of render_pair"
    prompt_len = len(prompt_ids)
    if max_length > 0 and len(ids) > max_length:
        cut = min(len(ids) - max_length, max(0, prompt_len - 1))
        ids, prompt_len = ids[cut:][:max_length], prompt_len - cut
    return ids, prompt_len


def load_sft_examples(path, tokenizer, max_length: int) -> SFTExamples:
    ids, prompt_lens = [], []
    for where, rec in read_jsonl(path):
        prompt, response = parse_sft_record(rec, where)
        seq, n_prompt = encode_sft_example(tokenizer, prompt, response, max_length)
        if n_prompt >= len(seq):
            raise RecordError(f"{where}: field 'response': no response token left within sft.max_length={max_length}")
        ids.append(seq)
        prompt_lens.append(n_prompt)
    if not ids:
        raise RecordError(f"{path}: no records")
    return SFTExamples(ids, prompt_lens)


def sft_loss(model, ids_BT: torch.Tensor, mask_BT: torch.Tensor, labels_BT: torch.Tensor,
             kernels: KernelsConfig | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) tokens, in float32.

    It is −mean log p(token) from the fused linear → log-prob (issue 7; Triton on CUDA), so the
    B×T×V logits never exist — under tensor parallel not even this rank's vocabulary slice.
    Labelled tokens are attended ones of right-padded rows (``SFTExamples.batch``).
    """
    kc = kernels or KernelsConfig()
    logp_BT, _ = sequence_logprobs(model, ids_BT, mask_BT, chunk_size=kc.logprob_chunk, impl=kc.impl)
    return sft_token_loss(logp_BT, mask_BT, labels_BT)


def sft_token_loss(logp_BT: torch.Tensor, mask_BT: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """−mean log p over the labelled tokens, from the token log-probs (``sequence_logprobs``)."""
    return -logp_BT[_scored_labels(mask_BT, labels_BT)].mean()


def sft_token_loss_sum(logp_BT: torch.Tensor, mask_BT: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """−Σ log p over the labelled tokens (0 for no rows): one micro-batch's part of a token mean."""
    return -logp_BT[_scored_labels(mask_BT, labels_BT)].sum()


def _scored_labels(mask_BT: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    keep_BT = labels_BT != IGNORE
    keep_BT[:, 0] = False  # column 0 is never a target
    # A labelled token needs itself and its context token attended, else its log-prob is the
    # 0 of "no prediction" and would dilute the mean.
    scored_BT = torch.zeros_like(keep_BT)
    scored_BT[:, 1:] = (mask_BT[:, 1:] != 0) & (mask_BT[:, :-1] != 0)
    if bool((keep_BT & ~scored_BT).any()):
        b, t = (keep_BT & ~scored_BT).nonzero()[0].tolist()
        raise ValueError(f"labels_BT[{b}, {t}]: a labelled token without an attended predecessor (mask_BT)")
    return keep_BT


def train_sft(cfg: Config, data_path, out_dir, show_progress: bool = True) -> dict:
    """Fine-tune ``cfg.sft.model`` on ``data_path``; save ``out_dir/model``; return a summary."""
    out = Path(out_dir)
    stage = Stage(cfg.parallel, cfg.run.device)  # inert in one process; the mesh and dp shard under torchrun
    prof = Profiler(cfg.profile, "sft", stage, out)
    out.mkdir(parents=True, exist_ok=True)
    if stage.is_main:
        save_config(cfg, out)
    seed_everything(cfg.run.seed, cfg.run.num_threads)
    # The world tokenizer gets the spec's dimension names, so the policy can read every prefix.
    tokenizer = build_tokenizer(cfg.sft.model, spec_from_config(cfg.prefs).names)
    data = load_sft_examples(data_path, tokenizer, cfg.sft.max_length)
    model = stage.build(lambda: build_causal_lm(cfg.sft.model, tokenizer, cfg.run.seed), _causal_lm_skeleton,
                        parallelize_policy)
    writer = stage.writer(lambda: MetricsWriter(out, tensorboard=cfg.run.tensorboard))
    try:
        result = train_sft_loop(cfg, model, data, tokenizer.pad_token_id, writer, show_progress, out, tokenizer,
                                stage, prof)
        writer.write(result["steps"], {k: v for k, v in result.items() if k != "steps"}, tag="final")
    finally:
        writer.close()
    model_dir = out / "model"
    full = stage.full_model(model, _causal_lm_skeleton)
    if stage.is_main:
        full.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
    stage.barrier()
    prof.mark("checkpoint")
    prof.write(out / "profile.json")
    return {**result, "model_dir": str(model_dir)}


def _causal_lm_skeleton(config):
    return AutoModelForCausalLM.from_config(config)


def train_sft_loop(cfg: Config, model, data: SFTExamples, pad_id: int, writer: MetricsWriter, show_progress: bool,
                   out=None, tokenizer=None, stage: Stage | None = None, prof: Profiler | None = None) -> dict:
    """Fine-tune ``model`` in place on tokenised ``data`` with ``cfg.sft``'s schedule; a summary dict.

    :func:`train_sft`'s loop, public for callers that bring their own model and examples (DPA's
    RSF iterations). With ``out`` it checkpoints and resumes there; without, neither."""
    stage = stage or Stage(cfg.parallel, cfg.run.device)
    prof = prof or Profiler(dataclasses.replace(cfg.profile, enabled=False), "sft")  # callers that write none
    flops = model_flops(model)
    sc = cfg.sft
    # Under pp (or the megatron backend) the model is a skeleton whose engine places the weights:
    # batches go to the stage's device.
    device = stage.device if stage.skeleton else next(model.parameters()).device
    steps_per_epoch = math.ceil(len(data) / sc.batch_size)
    total_steps = max(1, math.ceil(sc.epochs * steps_per_epoch))
    optim = dict(lr=sc.lr, weight_decay=sc.weight_decay, warmup_steps=sc.warmup_steps, grad_clip=sc.grad_clip,
                 total_steps=total_steps)
    engine = build_engine(cfg.parallel, lambda: model, lambda m: Updater(m.parameters(), **optim), "causal_lm", "model",
                          stage=stage, optim=optim, label="sft", kernels=cfg.kernels,
                          init_dir=Path(out) / "megatron_init" if out else None)
    n_micro = micro_batch_count(cfg.parallel)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    model.train()
    order: list[int] = []
    recent: list[float] = []
    ckpt = StageCheckpoints(cfg.checkpoint, out, *engine.checkpoint_items(), writer,
                            lambda d: write_model_assets(d, "model", "causal_lm", model, tokenizer)) if out else None
    loop = TrainLoop(loop_config("sft", total_steps, sc, "sft", show_progress), stage, writer, ckpt, prof)

    def load_state(state: dict) -> None:
        nonlocal order, recent
        order, recent = state["order"], state["recent"]
        gen.set_state(state["gen"])
        engine.load_scheduler_state(state["sched"])

    def body(step: int) -> dict:
        nonlocal order, recent
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(data), generator=gen).tolist()
        i0 = (step % steps_per_epoch) * sc.batch_size
        batch = data.batch(stage.shard(order[i0 : i0 + sc.batch_size]), pad_id)
        ids_BT, mask_BT, labels_BT = (t.to(device) for t in batch)
        prof.add_tokens(batch[1].sum())  # counted on the CPU copy: no device sync
        prof.add_flops(batch[1], flops, train=True, label="train")
        prof.mark("data")
        # A token mean over this rank's response tokens → its share of the global token mean.
        tokens = (labels_BT[:, 1:] != IGNORE).sum()
        scale = stage.dp_loss_scale(tokens.reshape(1))[0] if stage.distributed else None
        micro = split_rows({"ids_BT": ids_BT, "mask_BT": mask_BT, "labels_BT": labels_BT}, n_micro)
        res = engine.train_step(micro, partial(_sft_micro_loss, scale=scale, shard_tokens=tokens, n_micro=n_micro),
                                step)
        recent = (recent + [stage.sum_dp(res["loss"]) / stage.dp if stage.distributed else res["loss"]])[-10:]
        prof.mark("forward_backward_step")
        return {"loss": recent[-1], "lr": res["lr"], "grad_norm": res["grad_norm"]}

    first = loop.resume(load_state)
    result = loop.run(first, body, lambda: {"order": order, "recent": recent, "gen": gen.get_state(),
                                            "sched": engine.scheduler_state()},
                      postfix=lambda row: {"loss": f"{row['loss']:.3f}"})
    model.eval()
    # Mean of the last (up to) 10 steps: a single mini-batch loss is too noisy to compare runs.
    return {"final_loss": sum(recent) / len(recent), **result}


def _sft_micro_loss(out: LogprobOut, micro: dict, scale: torch.Tensor | None, shard_tokens: torch.Tensor,
                    n_micro: int) -> tuple[torch.Tensor, dict]:
    """The engine's loss function: the token-mean SFT loss (× the dp share under torchrun).

    With several micro-batches (pipeline) each one's loss is its tokens' sum over the dp shard's
    tokens, so the micro losses add up to the shard's token mean (an empty micro-batch adds 0); its
    log row is × ``n_micro``, as the engine logs the mean of the rows."""
    if n_micro == 1:
        loss = sft_token_loss(out.logp_BT, micro["mask_BT"], micro["labels_BT"])
    else:
        loss = sft_token_loss_sum(out.logp_BT, micro["mask_BT"], micro["labels_BT"]) / shard_tokens.clamp(min=1)
    logged = loss.item() * n_micro
    if scale is not None:
        loss = loss * scale
    return loss, {"loss": logged if n_micro > 1 else loss.item()}
