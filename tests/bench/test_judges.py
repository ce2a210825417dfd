import pytest

from moslim_mega.bench import prompts
from moslim_mega.bench.generate import ChatModel, ConversationError, render_conversation
from moslim_mega.bench.judges import HFJudge, JudgeError, OpenAIJudge, RMJudge, build_judge, parse_spec
from moslim_mega.config import BenchConfig
from moslim_mega.reward.evaluate import score_one
from tiny_lm import JUDGE_REPLY


def test_parse_spec():
    assert parse_spec("openai:http://127.0.0.1:8000/v1#qwen-judge") == ("openai", "http://127.0.0.1:8000/v1", "qwen-judge")
    assert parse_spec("hf:/models/judge") == ("hf", "/models/judge", "")
    assert parse_spec("rm:runs/rm") == ("rm", "runs/rm", "")
    for bad, word in [("gpt4", "expected"), ("claude:x", "unknown kind"), ("hf:", "nothing after"),
                      ("openai:http://h:1", "after '#'"), ("openai:#m", "empty")]:
        with pytest.raises(JudgeError, match=word):
            parse_spec(bad)


def test_openai_judge_normalises_the_base_url(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a key would refuse the plain-http h:8000
    cfg = BenchConfig()
    assert OpenAIJudge("http://h:8000", "m", cfg).base == "http://h:8000/v1"
    assert OpenAIJudge("http://h:8000/v1/", "m", cfg).base == "http://h:8000/v1"
    with pytest.raises(JudgeError, match="http"):
        OpenAIJudge("h:8000", "m", cfg)


def test_hf_judge_gives_the_trained_verdict_and_describes_itself(judge_dir):
    judge = build_judge(f"hf:{judge_dir}", BenchConfig(judge_max_tokens=24))
    assert isinstance(judge, HFJudge)
    convs = [prompts.rating_single("What is 2+2?", "4"), prompts.statement_check("Who wrote Hamlet?", "Shakespeare, in 1600.")]
    assert judge.complete(convs) == [JUDGE_REPLY, JUDGE_REPLY]
    d = judge.describe()
    assert d["spec"] == f"hf:{judge_dir}" and d["kind"] == "hf"


def test_chat_model_rejects_bad_conversations(judge_dir):
    m = ChatModel.from_dir(judge_dir)
    with pytest.raises(ConversationError, match=r"conversations\[0\]: the last message must be a user turn"):
        m.chat([[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]], 4)
    with pytest.raises(ConversationError, match=r"conversations\[1\]\[0\]"):
        m.chat([[{"role": "user", "content": "q"}], [{"role": "bot", "content": "a"}]], 4)


def test_base_model_fallback_renders_an_hh_transcript(judge_dir):
    tok = ChatModel.from_dir(judge_dir).tokenizer
    tok.chat_template = None
    text = render_conversation(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                     {"role": "user", "content": "c"}])
    assert text == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"


def test_rm_judge_mapped_score_equals_rm_score_one(rm_dir):
    # score_one (moslim rm score) is an independent path: parses the prefix itself, maps one pair.
    prefix = "<helpfulness 4><harmlessness 1>"
    judge = RMJudge(str(rm_dir), BenchConfig(rm_prefix=prefix))
    pairs = [("How do I boil an egg?", "Nine minutes in boiling water."), ("Capital of France?", "Lyon.")]
    got = judge.score([p for p, _ in pairs], [r for _, r in pairs])
    want = [score_one(rm_dir, prefix + p, r)["reward"] for p, r in pairs]
    assert got == pytest.approx(want, abs=1e-5)
    assert judge.describe()["prefix"] == prefix and judge.describe()["rm_score"] == "mapped"
    default = RMJudge(str(rm_dir), BenchConfig())
    assert default.prefix == "<helpfulness max><honesty max><harmlessness max>"


def test_rm_judge_expected_class(rm_dir):
    pairs = [("How do I boil an egg?", "Nine minutes in boiling water."), ("Capital of France?", "Lyon.")]
    one = [score_one(rm_dir, p, r)["heads"] for p, r in pairs]
    head = RMJudge(str(rm_dir), BenchConfig(rm_score="expected", rm_head="honest"))  # alias of honesty
    got = head.score([p for p, _ in pairs], [r for _, r in pairs])
    # score_one reports levels (first level 1); the judge reports class indices (from 0).
    assert got == pytest.approx([h["honesty"]["expected_level"] - 1 for h in one], abs=1e-5)
    mean = RMJudge(str(rm_dir), BenchConfig(rm_score="expected"))
    got = mean.score([p for p, _ in pairs], [r for _, r in pairs])
    want = [((h["helpfulness"]["expected_level"] - 1) / 4 + (h["honesty"]["expected_level"] - 1) / 4
             + h["harmlessness"]["expected_level"]) / 3 for h in one]
    assert got == pytest.approx(want, abs=1e-5)
    with pytest.raises(JudgeError, match="bench.rm_head: 'style'"):
        RMJudge(str(rm_dir), BenchConfig(rm_score="expected", rm_head="style"))
    with pytest.raises(JudgeError, match="bench.rm_prefix"):
        RMJudge(str(rm_dir), BenchConfig(rm_prefix="<helpfulness 5> extra words"))
