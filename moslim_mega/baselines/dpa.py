"""DPA (Directional Preference Alignment, Wang et al. 2024): the user's preference is a unit
vector v in reward space, written into the prompt; the policy is trained by iterative,
preference-conditioned rejection-sampling fine-tuning (RSF) against a multi-objective regression
RM (baselines/regression_rm.py):

  for t = 1..T:  for sampled prompts x and directions v: draw n responses from π_{t−1}(·|x, v),
                 keep y* = argmax_i vᵀ r(x, y_i);  SFT π_{t−1} on {(v ⊕ x, y*)} + ~15 % replay
                 of the original SFT data (alignment-tax guard, DPA §3)                 → π_t

Departures from the paper, each for this world: directions are uniform on the non-negative part
of the unit sphere (the paper samples an angle range between "pure helpfulness" and a
less-verbose balance because its second objective is unwanted; here every dimension is wanted);
the world's chat template has no system role, so the direction text leads the user turn; each
iteration fine-tunes π_{t−1} (the §2.2 algorithm) rather than restarting from SFT.

Legend: G groups (prompt × direction), N samples per group, D dimensions.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch

from ..config import Config, RolloutConfig, SamplingConfig
from ..parallel.export import export_hf_weights
from ..reward.data import read_jsonl
from ..rollout import build_rollout_engine, engine_from_dir, generate_texts
from ..models.build import load_policy
from ..sft import SFTExamples, encode_sft_example, train_sft_loop
from ..utils.logging import MetricsWriter
from ..utils.seed import seed_everything
from .common import BaselineError
from .regression_rm import LoadedRegressionRM


def sample_directions(num: int, num_dims: int, gen: torch.Generator) -> torch.Tensor:
    """v_ND uniform on the non-negative orthant of the unit sphere S^{D−1}: |N(0, I)| normalised."""
    v_ND = torch.randn(num, num_dims, generator=gen).abs()
    return v_ND / v_ND.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def unit_direction(weights) -> torch.Tensor:
    """A preference weight vector as a unit direction (DPA's v)."""
    v_D = torch.as_tensor(weights, dtype=torch.float32)
    n = v_D.norm()
    if not torch.isfinite(n) or n <= 0:
        raise BaselineError(f"direction {list(map(float, v_D))} has no length")
    return v_D / n


def direction_text(v_D: torch.Tensor, names) -> str:
    """The preference written in words the policy reads before the request, each component on a
    0-9 scale: ``"helpfulness 7 honesty 7 harmlessness 0"`` for v ≈ (0.71, 0.71, 0)."""
    return " ".join(f"{n} {int(round(9 * float(x)))}" for n, x in zip(names, v_D.clamp(0, 1)))


def dpa_prompt(v_D: torch.Tensor, names, base: str) -> str:
    return f"{direction_text(v_D, names)} {base}"


def select_best(r_GND: torch.Tensor, v_GD: torch.Tensor) -> torch.Tensor:
    """Rejection step: index of argmax_i vᵀ r(x, y_i) in each group → idx_G."""
    return torch.einsum("gnd,gd->gn", r_GND.float(), v_GD.float()).argmax(dim=1)


def replay_count(num_selected: int, fraction: float) -> int:
    """Replay rows so that they are ``fraction`` of the fine-tuning set."""
    if not 0.0 <= fraction < 1.0:
        raise BaselineError(f"compare.dpa_replay_fraction: must be in [0, 1), got {fraction}")
    return int(round(num_selected * fraction / (1.0 - fraction)))


def rejection_sample(engine, tokenizer, rm: LoadedRegressionRM, bases: list[str], v_GD: torch.Tensor,
                     n: int, sampling: SamplingConfig, seed: int, chunk: int = 64) -> tuple[list[dict], dict]:
    """Best-of-n response per (base prompt, direction) group → SFT rows and mean chosen rewards."""
    names = rm.spec.names
    rows, best_r = [], []
    for g0 in range(0, len(bases), chunk):
        b, v = bases[g0 : g0 + chunk], v_GD[g0 : g0 + chunk]
        prompts = [dpa_prompt(v[i], names, b[i]) for i in range(len(b))]
        out = generate_texts(engine, tokenizer, prompts, n, sampling, seed=seed + g0)
        # The RM reads the request without the direction text, like MOSLIM's RM reads it without prefix.
        r_GND = rm.scores([x for x in b for _ in range(n)], out.responses).view(len(b), n, -1)
        idx_G = select_best(r_GND, v)
        for i, j in enumerate(idx_G.tolist()):
            rows.append({"prompt": prompts[i], "response": out.responses[i * n + j]})
            best_r.append(r_GND[i, j])
    mean = torch.stack(best_r).mean(0)
    return rows, {f"chosen_{nm}": float(x) for nm, x in zip(names, mean)}


def train_dpa(cfg: Config, out_dir, init_dir, rm_dir, base_prompts: list[str], sft_path,
              show_progress: bool = True, timer=None) -> dict:
    """T RSF iterations from ``init_dir``; the final policy is ``out_dir/policy``."""
    cc = cfg.compare
    timer = timer or (lambda _stage, fn, *a, **k: fn(*a, **k))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.run.seed, cfg.run.num_threads)
    rm = LoadedRegressionRM(rm_dir)
    policy, tok = load_policy(init_dir)
    # One engine for all iterations; each iteration's fine-tuned weights are pushed before sampling
    # (free for the hf engine, which samples with ``policy`` itself).
    engine = build_rollout_engine(cfg.rollout, model=policy, tokenizer=tok, model_dir=init_dir)
    try:
        rng, gen = random.Random(cfg.run.seed), torch.Generator().manual_seed(cfg.run.seed)
        sft_rows = [rec for _, rec in read_jsonl(sft_path)]
        sft_cfg = dataclasses.replace(cfg, sft=dataclasses.replace(
            cfg.sft, lr=cc.dpa_lr, epochs=cc.dpa_sft_epochs, max_minutes=cc.dpa_sft_max_minutes, warmup_steps=5))
        writer = MetricsWriter(out, tensorboard=False)
        history = []
        for t in range(1, cc.dpa_iterations + 1):
            bases = [rng.choice(base_prompts) for _ in range(cc.dpa_prompts_per_iter)]
            bases = [b for b in bases for _ in range(cc.dpa_directions_per_prompt)]
            v_GD = sample_directions(len(bases), len(rm.spec), gen)
            if t > 1:
                engine.update_weights(export_hf_weights(policy, cfg.rollout.push_bucket_mb << 20))
            rows, stats = timer(f"sample_{t}", rejection_sample, engine, tok, rm, bases, v_GD,
                                cc.dpa_samples, cfg.sampling, cfg.run.seed * 1009 + t * 100003)
            rows += rng.sample(sft_rows, min(len(sft_rows), replay_count(len(rows), cc.dpa_replay_fraction)))
            data = _encode(rows, tok, cfg.sft.max_length)
            res = timer(f"sft_{t}", train_sft_loop, sft_cfg, policy, data, tok.pad_token_id, writer, show_progress)
            history.append({"iteration": t, **stats, "sft_loss": res["final_loss"], "rows": len(rows)})
            writer.write(t, history[-1], tag="iteration")
        writer.close()
    finally:
        engine.close()
    policy.save_pretrained(out / "policy", safe_serialization=True)
    tok.save_pretrained(out / "policy")
    (out / "train_summary.json").write_text(json.dumps(history, indent=2))
    return {"policy_dir": str(out / "policy"), "iterations": history}


