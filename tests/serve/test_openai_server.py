"""The OpenAI-compatible judge path against a real HTTP server (``moslim serve`` in a subprocess,
on 127.0.0.1) running a real tiny model; its verdicts must equal the in-process hf: judge's."""

import json
import os
import selectors
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from moslim_mega.bench import mtbench, prompts
from moslim_mega.bench.generate import ChatModel
from moslim_mega.bench.judges import HFJudge, JudgeError, OpenAIJudge, build_judge
from moslim_mega.config import BenchConfig
from tiny_lm import JUDGE_REPLY

REPO = Path(__file__).resolve().parents[2]
MTBENCH_SMALL = [{"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now about snow."]}]
STARTUP_S = 180


@pytest.fixture(scope="module")
def server(judge_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moslim_mega.cli", "serve", "--model", str(judge_dir), "--port", "0", "--name", "tiny-judge"],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=REPO,
        )
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=STARTUP_S):
            pytest.fail(f"server did not start within {STARTUP_S}s; stderr:\n{log.read_text()[-2000:]}")
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line + log.read_text()[-2000:]
        url = line.strip().rsplit(" ", 1)[1]
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def _post(url, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_chat_completion_shape(server):
    with urllib.request.urlopen(server + "/models", timeout=30) as r:
        models = json.loads(r.read())
    assert [m["id"] for m in models["data"]] == ["tiny-judge"]
    status, body = _post(server, {"model": "tiny-judge", "messages": prompts.rating_single("q", "a"),
                                  "max_tokens": 40, "temperature": 0})
    assert status == 200
    assert body["object"] == "chat.completion" and body["model"] == "tiny-judge"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": JUDGE_REPLY}
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    # Cut short: finish_reason says so.
    _, body = _post(server, {"messages": [{"role": "user", "content": "q"}], "max_tokens": 2, "temperature": 0})
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    "body, status, word",
    [
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "q"}]}, 404, "not served"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "q"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "q"}], "temperature": -1}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "q"}], "n": 2}, 400, "n="),
    ],
)
def test_bad_requests_get_openai_style_errors(server, body, status, word):
    got, reply = _post(server, body)
    assert got == status and word in reply["error"]["message"]


def test_invalid_json_is_a_400(server):
    got, reply = _post(server, None, raw=b"{not json")
    assert got == 400 and "JSON" in reply["error"]["message"]


def test_http_verdicts_equal_in_process_hf_verdicts(server, judge_dir):
    cfg = BenchConfig(judge_max_tokens=24, max_new_tokens=12)
    http = build_judge(f"openai:{server}#tiny-judge", cfg)
    assert isinstance(http, OpenAIJudge)
    local = HFJudge(str(judge_dir), cfg)
    convs = [prompts.rating_single("What is 2+2?", "4"),
             prompts.rating_followup("Name a fruit.", "Apple.", "Another?", "Pear."),
             prompts.statement_check("Who wrote Hamlet?", "Shakespeare wrote it in 1600.")]
    verdicts = http.complete(convs)
    assert verdicts == local.complete(convs) == [JUDGE_REPLY] * 3
    assert http.num_requests == 3
    # The whole suite through HTTP gives the same report numbers as through the in-process judge.
    policy = ChatModel.from_dir(judge_dir)  # any HF model can answer; the judge's verdicts are what count here
    rep_http, _ = mtbench.run(MTBENCH_SMALL, policy, http, cfg)
    rep_local, _ = mtbench.run(MTBENCH_SMALL, policy, local, cfg)
    assert rep_http["score"] == rep_local["score"] == 7.0
    assert rep_http["num_unparseable"] == rep_local["num_unparseable"] == 0
    assert http.describe()["spec"] == f"openai:{server}#tiny-judge"


def test_unreachable_endpoint_fails_after_bounded_retries():
    cfg = BenchConfig(max_retries=2, request_timeout=2.0)
    judge = OpenAIJudge("http://127.0.0.1:9", "m", cfg)  # port 9 (discard): nothing listens
    start = time.time()
    with pytest.raises(JudgeError, match="no answer after 2 attempts"):
        judge.complete([prompts.rating_single("q", "a")])
    assert time.time() - start < 30


def test_cli_bench_run_with_the_http_judge_names_it_in_the_report(server, judge_dir, tmp_path):
    from moslim_mega.cli import main

    data = tmp_path / "question.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MTBENCH_SMALL))
    out = tmp_path / "out"
    spec = f"openai:{server}#tiny-judge"
    rc = main(["eval", "bench", "--suite", "mtbench", "--data", str(data), "--policy", str(judge_dir), "--judge", spec,
               "--out", str(out), "bench.max_new_tokens=8", "bench.judge_max_tokens=24"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["judge"]["spec"] == spec and report["judge"]["kind"] == "openai"
    assert report["score"] == 7.0 and report["num_verdicts"] == 2 and report["num_unparseable"] == 0
