"""Write the embedded world's data sets as jsonl (``moslim world build --out DIR``).

Files (one JSON object a line):
- ``rm_train.jsonl`` / ``rm_eval.jsonl``: ``{"prompt_id", "prompt", "response", "ratings": {dim: raw}}``,
  several rated responses per prompt, like UltraFeedback's completions. Eval prompts use prompt
  texts that never occur in training.
- ``rm_eval_ood.jsonl``: the same fields; responses a policy can reach but the behaviour model
  rarely writes (off-topic items, mixed topics, repeats, long and near-empty answers) — the RM's
  out-of-distribution slice.
- ``sft.jsonl``: ``{"prompt", "response"}``, the neutral warm start; a fraction of prompts carry an
  uninformative random prefix (see ``sft_records``).
- ``policy_train.jsonl`` / ``policy_eval.jsonl``: ``{"prompt", "targets": {dim: level}}`` where the
  prompt starts with a random 1-3 dimension prefix (paper §3.2).
- ``world.json``: the preference spec and the counts.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

from ..prefs import PreferenceSpec, SpecError, format_prefix
from . import oracle, task


def check_world_spec(spec: PreferenceSpec) -> None:
    """The world can score only its own dimensions, on their native scales."""
    for dim in spec.dimensions:
        if dim.name not in oracle.ORACLE_SCALES:
            raise SpecError(
                f"the embedded world has no dimension {dim.name!r}; it has {', '.join(oracle.ORACLE_SCALES)}"
            )
        if tuple(dim.raw_range) != tuple(float(x) for x in oracle.ORACLE_SCALES[dim.name]):
            raise SpecError(f"dimension {dim.name!r}: raw_range {dim.raw_range} is not the oracle's scale")


def uses_style_words(spec: PreferenceSpec) -> bool:
    """Polite/filler words appear in the data only when a dimension scores them."""
    return bool({"politeness", "conciseness"} & set(spec.names))


def all_prompt_texts() -> list[str]:
    return [
        " ".join(p for p in (opener, topic, closer) if p)
        for topic in task.TOPICS
        for opener in task.PROMPT_OPENERS
        for closer in task.PROMPT_CLOSERS
    ]


def split_prompt_texts(seed: int, eval_fraction: float = 0.15) -> tuple[list[str], list[str]]:
    """Disjoint train/eval prompt texts, stratified by topic so every topic is in both."""
    rng = random.Random(seed * 7919 + 1)
    train, held = [], []
    for topic in task.TOPICS:
        texts = [p for p in all_prompt_texts() if task.topic_of_prompt(p) == topic]
        rng.shuffle(texts)
        n_eval = max(1, int(len(texts) * eval_fraction))
        held += texts[:n_eval]
        train += texts[n_eval:]
    return train, held


def _pick_prompt(rng: random.Random, texts: list[str], harmful_fraction: float) -> str:
    harmful, benign = _by_harm(tuple(texts))
    return rng.choice(harmful if rng.random() < harmful_fraction else benign)


@functools.lru_cache(maxsize=8)
def _by_harm(texts: tuple[str, ...]) -> tuple[list[str], list[str]]:
    harmful = [p for p in texts if task.is_harmful(task.topic_of_prompt(p))]
    return harmful, [p for p in texts if p not in set(harmful)]


def rm_records(rng, texts, num_prompts, responses_per_prompt, harmful_fraction, spec, id_prefix,
               reachable_fraction: float = 0.0):
    """Rated responses per prompt; a ``reachable_fraction`` of them from
    :func:`~moslim_mega.world.task.sample_reachable_response` instead of the behaviour model."""
    rows = []
    for i in range(num_prompts):
        prompt = _pick_prompt(rng, texts, harmful_fraction)
        for _ in range(responses_per_prompt):
            if reachable_fraction and rng.random() < reachable_fraction:
                response = task.sample_reachable_response(rng, prompt, uses_style_words(spec))
            else:
                response = task.sample_response(rng, prompt, uses_style_words(spec))
            rows.append(
                {
                    "prompt_id": f"{id_prefix}{i}",
                    "prompt": prompt,
                    "response": response,
                    "ratings": oracle.score(prompt, response, spec.names),
                }
            )
    return rows


def sft_records(rng, texts, world_cfg, spec):
    """The neutral warm-start set. A fraction of prompts carry a random preference prefix whose
    response is drawn *independently* of it: an off-the-shelf LLM has read such tags as ordinary
    text, while our tiny world model would otherwise meet them as never-trained embeddings that
    derail it. The prefix carries no information, so this teaches no preference behaviour — the
    demo's report measures that (the SFT policy's controllability ρ stays ≈ 0)."""
    rows = []
    for _ in range(world_cfg.num_sft):
        prompt = _pick_prompt(rng, texts, world_cfg.harmful_fraction)
        response = task.sample_response(rng, prompt, uses_style_words(spec))
        if rng.random() < world_cfg.sft_prefix_fraction:
            prompt = spell_prefix(rng, random_targets(rng, spec), spec) + prompt
        rows.append({"prompt": prompt, "response": response})
    return rows


def spell_prefix(rng: random.Random, targets: dict[str, int], spec: PreferenceSpec, p_words: float = 0.3) -> str:
    """``format_prefix``, but a top or bottom level is written ``max`` / ``min`` with probability
    ``p_words`` — users write both, and the policy must learn both spellings."""
    parts = []
    for name, cls in targets.items():
        tag = format_prefix({name: cls}, spec)
        if cls in (0, spec[name].num_classes - 1) and rng.random() < p_words:
            tag = f"<{spec[name].name} {'min' if cls == 0 else 'max'}>"
        parts.append(tag)
    return "".join(parts)


def random_targets(rng: random.Random, spec: PreferenceSpec, max_dims: int = 3) -> dict[str, int]:
    """1..min(3, n) distinct dimensions in random order, each with a uniform random class."""
    k = rng.randint(1, min(max_dims, len(spec)))
    names = rng.sample(list(spec.names), k)
    return {n: rng.randrange(spec[n].num_classes) for n in names}


def policy_records(rng, texts, n, harmful_fraction, spec):
    rows = []
    for _ in range(n):
        targets = random_targets(rng, spec)
        prompt = spell_prefix(rng, targets, spec) + _pick_prompt(rng, texts, harmful_fraction)
        rows.append({"prompt": prompt, "targets": {k: spec[k].first_level + v for k, v in targets.items()}})
    return rows


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_world(world_cfg, spec: PreferenceSpec, out_dir: str | Path) -> dict[str, Path]:
    """Generate every set deterministically from ``world_cfg.seed``; returns name → path."""
    check_world_spec(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_texts, eval_texts = split_prompt_texts(world_cfg.seed)
    hf = world_cfg.harmful_fraction
    # One generator per set, so changing one set's size leaves the others unchanged.
    sets = {
        "rm_train": rm_records(
            random.Random(f"{world_cfg.seed}-rm-train"), train_texts, world_cfg.num_rm_prompts,
            world_cfg.responses_per_prompt, hf, spec, "t", world_cfg.rm_reachable_fraction,
        ),
        "rm_eval": rm_records(
            random.Random(f"{world_cfg.seed}-rm-eval"), eval_texts, world_cfg.num_rm_eval_prompts,
            world_cfg.responses_per_prompt, hf, spec, "e",
        ),
        # The RM's out-of-distribution slice: only reachable responses, to held-out prompts.
        "rm_eval_ood": rm_records(
            random.Random(f"{world_cfg.seed}-rm-eval-ood"), eval_texts, world_cfg.num_rm_eval_prompts,
            world_cfg.responses_per_prompt, hf, spec, "o", reachable_fraction=1.0,
        ),
        "sft": sft_records(random.Random(f"{world_cfg.seed}-sft"), train_texts, world_cfg, spec),
        "policy_train": policy_records(
            random.Random(f"{world_cfg.seed}-policy"), train_texts, world_cfg.num_policy_prompts, hf, spec
        ),
        "policy_eval": policy_records(
            random.Random(f"{world_cfg.seed}-policy-eval"), eval_texts, max(50, world_cfg.num_policy_prompts // 10),
            hf, spec,
        ),
    }
    paths = {}
    for name, rows in sets.items():
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], rows)
    meta = {"seed": world_cfg.seed, "spec": spec.to_dict(), "counts": {k: len(v) for k, v in sets.items()}}
    (out / "world.json").write_text(json.dumps(meta, indent=2))
    return paths