def _encode(rows: list[dict], tok, max_length: int) -> SFTExamples:
    ids, lens = [], []
    for row in rows:
        seq, n_prompt = encode_sft_example(tok, row["prompt"], row["response"], max_length)
        if n_prompt < len(seq):
            ids.append(seq)
            lens.append(n_prompt)
    return SFTExamples(ids, lens)


class DPASampler:
    """``sample_fn`` for evaluation: a MOSLIM prefix → its direction v → the DPA prompt."""

    def __init__(self, policy_dir, spec, sampling: SamplingConfig, seed: int, rollout: RolloutConfig | None = None):
        self.engine, self.tok = engine_from_dir(rollout or RolloutConfig(), policy_dir)
        self.spec, self.sampling, self.seed = spec, sampling, seed

    def __call__(self, prompts: list[str]) -> list[str]:
        from .common import preference_weights

        texts = []
        for p in prompts:
            w, base = preference_weights(p, self.spec)
            texts.append(dpa_prompt(unit_direction(w), self.spec.names, base))
        out: list[str] = []
        for i in range(0, len(texts), 256):
            batch = generate_texts(self.engine, self.tok, texts[i : i + 256], 1, self.sampling, seed=self.seed + i)
            out += batch.responses
        return out

    def close(self) -> None:
        """Release the engine (its owner: this sampler loaded it)."""
        self.engine.close()
