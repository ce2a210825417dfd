"""The openai: judge's HTTP client: where the API key may go, redirects, and the reply size cap.
Fake endpoints are real HTTP servers on 127.0.0.1 in a thread (no model needed)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from moslim_mega.bench import judges
from moslim_mega.bench.judges import JudgeError, OpenAIJudge
from moslim_mega.config import BenchConfig

KEY = "sk-test-not-a-real-key"
REPLY = {"choices": [{"message": {"role": "assistant", "content": "Rating: [[7]]"}}]}


@pytest.fixture
def endpoint():
    """Start fake endpoints: endpoint(respond) → (base URL, list of (path, headers) it received)."""
    servers = []

    def start(respond):
        seen = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _any(self):
                seen.append((self.path, dict(self.headers)))
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                respond(self)

            do_GET = do_POST = _any

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(srv)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{srv.server_address[1]}", seen

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _json(handler, obj, status=200, length=True):
    data = json.dumps(obj).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    if length:
        handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@pytest.mark.parametrize("url", ["http://10.0.0.5:8000/v1", "http://judge.example.com", "http://127.0.0.1.nip.io"])
def test_key_is_refused_over_plain_http_to_another_host(monkeypatch, url):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with pytest.raises(JudgeError, match="bench.allow_insecure_key") as e:
        OpenAIJudge(url, "m", BenchConfig())
    assert KEY not in str(e.value)


@pytest.mark.parametrize("url", ["https://judge.example.com", "http://127.0.0.1:8000", "http://127.8.9.1",
                                 "http://localhost:8000/v1", "http://[::1]:8000"])
def test_key_is_allowed_over_https_and_to_loopback(monkeypatch, url):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    OpenAIJudge(url, "m", BenchConfig())


def test_insecure_key_opt_in_and_no_key_at_all(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    OpenAIJudge("http://10.0.0.5:8000", "m", BenchConfig(allow_insecure_key=True))
    monkeypatch.delenv("OPENAI_API_KEY")
    OpenAIJudge("http://10.0.0.5:8000", "m", BenchConfig())  # nothing secret to leak


def test_key_reaches_a_loopback_endpoint(monkeypatch, endpoint):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    url, seen = endpoint(lambda h: _json(h, REPLY))
    assert OpenAIJudge(url, "m", BenchConfig()).complete([[{"role": "user", "content": "q"}]]) == ["Rating: [[7]]"]
    assert seen[0][0] == "/v1/chat/completions" and seen[0][1]["Authorization"] == "Bearer " + KEY


def test_redirect_is_not_followed_with_the_key(monkeypatch, endpoint):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    elsewhere, hits = endpoint(lambda h: _json(h, REPLY))

    def redirect(h):
        h.send_response(302)
        h.send_header("Location", elsewhere + "/v1/chat/completions")
        h.send_header("Content-Length", "0")
        h.end_headers()

    url, _ = endpoint(redirect)
    with pytest.raises(JudgeError, match="HTTP 302 redirect .* not followed"):
        OpenAIJudge(url, "m", BenchConfig(max_retries=1)).complete([[{"role": "user", "content": "q"}]])
    assert hits == []  # the redirect target never saw a request (nor the key)


@pytest.mark.parametrize("with_length", [True, False])
def test_oversized_reply_fails_naming_the_cap(monkeypatch, endpoint, with_length):
    monkeypatch.setattr(judges, "MAX_RESPONSE_BYTES", 1000)
    big = {"choices": [{"message": {"role": "assistant", "content": "x" * 5000}}]}

    def respond(h):
        h.close_connection = True  # without a length, the end of the reply is the connection's end
        _json(h, big, length=with_length)

    url, _ = endpoint(respond)
    with pytest.raises(JudgeError, match="1000-byte cap"):
        OpenAIJudge(url, "m", BenchConfig(max_retries=1)).complete([[{"role": "user", "content": "q"}]])
    # Under the cap the same kind of reply is read whole.
    monkeypatch.setattr(judges, "MAX_RESPONSE_BYTES", 10_000)
    judge = OpenAIJudge(url, "m", BenchConfig(max_retries=1))
    assert judge.complete([[{"role": "user", "content": "q"}]]) == ["x" * 5000]


def test_non_json_reply_is_a_judge_error(endpoint):
    def respond(h):
        h.send_response(200)
        h.send_header("Content-Length", "9")
        h.end_headers()
        h.wfile.write(b"<html>hi!")

    url, _ = endpoint(respond)
    with pytest.raises(JudgeError, match="not JSON"):
        OpenAIJudge(url, "m", BenchConfig(max_retries=1)).complete([[{"role": "user", "content": "q"}]])
