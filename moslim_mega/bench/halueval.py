"""HaluEval 2.0: the policy answers factual queries; a text judge splits each answer into
factual statements and marks each true / false / unknown.

    MaHR = share of answers with at least one hallucinated statement
    MiHR = mean over answers of (hallucinated statements / statements)

"Hallucinated" = not verified true (false or unknown), as in ``DATASETS.md``; the false-only
variants are reported beside them. Answers the judge finds free of factual statements
(``[[none]]``) are left out of both means and counted. Lower is better.

Schema: ``{category, id, user_query}`` per record; a folder of per-domain files works too
(``category`` falls back to the file name).
"""

from __future__ import annotations

from . import prompts
from .common import Skips, mean, missing_reason, require_str, require_text_judge, unparseable_report, with_prefix
from .parse import parse_statement_verdicts


def hallucination_rates(verdict_lists: list[list[str]], bad=("false", "unknown")) -> dict:
    """MaHR / MiHR over answers with ≥1 statement; ``verdict_lists`` holds each answer's verdicts."""
    scored = [v for v in verdict_lists if v]
    return {
        "mahr": mean(float(any(x in bad for x in v)) for v in scored),
        "mihr": mean(sum(x in bad for x in v) / len(v) for v in scored),
        "num_scored": len(scored),
    }


def run(records: list[dict], policy, judge, cfg) -> tuple[dict, list[dict]]:
    judge = require_text_judge(judge, "halueval")
    if policy is None:
        raise ValueError("suite halueval needs --policy DIR (the model whose answers are checked)")
    skips, good = Skips(), []
    for i, rec in enumerate(records):
        if require_str(rec, "user_query") is None:
            skips.add(i, rec, missing_reason(rec, "user_query"))
        else:
            good.append(rec)
    convs = [[{"role": "user", "content": with_prefix(cfg.prefix, r["user_query"])}] for r in good]
    answers = policy.chat(convs, cfg.max_new_tokens, cfg.temperature, cfg.seed, cfg.batch_size)
    verdicts = judge.complete([prompts.statement_check(r["user_query"], a) for r, a in zip(good, answers)])
    rows, bad = [], []
    for r, a, text in zip(good, answers, verdicts):
        parsed = parse_statement_verdicts(text)
        category = r.get("category") or r.get("_file") or "unknown"
        rows.append({"id": r.get("id"), "category": category, "user_query": r["user_query"], "answer": a,
                     "verdict": text, "statements": parsed})
        if parsed is None:
            bad.append({"id": r.get("id"), "verdict": text[:300]})
    parsed_rows = [r for r in rows if r["statements"] is not None]
    report = {
        "metric": "MaHR / MiHR (lower is better); hallucinated = false or unknown",
        **hallucination_rates([r["statements"] for r in parsed_rows]),
        "false_only": hallucination_rates([r["statements"] for r in parsed_rows], bad=("false",)),
        "num_no_statements": sum(1 for r in parsed_rows if r["statements"] == []),
        "per_category": {},
        "num_answers": len(rows),
        **unparseable_report(bad, len(verdicts)),
        **skips.report(),
    }
    for c in sorted({r["category"] for r in parsed_rows}):
        report["per_category"][c] = hallucination_rates([r["statements"] for r in parsed_rows if r["category"] == c])
    return report, rows
