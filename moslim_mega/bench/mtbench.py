"""MT-Bench: two-turn questions, the second answered in the context of the first; a judge rates
each turn 1-10; the score is the mean over all rated turns.

Schema (``question.jsonl``): ``question_id``, ``category``, ``turns`` [q1, q2], optional
``reference`` [r1, r2] (math, reasoning, coding).
"""

from __future__ import annotations

from . import prompts
from .common import Skips, mean, require_text_judge, unparseable_report, with_prefix
from .parse import parse_rating


def _check(rec) -> str | None:
    if not isinstance(rec, dict):
        return f"not a JSON object ({type(rec).__name__})"
    turns = rec.get("turns")
    if not isinstance(turns, list) or not turns:
        return "missing field 'turns' (a list of user messages)" if "turns" not in rec else "field 'turns' is not a non-empty list"
    for t, q in enumerate(turns):
        if not isinstance(q, str) or not q.strip():
            return f"turns[{t}] is not a non-empty string"
    ref = rec.get("reference")
    if ref is not None and not (isinstance(ref, list) and all(isinstance(r, str) for r in ref)):
        return "field 'reference' is not a list of strings"
    return None


def run(records: list[dict], policy, judge, cfg) -> tuple[dict, list[dict]]:
    judge = require_text_judge(judge, "mtbench")
    if policy is None:
        raise ValueError("suite mtbench needs --policy DIR (the model whose answers are rated)")
    skips, good = Skips(), []
    for i, rec in enumerate(records):
        reason = _check(rec)
        if reason:
            skips.add(i, rec, reason)
        else:
            good.append(rec)
    num_turns = max((len(r["turns"]) for r in good), default=0)
    convs = [[] for _ in good]
    answers = [[] for _ in good]
    # Turn by turn over all questions: turn t+1's prompt contains the policy's own turn-t answer.
    for t in range(num_turns):
        idx = [k for k, r in enumerate(good) if len(r["turns"]) > t]
        for k in idx:
            q = good[k]["turns"][t]
            convs[k].append({"role": "user", "content": with_prefix(cfg.prefix, q) if t == 0 else q})
        outs = policy.chat([convs[k] for k in idx], cfg.max_new_tokens, cfg.temperature, cfg.seed, cfg.batch_size)
        for k, a in zip(idx, outs):
            convs[k].append({"role": "assistant", "content": a})
            answers[k].append(a)
    judge_convs, where = [], []
    for k, r in enumerate(good):
        refs = r.get("reference") or []
        for t, (q, a) in enumerate(zip(r["turns"], answers[k])):
            ref = refs[t] if t < len(refs) else None
            if t == 0:
                judge_convs.append(prompts.rating_single(q, a, ref))
            else:
                judge_convs.append(prompts.rating_followup(r["turns"][t - 1], answers[k][t - 1], q, a, ref))
            where.append((k, t))
    verdicts = judge.complete(judge_convs)
    rows = [
        {"question_id": r.get("question_id"), "category": r.get("category"), "turns": r["turns"], "answers": answers[k],
         "verdicts": [], "ratings": []}
        for k, r in enumerate(good)
    ]
    bad = []
    for (k, t), text in zip(where, verdicts):
        score = parse_rating(text)
        rows[k]["verdicts"].append(text)
        rows[k]["ratings"].append(score)
        if score is None:
            bad.append({"question_id": rows[k]["question_id"], "turn": t + 1, "verdict": text[:300]})
    return _summary(rows, num_turns, bad, len(verdicts), skips), rows


def _summary(rows, num_turns, bad, num_verdicts, skips) -> dict:
    all_scores = [s for r in rows for s in r["ratings"] if s is not None]
    per_turn = {f"turn_{t + 1}": mean(r["ratings"][t] for r in rows if len(r["ratings"]) > t and r["ratings"][t] is not None)
                for t in range(num_turns)}
    cats: dict[str, list[float]] = {}
    for r in rows:
        cats.setdefault(str(r["category"]), []).extend(s for s in r["ratings"] if s is not None)
    return {
        "metric": "mean per-turn rating (1-10) over all parseable turn verdicts",
        "score": mean(all_scores),
        "per_turn": per_turn,
        "per_category": {c: mean(v) for c, v in sorted(cats.items())},
        "num_questions": len(rows),
        **unparseable_report(bad, num_verdicts),
        **skips.report(),
    }
