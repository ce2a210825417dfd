"""Dispatch a benchmark suite: load records, build the policy and the judge, run, write

    OUT/report.json     metrics, the judge used, unparseable verdict and skipped record counts
    OUT/records.jsonl   one row per benchmark item: answers, verdicts, parsed scores
    OUT/config.yaml     the resolved config
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from ..config import Config, to_dict
from . import hackaprompt, halueval, mtbench, rewardbench
from .io import BenchDataError, load_records, write_json, write_jsonl
from .judges import JudgeError, build_judge

SUITES = {"mtbench": mtbench, "halueval": halueval, "hackaprompt": hackaprompt, "rewardbench": rewardbench}


def run_bench(suite: str, data: str, out_dir, cfg: Config, policy_dir: str | None = None,
              rm_dir: str | None = None, judge_spec: str | None = None) -> dict:
    if suite not in SUITES:
        raise ValueError(f"--suite {suite!r}: one of {', '.join(SUITES)}")
    bc = cfg.bench
    if rm_dir and judge_spec:
        raise JudgeError("give either --rm DIR or --judge SPEC, not both (--rm DIR is short for --judge rm:DIR)")
    if rm_dir:
        judge_spec = f"rm:{rm_dir}"
    if suite != "hackaprompt" and not judge_spec:
        raise JudgeError(f"suite {suite} needs --judge SPEC (openai:URL#MODEL, hf:PATH or rm:DIR) or --rm DIR")
    records = load_records(data, bc.split or None)
    if not records:
        raise BenchDataError(f"{data}: no records")
    if bc.limit > 0:
        records = records[: bc.limit]
    policy = None
    if policy_dir:
        from .generate import ChatModel

        policy = ChatModel.from_dir(policy_dir, rollout=cfg.rollout)  # policy answers: the rollout engine
    # Hackaprompt is exact match: a judge given anyway is not loaded, and the report says so.
    judge = build_judge(judge_spec, bc) if judge_spec and suite != "hackaprompt" else None
    start = time.time()
    try:
        report, rows = SUITES[suite].run(records, policy, judge, cfg.bench)
    finally:
        if policy is not None:
            policy.close()  # its rollout engine (vLLM: the in-process engine)
    judge_desc = judge.describe() if judge is not None else {"kind": "exact-match", "spec": None}
    if suite == "hackaprompt" and judge_spec:
        judge_desc["ignored_judge"] = judge_spec
    report = {
        "suite": suite,
        "judge": judge_desc,
        "policy": policy_dir,
        "data": str(data),
        "num_records": len(records),
        **report,
        "truncated_policy_prompts": policy.num_truncated if policy is not None else 0,
        "seconds": round(time.time() - start, 2),
        "note": "scores depend on the judge; they are comparable only between runs with the same judge",
    }
    out = Path(out_dir)
    write_json(out / "report.json", report)
    write_jsonl(out / "records.jsonl", rows)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return report


def headline(report: dict) -> str:
    """One line for the terminal."""
    key = {"mtbench": "score", "halueval": "mahr", "hackaprompt": "success_rate", "rewardbench": "overall"}[report["suite"]]
    val = report.get(key)
    extra = f" mihr={report['mihr']}" if report["suite"] == "halueval" else ""
    return (f"{report['suite']}: {key}={val}{extra} judge={report['judge'].get('spec')} "
            f"unparseable={report.get('num_unparseable', 0)}/{report.get('num_verdicts', 0)} "
            f"skipped={report.get('num_skipped', 0)}")
