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

import openai  # the dev extra installs it: a missing client is an error, not a skip
import pytest

from moslim_mega.bench import mtbench, prompts
from moslim_mega.bench.generate import ChatModel
from moslim_mega.bench.judges import HFJudge, JudgeError, OpenAIJudge, build_judge
from moslim_mega.config import BenchConfig
from tiny_lm import JUDGE_REPLY

REPO = Path(__file__).resolve().parents[2]
MTBENCH_SMALL = [{"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now about snow."]}]
STARTUP_S = 180
TOKENS_LIMIT = 64
BODY_LIMIT = 65536


@pytest.fixture(scope="module")
def server(judge_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moslim_mega.cli", "serve", "--model", str(judge_dir), "--port", "0", "--name", "tiny-judge",
             "--max-tokens-limit", str(TOKENS_LIMIT), "--max-body-bytes", str(BODY_LIMIT)],
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


# --- the official `openai` client against `moslim serve` -------------------------------------------

USER_Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def client(server):
    c = openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()


def test_openai_client_chat_completion(client):
    r = client.chat.completions.create(model="tiny-judge", messages=USER_Q, max_tokens=40, temperature=0, seed=3)
    assert r.choices[0].message.content == JUDGE_REPLY and r.choices[0].finish_reason == "stop"
    assert r.choices[0].logprobs is None  # not asked for
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_client_logprobs_equal_a_plain_forward_pass(client, judge_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moslim_mega.bench.generate import render_conversation

    r = client.chat.completions.create(model="tiny-judge", messages=USER_Q, max_tokens=40, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content == JUDGE_REPLY
    assert r.usage.completion_tokens == len(content) + 1  # + the EOS, which has no entry (as in OpenAI)
    # Independent check: one forward pass over prompt + answer, teacher-forced.
    tok = AutoTokenizer.from_pretrained(judge_dir)
    model = AutoModelForCausalLM.from_pretrained(judge_dir).eval()
    prompt = tok(render_conversation(tok, USER_Q), add_special_tokens=False)["input_ids"]
    answer = tok(JUDGE_REPLY, add_special_tokens=False)["input_ids"]
    assert len(answer) == len(content)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].float(), -1)
    for t, (entry, token_id) in enumerate(zip(content, answer)):
        step = logp[len(prompt) - 1 + t]
        assert entry.logprob == pytest.approx(float(step[token_id]), abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
        tops = entry.top_logprobs
        assert len(tops) == 3 and [x.logprob for x in tops] == sorted((x.logprob for x in tops), reverse=True)
        assert tops[0].token == entry.token and tops[0].logprob == pytest.approx(entry.logprob)  # greedy = top-1
        want = torch.topk(step, 3)
        assert [x.logprob for x in tops] == pytest.approx(want.values.tolist(), abs=1e-4)
        assert [x.token for x in tops] == [tok.decode([i]) for i in want.indices.tolist()]
    # logprobs without alternatives; top_logprobs without logprobs is refused.
    r = client.chat.completions.create(model="tiny-judge", messages=USER_Q, max_tokens=40, temperature=0, logprobs=True)
    assert len(r.choices[0].logprobs.content) == len(answer) and r.choices[0].logprobs.content[0].top_logprobs == []
    with pytest.raises(openai.BadRequestError, match="top_logprobs: needs logprobs=true"):
        client.chat.completions.create(model="tiny-judge", messages=USER_Q, max_tokens=4, top_logprobs=2)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(n=2), "n: only n=1"),
        (dict(stream=True), "stream: only stream=false"),
        (dict(stop=["."]), "stop: only"),
        (dict(top_p=0.5), "top_p: only top_p=1"),
        (dict(presence_penalty=1.0), "presence_penalty: only"),
        (dict(logit_bias={"5": 10}), "logit_bias: only"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
         "tools: only"),
        (dict(response_format={"type": "json_object"}), "response_format: parameter not supported"),
        (dict(extra_body={"top_k": 5}), "top_k: parameter not supported"),
        (dict(messages=[{"role": "user", "content": "q", "name": "bob"}]), r"messages\[0\].name: not supported"),
        (dict(max_tokens=TOKENS_LIMIT + 1), f"max_tokens: {TOKENS_LIMIT + 1} is above this server's limit of "
                                            f"{TOKENS_LIMIT} \\(moslim serve --max-tokens-limit\\)"),
        (dict(max_completion_tokens=10**6), "max_completion_tokens: 1000000 is above"),
    ],
)
def test_openai_client_unsupported_parameters_are_400s_naming_them(client, kwargs, word):
    args = {"model": "tiny-judge", "messages": USER_Q, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError, match=word):
        client.chat.completions.create(**args)


def test_openai_client_neutral_values_are_accepted(client):
    r = client.chat.completions.create(model="tiny-judge", messages=USER_Q, max_tokens=TOKENS_LIMIT, temperature=0,
                                       n=1, stream=False, top_p=1, presence_penalty=0, frequency_penalty=0, user="u1")
    assert r.choices[0].message.content == JUDGE_REPLY


def test_unknown_route_is_a_json_404_and_the_connection_stays_usable(client, server):
    with pytest.raises(openai.NotFoundError, match="no route POST /v1/completions") as e:
        client.completions.create(model="tiny-judge", prompt="hello", max_tokens=4)
    assert e.value.body["type"] == "not_found"
    # The same client (a kept-alive connection) still works: the 404's unread body was not taken
    # for the next request.
    r = client.chat.completions.create(model="tiny-judge", messages=USER_Q, max_tokens=40, temperature=0)
    assert r.choices[0].message.content == JUDGE_REPLY
    try:
        urllib.request.urlopen(server + "/embeddings", timeout=30)
        pytest.fail("GET /v1/embeddings answered")
    except urllib.error.HTTPError as err:
        assert err.code == 404 and json.loads(err.read())["error"]["message"].startswith("no route GET /v1/embeddings")


def test_request_body_size_is_bounded(server):
    big = {"messages": [{"role": "user", "content": "x" * BODY_LIMIT}], "max_tokens": 1}
    got, reply = _post(server, big)
    assert got == 413 and f"limit of {BODY_LIMIT} bytes (moslim serve --max-body-bytes)" in reply["error"]["message"]
    # A declared length that is too large is refused before any of it is read.
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(server)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Length", str(10**12))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413 and "above this server's limit" in json.loads(resp.read())["error"]["message"]
    finally:
        conn.close()


def test_internal_errors_are_generic_500s_logged_on_stderr(judge_dir, capfd, monkeypatch):
    """In process: a model failure must not reach the client, only the server log."""
    import threading

    from moslim_mega.serve.openai_server import build_server

    srv, _ = build_server(str(judge_dir), port=0, name="tiny-judge")
    handler_model = ChatModel  # the server's model is an instance of this class: make its generate fail

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail /home/someone/model.bin")

    monkeypatch.setattr(handler_model, "chat_detailed", broken)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="tiny-judge", messages=USER_Q, max_tokens=4)
        c.close()
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
    assert "secret" not in str(e.value) and "RuntimeError" not in str(e.value)
    assert "internal server error (reference" in str(e.value)
    ref = e.value.body["message"].split("reference ")[1].split(";")[0]
    err = capfd.readouterr().err
    assert f"error {ref}" in err and "RuntimeError: secret detail /home/someone/model.bin" in err
