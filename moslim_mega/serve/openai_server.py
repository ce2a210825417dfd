"""A minimal OpenAI-compatible server for a local HF causal LM, on the standard library.

    moslim serve --model DIR [--host 127.0.0.1] [--port 8000] [--name NAME]

Endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions`` (``messages``, ``max_tokens`` or
``max_completion_tokens``, ``temperature``, ``seed``; ``n`` must be 1, no streaming). Generation
is this repo's :class:`~moslim_mega.bench.generate.ChatModel`, one request at a time. It exists
so a local model can be a judge over HTTP exactly like a vLLM server; for throughput use vLLM.
``--port 0`` picks a free port; the first stdout line names the address.
"""

from __future__ import annotations

import json
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..bench.generate import ChatModel, ConversationError, check_conversation

DEFAULT_MAX_TOKENS = 256
MAX_BODY_BYTES = 8 << 20


class RequestError(ValueError):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def parse_request(body: dict, served_name: str) -> dict:
    """Validated generation arguments from a chat-completions body; RequestError names the field."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_name:
        raise RequestError(404, f"model {model!r} is not served here (serving {served_name!r})", "model_not_found")
    try:
        check_conversation(body.get("messages"), "messages")
    except ConversationError as e:
        raise RequestError(400, str(e)) from None
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(400, f"max_tokens: must be an integer >= 1, got {max_tokens!r}")
    temperature = body.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise RequestError(400, f"temperature: must be a number >= 0, got {temperature!r}")
    if body.get("n", 1) != 1:
        raise RequestError(400, "n: only n=1 is supported")
    if body.get("stream"):
        raise RequestError(400, "stream: streaming is not supported")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"seed: must be an integer, got {seed!r}")
    return {"messages": body["messages"], "max_tokens": max_tokens, "temperature": float(temperature), "seed": seed}


def completion_body(name: str, answer) -> dict:
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                     "finish_reason": "stop" if answer.finished else "length"}],
        "usage": {"prompt_tokens": answer.num_prompt_tokens, "completion_tokens": answer.num_completion_tokens,
                  "total_tokens": answer.num_prompt_tokens + answer.num_completion_tokens},
    }


def make_handler(chat_model: ChatModel, name: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # one short line per request, on stderr
            super().log_message(fmt, *args)

        def _send(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self._send(status, {"error": {"message": message, "type": kind, "code": status}})

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "moslim"}]})
            else:
                self._error(404, f"no route {self.path}", "not_found")

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}", "not_found")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length <= 0 or length > MAX_BODY_BYTES:
                    raise RequestError(400 if length <= 0 else 413, f"Content-Length {length} out of range")
                try:
                    body = json.loads(self.rfile.read(length))
                except json.JSONDecodeError as e:
                    raise RequestError(400, f"body is not valid JSON: {e.msg}") from None
                args = parse_request(body, name)
                answer = chat_model.chat_detailed(
                    [args["messages"]], args["max_tokens"], args["temperature"], args["seed"], batch_size=1
                )[0]
            except RequestError as e:
                self._error(e.status, str(e), e.kind)
                return
            except Exception as e:  # keep serving; the client sees a 500 with the reason
                self._error(500, f"{type(e).__name__}: {e}", "server_error")
                return
            self._send(200, completion_body(name, answer))

    return Handler


def build_server(model_dir: str, host: str = "127.0.0.1", port: int = 8000, name: str | None = None):
    from pathlib import Path

    chat_model = ChatModel.from_dir(model_dir)
    served = name or Path(model_dir).resolve().name
    server = ThreadingHTTPServer((host, port), make_handler(chat_model, served))
    server.daemon_threads = True
    return server, served


def serve(model_dir: str, host: str, port: int, name: str | None = None) -> int:
    server, served = build_server(model_dir, host, port, name)
    h, p = server.server_address[:2]
    print(f"moslim serve: model {served!r} listening on http://{h}:{p}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
