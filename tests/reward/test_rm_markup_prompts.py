"""Real-data prompts that open with markup (HTML, XML, JSX, <code>, chat tokens) through the RM
path: `rm train` on such records, `rm eval` on them and `rm score` of a markup prompt with and
without a preference prefix (issue 13, item 1)."""

import json

import pytest

from moslim_mega.cli import main

MARKUP = [
    '<div class="question">How do I centre a div?</div>',
    "<code>for i in range(3): print(i)</code> What does this print?",
    '<html lang="en"><body>Summarise this page.</body></html>',
    "<|im_start|>user\nTranslate 'cat' to French.<|im_end|>",
    "<!-- draft --> Write a haiku about rain.",
    "</s>Continue the story.",
    "<Button onClick={submit}>Send</Button> why does this not render?",
    "<b>bold</b> or <i>italic</i> for emphasis?",
]
TINY = ["rm.model.hidden_size=32", "rm.model.intermediate_size=64", "rm.model.num_layers=1", "rm.model.num_heads=2"]


def _records(prefixed: bool) -> list[dict]:
    rows = []
    for i, prompt in enumerate(MARKUP):
        for j, (response, rating) in enumerate((("A careful, correct answer.", 5), ("no", 1))):
            prefix = "<helpfulness 5><harmless 1>" if prefixed and j == 0 else ""
            rows.append({"prompt": prefix + prompt, "response": response, "prompt_id": f"p{i}",
                         "ratings": {"helpfulness": rating, "honesty": rating, "harmlessness": j == 0}})
    return rows


@pytest.fixture(scope="module")
def markup_rm(tmp_path_factory):
    root = tmp_path_factory.mktemp("markup_rm")
    data = root / "data"
    data.mkdir()
    for name, prefixed in (("rm_train.jsonl", True), ("rm_eval.jsonl", False)):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in _records(prefixed)))
    args = ["rm", "train", "--out", str(root / "rm"), f"run.data_dir={data}", "run.tensorboard=false", *TINY,
            "rm.epochs=1", "rm.batch_size=8", "rm.eval_every=0", "rm.warmup_steps=1"]
    assert main(args) == 0
    return root


def test_rm_trains_and_evaluates_on_markup_prompts(markup_rm, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["rm", "eval", "--rm", str(markup_rm / "rm"), "--data", str(markup_rm / "data" / "rm_eval.jsonl"),
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["num_examples"] == 2 * len(MARKUP)


@pytest.mark.parametrize("markup", MARKUP[:4])
def test_rm_score_keeps_markup_after_and_without_a_prefix(markup_rm, markup, capsys):
    rm = str(markup_rm / "rm")
    assert main(["rm", "score", "--rm", rm, "--prompt", "<helpfulness 4><harmless 1>" + markup,
                 "--response", "An answer."]) == 0
    prefixed = json.loads(capsys.readouterr().out)
    assert prefixed["prompt_seen_by_rm"] == markup
    assert prefixed["targets"] == {"helpfulness": 4, "harmlessness": 1}
    assert main(["rm", "score", "--rm", rm, "--prompt", markup, "--response", "An answer."]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["prompt_seen_by_rm"] == markup and plain["targets"] == {}
    # the same stripped prompt → the same head distributions
    assert plain["heads"]["helpfulness"]["probs"] == prefixed["heads"]["helpfulness"]["probs"]


@pytest.mark.parametrize("bad, named", [("<helpfulness 9><div>x</div>", "<helpfulness 9>"), ("<foo 3><div>x", "foo"),
                                        ("<helpfulness><code>x", "<helpfulness>")])
def test_rm_score_still_refuses_bad_tags_before_markup(markup_rm, bad, named, capsys):
    assert main(["rm", "score", "--rm", str(markup_rm / "rm"), "--prompt", bad, "--response", "x"]) == 2
    assert named in capsys.readouterr().err
