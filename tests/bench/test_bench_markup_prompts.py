"""Benchmark prompts that open with markup (RewardBench, MT-Bench: HTML, XML, chat tokens) through
the RM judge and `moslim eval bench --suite rewardbench` (issue 13, item 1)."""

import json

import pytest
from bench_fixture_data import write_jsonl

from moslim_mega.bench.judges import JudgeError, RMJudge
from moslim_mega.cli import main
from moslim_mega.config import BenchConfig
from moslim_mega.reward.evaluate import score_one

MARKUP_PROMPTS = ['<div class="q">What is 2+2?</div>', "<code>print(1)</code> output?", '<html lang="en">Hi',
                  "<|im_start|>user\nHi<|im_end|>", "</s>Go on.", "<!-- c --> Summarise."]


def test_rm_judge_scores_prompts_that_open_with_markup(rm_dir):
    """The RM judge scores markup-led prompts as text, exactly as `rm score` does with the
    judge's prefix in front."""
    prefix = "<helpfulness 5><harmlessness 1>"
    judge = RMJudge(str(rm_dir), BenchConfig(rm_prefix=prefix))
    responses = ["Four."] * len(MARKUP_PROMPTS)
    got = judge.score(MARKUP_PROMPTS, responses)
    want = [score_one(rm_dir, prefix + p, r) for p, r in zip(MARKUP_PROMPTS, responses)]
    assert [w["prompt_seen_by_rm"] for w in want] == MARKUP_PROMPTS
    assert got == pytest.approx([w["reward"] for w in want], abs=1e-5)
    expected = RMJudge(str(rm_dir), BenchConfig(rm_score="expected")).score(MARKUP_PROMPTS, responses)
    assert len(expected) == len(MARKUP_PROMPTS)


@pytest.mark.parametrize("prompt, named", [("<helpfulness 2>hi", "<helpfulness 2>"), ("<foo 3>hi", "<foo 3>")])
def test_rm_judge_refuses_a_prompt_that_opens_with_a_preference_tag(rm_dir, prompt, named):
    # A benchmark prompt carries no prefix: a tag there would be stripped (or fail) silently.
    judge = RMJudge(str(rm_dir), BenchConfig())
    with pytest.raises(JudgeError, match=f"prompt 1: .*{named}"):
        judge.score(["<p>fine</p>", prompt], ["a", "b"])


def test_rewardbench_run_with_markup_prompts(tmp_path, rm_dir):
    records = [{"prompt": p, "chosen": "A full answer.", "rejected": "No.", "subset": "alpacaeval-easy", "id": i}
               for i, p in enumerate(MARKUP_PROMPTS)]
    data = write_jsonl(tmp_path / "rb.jsonl", records)
    out = tmp_path / "out"
    assert main(["eval", "bench", "--suite", "rewardbench", "--data", str(data), "--out", str(out),
                 "--rm", str(rm_dir)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_pairs"] == len(MARKUP_PROMPTS) and report["skipped"] == []
