"""Anthropic hh-rlhf → MOSLIM policy prompts (paper §3.2).

The prompt of a transcript is everything up to and including its last ``"\\n\\nAssistant:"`` —
earlier turns are kept, so multi-turn conversations stay multi-turn. Prompts are deduplicated
(``chosen`` and ``rejected`` share the prompt, and the four hh-rlhf subsets overlap), prompts
used for SFT can be excluded, and each kept prompt gets a random prefix of 1-3 distinct
dimensions with a uniform random level in each head's range (helpfulness/honesty 1-5,
harmlessness 0-1 for DataType 4), all from one seeded generator.

Output rows match the policy trainer's ``policy.prompts`` jsonl (the world's
``policy_train.jsonl``): ``{"prompt": "<helpfulness 4><harmlessness 1>\\n\\nHuman: …\\n\\nAssistant:",
"targets": {"helpfulness": 4, "harmlessness": 1}}`` (targets are prefix levels).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from ..prefs import PreferenceSpec, PrefixError, check_plain_prompt, format_prefix
from ..world.build import random_targets
from .fields import RowProblem, row_object
from .sources import Row, iter_records
from .stats import DropLog, write_stats

ASSISTANT_MARK = "\n\nAssistant:"
HUMAN_MARK = "\n\nHuman:"


def hh_prompt(transcript: str) -> str | None:
    """The transcript up to and including its last ``\\n\\nAssistant:``; None when it has none."""
    cut = transcript.rfind(ASSISTANT_MARK)
    if cut < 0:
        return None
    return transcript[: cut + len(ASSISTANT_MARK)]


def _row_prompt(row: Row, source: str, log: DropLog, spec: PreferenceSpec) -> str | None:
    """The prompt of one hh-rlhf row, or None after logging why the row is dropped."""
    try:
        data = row_object(row)
    except RowProblem as e:
        log.drop(source, row.where, str(e))
        return None
    texts = {k: data.get(k) for k in ("chosen", "rejected") if isinstance(data.get(k), str)}
    if not texts:
        log.drop(source, row.where, "missing field: chosen/rejected (a string transcript)")
        return None
    prompts = {k: hh_prompt(t) for k, t in texts.items()}
    prompt = prompts.get("chosen") or prompts.get("rejected")
    if prompt is None:
        log.drop(source, row.where, "no assistant turn: transcript has no '\\n\\nAssistant:'")
        return None
    if len({p for p in prompts.values()}) > 1:
        log.count(f"{source}.chosen_rejected_prompt_mismatch")  # kept: the chosen side's prompt
    human = prompt[: -len(ASSISTANT_MARK)].replace(HUMAN_MARK, "").strip()
    if not human:
        log.drop(source, row.where, "empty text: the prompt has no human turn text")
        return None
    try:
        # Markup at the start stays prompt text; a preference tag there would merge with (or
        # break) the prefix written in front of it.
        check_plain_prompt(prompt, spec)
    except PrefixError as e:
        log.drop(source, row.where, f"preference tag: {e}")
        return None
    return prompt


def _exclusion_keys(src: str, log: DropLog) -> set[str]:
    """Normalised prompts of an SFT set: jsonl/parquet rows with ``prompt`` (any SFT format) or
    hh-rlhf rows (``chosen``)."""
    keys = set()
    for row in iter_records(src):
        data = row.data
        if isinstance(data, dict) and isinstance(data.get("prompt"), str):
            keys.add(data["prompt"].strip())
        elif isinstance(data, dict) and isinstance(data.get("chosen"), str) and hh_prompt(data["chosen"]):
            keys.add(hh_prompt(data["chosen"]).strip())
        else:
            log.count("exclude.unreadable_rows")
    return keys


def build_policy_prompts(
    hh_rlhf: str,
    out_dir: str | Path,
    n: int,
    spec: PreferenceSpec,
    seed: int = 0,
    exclude: str | None = None,
    split: str | None = None,
    max_dims: int = 3,
) -> dict:
    """Write ``policy_train.jsonl`` (+ the same rows via ``save_to_disk``) and ``stats.json``.

    ``n`` prompts are sampled without replacement from the deduplicated pool (all of them when
    the pool is smaller, which ``stats.json`` and the return value report; ``n <= 0`` = all).
    """
    source = "hh-rlhf"
    log = DropLog()
    pool: list[str] = []
    seen: set[str] = set()
    for row in iter_records(hh_rlhf, split):
        log.count(f"{source}.rows")
        prompt = _row_prompt(row, source, log, spec)
        if prompt is None:
            continue
        key = prompt.strip()
        if key in seen:
            log.count(f"{source}.duplicates")
            continue
        seen.add(key)
        pool.append(prompt)
    if exclude:
        excluded = _exclusion_keys(exclude, log)
        before = len(pool)
        pool = [p for p in pool if p.strip() not in excluded]
        log.count(f"{source}.excluded", before - len(pool))
    if not pool:
        raise ValueError(f"{hh_rlhf}: no usable prompts ({len(log.drops)} rows dropped)")
    rng = random.Random(seed)
    chosen = rng.sample(pool, len(pool) if n <= 0 else min(n, len(pool)))
    rows = []
    for prompt in chosen:
        targets = random_targets(rng, spec, max_dims)
        rows.append(
            {"prompt": format_prefix(targets, spec) + prompt,
             "targets": {k: spec[k].first_level + c for k, c in targets.items()}}
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save(out, rows, spec)
    stats = {
        "source": hh_rlhf,
        "exclude": exclude,
        "seed": seed,
        "spec": spec.to_dict(),
        "requested": n,
        "pool": len(pool),
        "written": len(rows),
        "multi_turn": sum(r["prompt"].count(HUMAN_MARK) > 1 for r in rows),
        "prefix_distribution": prefix_distribution(rows, spec),
        **log.to_dict(),
    }
    if 0 < len(pool) < n:
        stats["warning"] = f"asked for {n} prompts but only {len(pool)} remain after dedup/exclusion"
    write_stats(out / "stats.json", stats)
    return stats


def prefix_distribution(rows: list[dict], spec: PreferenceSpec) -> dict:
    """How many dimensions the prefixes name, how often each dimension and each level occurs."""
    num_dims = Counter(len(r["targets"]) for r in rows)
    levels = {d.name: {str(lv): 0 for lv in d.levels} for d in spec.dimensions}
    for r in rows:
        for name, level in r["targets"].items():
            levels[name][str(level)] += 1
    return {
        "num_dimensions": {str(k): num_dims.get(k, 0) for k in range(1, min(3, len(spec)) + 1)},
        "named": {name: sum(v.values()) for name, v in levels.items()},
        "levels": levels,
    }


def _save(out: Path, rows: list[dict], spec: PreferenceSpec) -> None:
    import datasets

    features = datasets.Features(
        {"prompt": datasets.Value("string"), "targets": {d.name: datasets.Value("int64") for d in spec.dimensions}}
    )
    full = [{"prompt": r["prompt"], "targets": {d.name: r["targets"].get(d.name) for d in spec.dimensions}} for r in rows]
    datasets.Dataset.from_list(full, features=features).save_to_disk(str(out / "dataset"))
    with open(out / "policy_train.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
