"""RLOO side by side: ``moslim policy train`` and TRL's ``RLOOTrainer`` on one workload (issue 15, item 5).

Both tools train the same policy (the embedded world's SFT, or a random Qwen2-shaped model) against
the same reward: this project's multi-head RM + Eq. 11 mapping (``RewardWorker.score``), which TRL
calls as a reward function on the decoded completions. Prompts, samples per prompt, new tokens,
sampling, learning rate and schedule, KL coefficient and estimator, clipping, batch / micro-batch,
epochs, precision and threads are set to the same values (``check_trl_matched`` reads them back
from the constructed TRL trainer and fails on any difference); what cannot be made equal is listed
in ``MISMATCHES`` and in the JSON.

Each side runs in its own subprocess (so peak memory does not mix), ``--repeats`` times,
alternating which side goes first; per run, the first ``--warmup`` steps are not timed and the last
step is dropped (its interval holds end-of-run work: moslim saves the policy). Per step each side
records wall time and the time spent in

* generation  — tokenise + HF ``generate`` (KV cache) + decode (moslim: its ``generation`` phase;
  TRL: ``RLOOTrainer._generate``),
* scoring     — RM reward, old and reference log-probs, advantages (moslim: ``reward`` +
  ``ref_old_logprobs`` + ``advantages``; TRL: the rest of ``_generate_and_score_completions``),
* update      — policy forward + backward + clip + optimizer step (moslim: ``actor_update``; TRL:
  ``training_step`` minus ``_prepare_inputs``, plus the clip and ``optimizer.step``),

read from moslim's own ``Profiler`` phase boundaries (the numbers ``profile.json`` sums) and from
wrappers around TRL's methods. Reported: median seconds per step, rollout tokens/s (generated
tokens / generation seconds), update tokens/s (prompt + response tokens trained on / update
seconds), peak memory (CPU: peak RSS of the process; CUDA: ``max_memory_allocated``), and the ratio
TRL / moslim of each.

    python benchmarks/trl_rloo_side_by_side.py --out benchmarks/results/trl_rloo_cpu.json

On a GPU: ``--model qwen2-0.5b-random`` (Qwen2-0.5B shapes, random weights, the world tokenizer
padded to Qwen2's 151,936-token vocabulary, bf16, a larger batch). TRL is a benchmark dependency:
``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: import this checkout's moslim_mega
    sys.path.insert(0, str(REPO))

SIDES = ("moslim", "trl")
SCHEMA = 1
QWEN2_VOCAB = 151936


class BenchError(ValueError):
    """A benchmark setting or result that is not usable; the message names the field."""


# ---- the workload ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """Everything both tools are told; one value per knob, so they cannot drift apart."""

    policy: str  # HF directory of the starting policy
    rm_dir: str  # trained multi-head RM
    prompts: str  # jsonl of prefixed prompts
    steps: int = 24  # rollout → update iterations per run (warm-up and the dropped last step included)
    warmup: int = 3  # untimed first steps
    prompts_per_step: int = 16
    samples_per_prompt: int = 4
    max_new_tokens: int = 10
    temperature: float = 1.0
    lr: float = 5e-4
    kl_coef: float = 0.02
    clip_range: float = 0.2
    grad_clip: float = 1.0
    micro_batch_size: int = 64  # sequences per forward/backward; the optimizer steps once per rollout batch
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def rows(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    def validate(self) -> "Workload":
        if self.samples_per_prompt < 2:
            raise BenchError(f"samples_per_prompt={self.samples_per_prompt}: RLOO needs at least 2")
        if self.micro_batch_size < 1 or self.rows % self.micro_batch_size:
            raise BenchError(f"micro_batch_size={self.micro_batch_size}: must divide prompts_per_step × "
                             f"samples_per_prompt = {self.rows} (TRL accumulates whole micro-batches)")
        if self.steps < self.warmup + 2:
            raise BenchError(f"steps={self.steps}: need at least warmup + 2 = {self.warmup + 2} "
                             "(one timed step, and the last step is dropped)")
        if self.dtype not in ("float32", "bfloat16"):
            raise BenchError(f"dtype={self.dtype!r}: expected float32 or bfloat16")
        if self.device not in ("cpu", "cuda"):
            raise BenchError(f"device={self.device!r}: expected cpu or cuda")
        for name in ("policy", "rm_dir", "prompts"):
            if not Path(getattr(self, name)).exists():
                raise BenchError(f"{name}={getattr(self, name)!r}: does not exist")
        return self


def moslim_overrides(w: Workload) -> list[str]:
    """The ``moslim policy train`` config of the workload (every knob pinned, not left to defaults)."""
    return [
        f"policy.init={w.policy}", f"policy.rm_dir={w.rm_dir}", f"policy.prompts={w.prompts}",
        "policy.algo=rloo", f"policy.steps={w.steps}",
        f"policy.prompts_per_step={w.prompts_per_step}", f"policy.samples_per_prompt={w.samples_per_prompt}",
        f"policy.lr={w.lr}", "policy.weight_decay=0.0", "policy.warmup_steps=0", f"policy.grad_clip={w.grad_clip}",
        "policy.update_epochs=1", f"policy.mini_batch_size={w.rows}", f"policy.micro_batch_size={w.micro_batch_size}",
        f"policy.clip_range={w.clip_range}", "policy.entropy_coef=0.0", "policy.whiten_advantages=true",
        f"policy.kl_coef={w.kl_coef}", "policy.kl_estimator=k1", "policy.kl_in_reward=true", "policy.adaptive_kl=false",
        "policy.eval_every=0", "policy.save_every=0", "policy.max_minutes=0",
        f"sampling.temperature={w.temperature}", "sampling.top_p=1.0", "sampling.top_k=0",
        f"sampling.max_new_tokens={w.max_new_tokens}",
        f"run.seed={w.seed}", f"run.num_threads={w.threads}", f"run.device={w.device}", "run.tensorboard=false",
        "checkpoint.every=0", "checkpoint.resume=never", "profile.enabled=true",
    ]


def trl_config_kwargs(w: Workload, out_dir: str) -> dict:
    """RLOOConfig arguments of the workload. TRL counts batches in completions: one generation batch
    of P×K rows per optimizer step, accumulated over micro-batches (steps_per_generation = GA)."""
    accumulation = w.rows // w.micro_batch_size
    return dict(
        output_dir=out_dir, max_steps=w.steps, seed=w.seed, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, use_cpu=w.device == "cpu", dataloader_num_workers=0,
        per_device_train_batch_size=w.micro_batch_size, gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation, num_generations=w.samples_per_prompt, num_iterations=1,
        max_completion_length=w.max_new_tokens, temperature=w.temperature, top_p=1.0, top_k=0, min_p=None,
        repetition_penalty=1.0, learning_rate=w.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=w.grad_clip, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, beta=w.kl_coef, epsilon=w.clip_range, normalize_advantages=True,
        mask_truncated_completions=False, bf16=w.dtype == "bfloat16", fp16=False, gradient_checkpointing=False,
        disable_dropout=True, remove_unused_columns=False, log_completions=False, shuffle_dataset=True,
        model_init_kwargs={"dtype": w.dtype},
    )


# Differences between the two runs that no setting removes (also written into the JSON).
MISMATCHES = [
    "Policy-gradient loss: moslim clips a per-token ratio and takes the token mean (PPO-style RLOO, as "
    "OpenRLHF/verl); TRL's RLOOTrainer clips one sequence-level ratio (sum of token log-probs) and takes the "
    "mean over sequences. Same forward/backward passes, different gradient.",
    "Prompt order: moslim draws prompts_per_step prompts with replacement from its own RNG; TRL's RepeatSampler "
    "walks a shuffled permutation of the data set. Same prompt pool and batch size, different prompts per step, "
    "so response lengths differ per step: compare tokens/s, and the mean response length is reported per side.",
    "Rollout log-probs: moslim asks generate() for output_scores and takes a log-softmax per generated token "
    "(the sampler's log-probs; RLOO does not use them, it recomputes old log-probs); TRL does not.",
    "Log-prob forwards: moslim's sequence_logprobs projects every attended position (prompt and response) "
    "through the LM head in vocabulary chunks; TRL's fused LM head projects only completion positions "
    "(logits_to_keep), in tiles. Both run the backbone over the whole sequence.",
    "Advantage whitening: std + 1e-8 (moslim) vs std + 1e-4 (TRL).",
    "Micro-batch weighting: moslim weights each micro-batch by its share of the mini-batch's response tokens; "
    "TRL divides each micro-batch's sequence mean by the accumulation steps (equal when micro = mini, the default here).",
    "Reference model: moslim deep-copies the loaded policy; TRL loads a second copy from the same directory.",
    "Bookkeeping: moslim writes one metrics.jsonl row per step (TensorBoard off); TRL logs every step "
    "(logging_steps=1, report_to=none) and its Trainer tracks FLOPs and input tokens.",
    "Process footprint: the TRL process also imports trl, accelerate and datasets, so its baseline RSS is larger "
    "(rss_at_train_start is reported next to the peak).",
]


# ---- per-step timing -----------------------------------------------------------------------------
@dataclass
class StepLog:
    """Per-step snapshots of cumulative phase seconds and token counters, taken at each step start."""

    marks: list = field(default_factory=list)  # (perf_counter, cpu seconds, {phase: seconds}, {counter: n})
    rss_at_start: int = 0

    def snap(self, phases: dict, counters: dict) -> None:
        if not self.marks:
            self.rss_at_start = current_rss()
        self.marks.append((time.perf_counter(), cpu_seconds(), dict(phases), dict(counters)))

    def steps(self) -> list[dict]:
        out = []
        for (t0, u0, p0, c0), (t1, u1, p1, c1) in zip(self.marks, self.marks[1:]):
            row = {"seconds": t1 - t0, "cpu_seconds": u1 - u0}
            row.update({k: p1.get(k, 0.0) - p0.get(k, 0.0) for k in set(p0) | set(p1)})
            row.update({k: c1.get(k, 0) - c0.get(k, 0) for k in set(c0) | set(c1)})
            out.append(row)
        return out


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads): on a shared machine the work
    done, which waiting for a core does not inflate the way it inflates wall time."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def current_rss() -> int:
    """Resident set size now, bytes (Linux /proc; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_memory(device: str) -> dict:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    cuda = torch.cuda.max_memory_allocated() if device == "cuda" and torch.cuda.is_available() else None
    return {"peak_rss_bytes": int(rss), "cuda_max_allocated_bytes": cuda}


# ---- moslim side -------------------------------------------------------------------------------
MOSLIM_PHASES = {"generation": ("generation",), "scoring": ("reward", "ref_old_logprobs", "advantages"),
                 "update": ("actor_update",)}


def run_moslim(w: Workload, out_dir: Path) -> dict:
    """``moslim policy train`` (the CLI's own entry point, in this process) with the Profiler's phase
    boundaries snapshotted at every step start, so each step's phases are known, not only the totals."""
    from moslim_mega import profile
    from moslim_mega.cli import main as cli_main

    log = StepLog()
    orig_step = profile.Profiler.step

    def step(self, i):
        log.snap(self.phases, self.counters)
        return orig_step(self, i)

    profile.Profiler.step = step
    try:
        rc = cli_main(["policy", "train", "--out", str(out_dir), *moslim_overrides(w)])
    finally:
        profile.Profiler.step = orig_step
    if rc != 0:
        raise BenchError(f"moslim policy train exited with status {rc}")
    steps = []
    for row in log.steps():
        out = {k: sum(row.get(p, 0.0) for p in ps) for k, ps in MOSLIM_PHASES.items()}
        out.update(seconds=row["seconds"], cpu_seconds=row["cpu_seconds"],
                   generated_tokens=int(row.get("generated_tokens", 0)),
                   update_tokens=int(row.get("tokens", 0)))  # update_epochs=1: each attended token trained once
        steps.append(out)
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [m for m in metrics if "reward" in m]
    prof = json.loads((out_dir / "profile.json").read_text())  # the run's own totals, for cross-checking
    return {"steps": steps, "rss_at_train_start_bytes": log.rss_at_start,
            "profile_json": {"wall_seconds": prof["wall_seconds"], "phase_seconds": prof["phases"]["seconds"],
                             "tokens": prof["tokens"]["counters"], "peak_memory_bytes": prof["peak_memory"]["bytes"]},
            "mean_response_length": statistics.fmean(m["response_length"] for m in train),
            "final_reward": train[-1]["reward"]}


# ---- TRL side ------------------------------------------------------------------------------------
def build_trl_trainer(w: Workload, out_dir: Path, log: StepLog | None = None):
    """RLOOTrainer on the workload, its reward function calling this project's mapped reward."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from moslim_mega.config import load_config
    from moslim_mega.policy.controller import load_policy_prompts
    from moslim_mega.policy.workers import RewardWorker
    from moslim_mega.reward.io import load_reward_model
    from moslim_mega.reward.mapping import RewardMapper

    cfg = load_config(None, moslim_overrides(w))  # the same mapping / kernels settings moslim uses
    rm = load_reward_model(w.rm_dir, device=w.device)
    rewarder = RewardWorker(rm, RewardMapper.from_config(rm.stats, cfg.mapping), impl=cfg.kernels.impl)
    prompts = load_policy_prompts(w.prompts, rewarder.spec)
    # Conversational prompts: TRL applies the tokenizer's chat template, as moslim's render_prompt does.
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])

    def moslim_mapped_reward(prompts, completions, **_):
        """Eq. 11 mapped reward of the multi-head RM: the prefix sets the targets, the RM sees the
        stripped prompt and the decoded response (RewardWorker.score, exactly what moslim calls)."""
        texts = [c[-1]["content"] for c in completions]
        return rewarder.score([p[-1]["content"] for p in prompts], texts).reward_B.tolist()

    tokenizer = AutoTokenizer.from_pretrained(w.policy)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    clock = {"prepare": 0.0, "train_end": None}
    totals = {"phases": {"generation": 0.0, "experience": 0.0, "update": 0.0},
              "counters": {"generated_tokens": 0, "update_tokens": 0}}

    class TimedRLOO(RLOOTrainer):
        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            totals["phases"]["generation"] += time.perf_counter() - t0
            totals["counters"]["generated_tokens"] += sum(len(c) for c in out[1])
            return out

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            totals["phases"]["experience"] += time.perf_counter() - t0
            return out

        def _prepare_inputs(self, batch):
            t0 = time.perf_counter()
            out = super()._prepare_inputs(batch)
            clock["prepare"] += time.perf_counter() - t0
            if self.model.training:  # the micro-batch this training_step trains on
                totals["counters"]["update_tokens"] += int(out["prompt_mask"].sum() + out["completion_mask"].sum())
            return out

        def training_step(self, model, inputs, num_items_in_batch=None):
            clock["prepare"] = 0.0
            t0 = time.perf_counter()
            out = super().training_step(model, inputs, num_items_in_batch)
            clock["train_end"] = time.perf_counter()
            totals["phases"]["update"] += clock["train_end"] - t0 - clock["prepare"]
            return out

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if log is not None:
                log.snap(totals["phases"], totals["counters"])

        def on_optimizer_step(self, args, state, control, **kw):
            # From the last micro-batch's backward to here: gradient clipping and optimizer.step().
            totals["phases"]["update"] += time.perf_counter() - clock["train_end"]

    torch.manual_seed(w.seed)
    args = RLOOConfig(**trl_config_kwargs(w, str(out_dir)))
    trainer = TimedRLOO(model=w.policy, reward_funcs=moslim_mapped_reward, args=args, train_dataset=dataset,
                        processing_class=tokenizer, callbacks=[Steps()])
    return trainer, tokenizer, prompts


def check_trl_matched(trainer, tokenizer, w: Workload, prompts: list[str]) -> dict:
    """Read the settings back from the constructed TRL trainer and compare them with the workload
    (and with moslim's own prompt encoding); BenchError names the first field that differs."""
    import torch

    from moslim_mega.config import SamplingConfig
    from moslim_mega.rollout import encode_prompts
    from moslim_mega.rollout.hf import build_generation_config

    a, g = trainer.args, trainer.generation_config
    ours = build_generation_config(SamplingConfig(temperature=w.temperature, max_new_tokens=w.max_new_tokens),
                                   tokenizer.eos_token_id, tokenizer.pad_token_id)
    expect = {
        "generation_batch_size": (a.generation_batch_size, w.rows),
        "num_generations": (trainer.num_generations, w.samples_per_prompt),
        "optimizer steps per rollout": (a.gradient_accumulation_steps // a.steps_per_generation, 1),
        "num_iterations (update epochs)": (trainer.num_iterations, 1),
        "max_new_tokens": (g.max_new_tokens, ours.max_new_tokens),
        "do_sample": (g.do_sample, ours.do_sample),
        "temperature": (g.temperature, ours.temperature),
        "top_k": (g.top_k or 0, ours.top_k or 0),
        "top_p": (g.top_p, ours.top_p),
        "repetition_penalty": (g.repetition_penalty, ours.repetition_penalty),
        "pad_token_id": (g.pad_token_id, ours.pad_token_id),
        "learning_rate": (a.learning_rate, w.lr),
        "lr_scheduler_type": (str(getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)), "constant"),
        "weight_decay": (a.weight_decay, 0.0),
        "max_grad_norm": (a.max_grad_norm, w.grad_clip),
        "beta (KL coef, in the reward, k1)": (trainer.beta, w.kl_coef),
        "epsilon (clip)": ((trainer.epsilon_low, trainer.epsilon_high), (w.clip_range, w.clip_range)),
        "normalize_advantages": (trainer.normalize_advantages, True),
        "gradient_checkpointing": (a.gradient_checkpointing, False),
        "policy dtype": (str(trainer.model.dtype), f"torch.{w.dtype}"),
        "threads": (torch.get_num_threads(), w.threads),
    }
    gen_eos = g.eos_token_id if isinstance(g.eos_token_id, list) else [g.eos_token_id]
    expect["eos_token_id"] = (gen_eos, [ours.eos_token_id])
    moslim_ids = encode_prompts(tokenizer, prompts[:4])  # what every rollout engine is given
    trl_ids, _, _ = trainer._tokenize_prompts([[{"role": "user", "content": p}] for p in prompts[:4]])
    expect["prompt token ids"] = (moslim_ids, [list(t) for t in trl_ids])
    for name, (got, want) in expect.items():
        if got != want and not (isinstance(got, float) and abs(got - want) <= 1e-12 * max(1.0, abs(want))):
            raise BenchError(f"TRL setting {name!r} = {got!r}, moslim's = {want!r}")
    return {k: v[0] for k, v in expect.items() if k != "prompt token ids"}


def run_trl(w: Workload, out_dir: Path) -> dict:
    log = StepLog()
    trainer, tokenizer, prompts = build_trl_trainer(w, out_dir, log)
    matched = check_trl_matched(trainer, tokenizer, w, prompts)
    trainer.train()
    steps = []
    for row in log.steps():
        steps.append({"seconds": row["seconds"], "cpu_seconds": row["cpu_seconds"], "generation": row["generation"],
                      "scoring": row["experience"] - row["generation"], "update": row["update"],
                      "generated_tokens": int(row["generated_tokens"]), "update_tokens": int(row["update_tokens"])})
    hist = [h for h in trainer.state.log_history if "reward" in h]
    return {"steps": steps, "rss_at_train_start_bytes": log.rss_at_start, "matched_settings": matched,
            "mean_response_length": statistics.fmean(h["completions/mean_length"] for h in hist),
            "final_reward": hist[-1]["reward"]}


# ---- one side in its own process ---------------------------------------------------------------
def worker(side: str, spec_path: Path, result_path: Path) -> int:
    w = Workload(**json.loads(spec_path.read_text()))
    import torch

    torch.set_num_threads(w.threads)
    out_dir = result_path.parent / f"{result_path.stem}_run"
    t0 = time.perf_counter()
    result = (run_moslim if side == "moslim" else run_trl)(w, out_dir)
    result.update(side=side, process_seconds=time.perf_counter() - t0, **peak_memory(w.device))
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def run_side(side: str, w: Workload, work: Path, tag: str, timeout: float) -> dict:
    spec = work / "workload.json"
    spec.write_text(json.dumps(asdict(w), indent=2) + "\n")
    result = work / f"{tag}_{side}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--spec", str(spec), "--result", str(result)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(f"{side} run {tag} failed (status {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


# ---- summary -------------------------------------------------------------------------------------
def summarize_run(run: dict, warmup: int) -> dict:
    """Metrics of one run over its timed steps (after warm-up; the last step is already dropped).
    Per-step figures are medians over the timed steps (robust to a step stalled by other load);
    the phase breakdown is the mean, so that its parts add up to the mean step."""
    timed = run["steps"][warmup:]
    if not timed:
        raise BenchError(f"{run.get('side')}: no timed steps (steps ≤ warmup + 1)")
    total = {k: sum(s[k] for s in timed) for k in ("seconds", "generation", "scoring", "update",
                                                    "generated_tokens", "update_tokens")}
    return {
        "seconds_per_step": statistics.median(s["seconds"] for s in timed),
        "cpu_seconds_per_step": statistics.median(s["cpu_seconds"] for s in timed),
        "rollout_tokens_per_s": statistics.median(s["generated_tokens"] / s["generation"] for s in timed),
        "update_tokens_per_s": statistics.median(s["update_tokens"] / s["update"] for s in timed),
        "phase_seconds_per_step": {k: total[k] / len(timed) for k in ("generation", "scoring", "update")}
        | {"other": (total["seconds"] - total["generation"] - total["scoring"] - total["update"]) / len(timed)},
        "generated_tokens_per_step": total["generated_tokens"] / len(timed),
        "update_tokens_per_step": total["update_tokens"] / len(timed),
        "peak_rss_bytes": run["peak_rss_bytes"], "rss_at_train_start_bytes": run["rss_at_train_start_bytes"],
        "cuda_max_allocated_bytes": run["cuda_max_allocated_bytes"],
        "mean_response_length": run["mean_response_length"], "final_reward": run["final_reward"],
        "timed_steps": len(timed),
    }


HEADLINE = ("seconds_per_step", "cpu_seconds_per_step", "rollout_tokens_per_s", "update_tokens_per_s",
            "peak_rss_bytes", "cuda_max_allocated_bytes", "rss_at_train_start_bytes", "mean_response_length")


def summarize(w: Workload, runs: dict[str, list[dict]]) -> dict:
    per_run = {side: [summarize_run(r, w.warmup) for r in runs[side]] for side in SIDES}
    out = {}
    for side in SIDES:
        rows = per_run[side]
        med = {}
        for k in HEADLINE:
            vals = [r[k] for r in rows if r[k] is not None]
            med[k] = statistics.median(vals) if vals else None
        med["phase_seconds_per_step"] = {p: statistics.median(r["phase_seconds_per_step"][p] for r in rows)
                                         for p in rows[0]["phase_seconds_per_step"]}
        med["seconds_per_step_each_repeat"] = [r["seconds_per_step"] for r in rows]
        out[side] = {"median_over_repeats": med, "runs": rows}
    m, t = out["moslim"]["median_over_repeats"], out["trl"]["median_over_repeats"]
    out["ratio_trl_over_moslim"] = {
        k: (t[k] / m[k] if m[k] and t[k] is not None else None)
        for k in ("seconds_per_step", "cpu_seconds_per_step", "rollout_tokens_per_s", "update_tokens_per_s",
                  "peak_rss_bytes",
                  "cuda_max_allocated_bytes")
    } | {f"phase_{p}": t["phase_seconds_per_step"][p] / m["phase_seconds_per_step"][p]
         for p in m["phase_seconds_per_step"] if m["phase_seconds_per_step"][p] > 0}
    return out


def machine_facts(w: Workload) -> dict:
    import accelerate
    import torch
    import transformers
    import trl

    from moslim_mega.profile import cpu_name

    facts = {
        "date": datetime.date.today().isoformat(), "host_cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": w.threads, "load_average_at_start": os.getloadavg(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "accelerate": accelerate.__version__, "device": w.device,
    }
    if w.device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


# ---- building the models -------------------------------------------------------------------------
def build_world_stage(work: Path, seed: int) -> dict:
    """The quick demo's world, neutral SFT policy and multi-head RM (configs/demo_quick.yaml), built
    once under ``work/stage`` and reused by later invocations."""
    from moslim_mega.config import load_config
    from moslim_mega.demo import CONFIG_DIR
    from moslim_mega.prefs import spec_from_config
    from moslim_mega.reward.trainer import train_reward_model
    from moslim_mega.sft import train_sft
    from moslim_mega.world.build import build_world

    root = work / "stage"
    paths = {"policy": root / "sft" / "model", "rm_dir": root / "rm", "prompts": root / "data" / "policy_train.jsonl"}
    if all(p.exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    cfg = load_config(CONFIG_DIR / "demo_quick.yaml", [f"run.seed={seed}", f"run.data_dir={root / 'data'}",
                                                       "run.tensorboard=false"])
    world = build_world(cfg.world, spec_from_config(cfg.prefs), root / "data")
    train_sft(cfg, world["sft"], root / "sft", show_progress=False)
    train_reward_model(cfg, root / "rm", show_progress=False)
    return {k: str(v) for k, v in paths.items()}


QWEN2_SHAPES = {
    # Qwen2-0.5B (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, tied embeddings).
    "qwen2-0.5b-random": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                              num_key_value_heads=2),
    # The same construction at toy width: the CPU smoke test of the GPU path (full Qwen2 vocabulary).
    "qwen2-tiny-random": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2),
}


def padded_world_tokenizer(size: int):
    """The world tokenizer with filler words ``w0 w1 …`` appended after its tag tokens, ``size``
    tokens in all: a random policy of a real vocabulary's width samples ids that all decode."""
    from tokenizers import models

    from moslim_mega.world.tokenizer import build_world_tokenizer, world_vocabulary

    tok = build_world_tokenizer()
    vocab = {w: i for i, w in enumerate(world_vocabulary())}  # the word-level model; tag tokens follow it
    first = len(tok)
    vocab.update({f"w{j}": first + j for j in range(size - first)})
    tok.backend_tokenizer.model = models.WordLevel(vocab=vocab, unk_token="<unk>")
    return tok


def build_qwen2_random(work: Path, shape: str, dtype: str, seed: int) -> str:
    """A random Qwen2-shaped causal LM with the world tokenizer padded to Qwen2's vocabulary (filler
    words ``w0 w1 …``), so sampled ids always decode to text the RM can score (as unknown words)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = work / f"policy_{shape}_{dtype}"
    if (out / "config.json").is_file():
        return str(out)
    tok = padded_world_tokenizer(QWEN2_VOCAB)
    if len(tok) != QWEN2_VOCAB:
        raise BenchError(f"padded tokenizer has {len(tok)} tokens, expected {QWEN2_VOCAB}")
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=QWEN2_VOCAB, max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **QWEN2_SHAPES[shape])
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


def default_workload(args, stage: dict) -> Workload:
    """The quick demo's RLOO settings on CPU; a GPU-sized batch and longer responses for Qwen2."""
    base = dict(policy=stage["policy"], rm_dir=stage["rm_dir"], prompts=stage["prompts"], seed=args.seed,
                threads=args.threads, device=args.device)
    if args.model == "world":
        w = Workload(**base)
    else:
        w = Workload(**base, prompts_per_step=32, samples_per_prompt=4, max_new_tokens=128, micro_batch_size=32,
                     lr=1e-6, dtype="bfloat16" if args.device == "cuda" else "float32", steps=14, warmup=3)
    overrides = {k: getattr(args, k) for k in ("steps", "warmup", "prompts_per_step", "samples_per_prompt",
                                                "max_new_tokens", "micro_batch_size") if getattr(args, k) is not None}
    return replace(w, **overrides).validate()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="JSON file to write (orchestrator)")
    ap.add_argument("--work", default="runs/trl_bench", help="models and per-run outputs (reused across invocations)")
    ap.add_argument("--model", default="world", choices=("world", *QWEN2_SHAPES))
    ap.add_argument("--policy", help="existing policy HF dir (with --rm and --prompts: skip building the world stage)")
    ap.add_argument("--rm", help="existing multi-head RM dir")
    ap.add_argument("--prompts", help="existing jsonl of prefixed policy prompts")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--repeats", type=int, default=3, help="runs per side, alternating which side goes first")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads of both sides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per side run")
    for name in ("steps", "warmup", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "micro_batch_size"):
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None)
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.worker and not args.out:
        ap.error("--out is required")
    given = [args.policy, args.rm, args.prompts]
    if any(given) and not all(given):
        ap.error("--policy, --rm and --prompts go together")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, Path(args.spec), Path(args.result))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BenchError("--device cuda: no CUDA device visible")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.policy:
        stage = {"policy": args.policy, "rm_dir": args.rm, "prompts": args.prompts}
    else:
        stage = build_world_stage(work, args.seed)
    if args.model != "world":
        dtype = "bfloat16" if args.device == "cuda" else "float32"
        stage = dict(stage, policy=build_qwen2_random(work, args.model, dtype, args.seed))
    w = default_workload(args, stage)
    facts = machine_facts(w)  # the load average before the runs start
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    for r in range(args.repeats):
        for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
            print(f"repeat {r + 1}/{args.repeats}: {side}", flush=True)
            runs[side].append(run_side(side, w, work, f"r{r}", args.timeout))
    report = {"schema": SCHEMA, "benchmark": "rloo_side_by_side", "model": args.model,
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": facts | {"load_average_at_end": os.getloadavg()},
              "workload": asdict(w), "matched_settings_trl": runs["trl"][0]["matched_settings"],
              "mismatches": MISMATCHES, "repeats": args.repeats,
              "timing": {"warmup_steps_skipped": w.warmup, "last_step_dropped": True,
                         "timed_steps_per_run": w.steps - w.warmup - 1}}
    report |= summarize(w, runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    m, t = report["moslim"]["median_over_repeats"], report["trl"]["median_over_repeats"]
    print(f"s/step  moslim {m['seconds_per_step']:.3f}  trl {t['seconds_per_step']:.3f}  "
          f"ratio trl/moslim {report['ratio_trl_over_moslim']['seconds_per_step']:.2f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
