"""A minimal OpenAI-compatible server for a local HF causal LM, on the standard library.

    moslim serve --model DIR [--host 127.0.0.1] [--port 8000] [--name NAME]
                 [--max-tokens-limit 4096] [--max-body-bytes 8388608]

Endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions`` (``messages``, ``max_tokens`` or
``max_completion_tokens``, ``temperature``, ``seed``, ``logprobs``/``top_logprobs``). Every other
request parameter is refused with a 400 naming it unless it has its neutral value (``n=1``,
``stream=false``, ``top_p=1`` ...): a client is never answered as if a setting took effect when it
did not. Generation is this repo's :class:`~moslim_mega.bench.generate.ChatModel`, one request at
a time. It exists so a local model can be a judge over HTTP exactly like a vLLM server; for
throughput use vLLM. ``--port 0`` picks a free port; the first stdout line names the address.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from ..bench.generate import ChatModel, ConversationError, check_conversation

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_TOKENS_LIMIT = 4096
MAX_BODY_BYTES = 8 << 20
MAX_TOP_LOGPROBS = 20  # OpenAI's own bound
ROUTES = "GET /v1/models, POST /v1/chat/completions"

# Parameters accepted only at the value that means "feature off": any other value would ask for
# something this server does not do. `user` only labels the caller, so any value is harmless.
NEUTRAL = {"n": 1, "stream": False, "top_p": 1, "frequency_penalty": 0, "presence_penalty": 0,
           "logit_bias": {}, "stop": [], "tools": [], "functions": [], "store": False}
HANDLED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "seed", "logprobs",
           "top_logprobs", "user"}


class RequestError(ValueError):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


def _reject_unsupported(body: dict) -> None:
    for key, value in body.items():
        if key in HANDLED or value is None:  # an explicit null is the same as leaving it out
            continue
        if key in NEUTRAL:
            neutral = NEUTRAL[key]
            if isinstance(value, bool) == isinstance(neutral, bool) and value == neutral:
                continue
            raise RequestError(400, f"{key}: only {key}={json.dumps(NEUTRAL[key])} is supported by moslim serve, "
                                    f"got {json.dumps(value)}", param=key)
        raise RequestError(400, f"{key}: parameter not supported by moslim serve", param=key)


def _int_field(body: dict, key: str, lo: int, hi: int, default):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(400, f"{key}: must be an integer in [{lo}, {hi}], got {value!r}", param=key)
    return value


def _max_tokens(body: dict, limit: int, limit_name: str) -> int:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    if value is None:
        return min(DEFAULT_MAX_TOKENS, limit)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(400, f"{key}: must be an integer >= 1, got {value!r}", param=key)
    if value > limit:
        raise RequestError(400, f"{key}: {value} is above this server's limit of {limit} ({limit_name})", param=key)
    return value


def _check_messages(messages) -> None:
    try:
        check_conversation(messages, "messages")
    except ConversationError as e:
        raise RequestError(400, str(e), param="messages") from None
    for i, m in enumerate(messages):
        extra = sorted(set(m) - {"role", "content"})
        if extra:  # e.g. `name` or `tool_calls`: not rendered, so refused rather than dropped
            raise RequestError(400, f"messages[{i}].{extra[0]}: not supported by moslim serve", param="messages")


def parse_request(body: dict, served_name: str, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
                  limit_name: str = "moslim serve --max-tokens-limit") -> dict:
    """Validated generation arguments from a chat-completions body; RequestError names the field."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_name:
        raise RequestError(404, f"model {model!r} is not served here (serving {served_name!r})", "model_not_found",
                           param="model")
    _reject_unsupported(body)
    _check_messages(body.get("messages"))
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise RequestError(400, f"temperature: must be a number >= 0, got {temperature!r}", param="temperature")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"seed: must be an integer, got {seed!r}", param="seed")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise RequestError(400, f"logprobs: must be true or false, got {logprobs!r}", param="logprobs")
    top = _int_field(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None)
    if top is not None and not logprobs:
        raise RequestError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
    return {"messages": body["messages"], "max_tokens": _max_tokens(body, max_tokens_limit, limit_name),
            "temperature": float(temperature), "seed": seed,
            "top_logprobs": (top or 0) if logprobs else None}


def _token_entry(tokenizer, token_id: int, logprob: float) -> dict:
    # The token's text as decoded alone; `bytes` are its UTF-8 (a byte-level token holding part of
    # a multi-byte character decodes to U+FFFD, as in vLLM).
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def logprobs_body(tokenizer, answer) -> dict:
    """The OpenAI ``choices[i].logprobs`` object for an answer generated with top_logprobs."""
    content = []
    for tok in answer.tokens:
        entry = _token_entry(tokenizer, tok.token_id, tok.logprob)
        entry["top_logprobs"] = [_token_entry(tokenizer, i, lp) for i, lp in tok.top]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_body(name: str, answer, logprobs: dict | None = None) -> dict:
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text}, "logprobs": logprobs,
                     "finish_reason": "stop" if answer.finished else "length"}],
        "usage": {"prompt_tokens": answer.num_prompt_tokens, "completion_tokens": answer.num_completion_tokens,
                  "total_tokens": answer.num_prompt_tokens + answer.num_completion_tokens},
    }


def effective_limit(chat_model: ChatModel, max_tokens_limit: int) -> tuple[int, str]:
    """The max_tokens bound and what sets it: the flag, or the model's context (one prompt token left)."""
    if chat_model.max_positions and chat_model.max_positions - 1 < max_tokens_limit:
        return chat_model.max_positions - 1, f"the model's {chat_model.max_positions} positions minus one prompt token"
    return max_tokens_limit, "moslim serve --max-tokens-limit"


def make_handler(chat_model: ChatModel, name: str, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
                 max_body_bytes: int = MAX_BODY_BYTES):
    limit, limit_name = effective_limit(chat_model, max_tokens_limit)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 120  # seconds a stalled client may hold its connection (and thread)

        def _send(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str = "invalid_request_error", param=None) -> None:
            self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})

        def _no_route(self) -> None:
            # The body (if any) is left unread, so this connection cannot carry another request.
            self.close_connection = True
            path = urlsplit(self.path).path
            self._error(404, f"no route {self.command} {path}: moslim serve implements only {ROUTES}", "not_found")

        do_PUT = do_DELETE = do_PATCH = _no_route

        def do_GET(self):
            if urlsplit(self.path).path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "moslim"}]})
            else:
                self._no_route()

        def _read_body(self) -> dict:
            if self.headers.get("Transfer-Encoding"):
                raise RequestError(411, "Transfer-Encoding: send the body with a Content-Length instead")
            raw = self.headers.get("Content-Length")
            try:
                length = int(raw)
            except (TypeError, ValueError):
                status = 411 if raw is None else 400
                raise RequestError(status, f"Content-Length: expected a byte count, got {raw!r}") from None
            if length > max_body_bytes:
                raise RequestError(413, f"request body of {length} bytes is above this server's limit of "
                                        f"{max_body_bytes} bytes (moslim serve --max-body-bytes)")
            if length <= 0:
                raise RequestError(400, "the request body is empty")
            data = self.rfile.read(length)
            try:
                return json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"body is not valid JSON: {getattr(e, 'msg', e)}") from None

        def _complete(self) -> dict:
            body = self._read_body()
            args = parse_request(body, name, limit, limit_name)
            try:
                answer = chat_model.chat_detailed([args["messages"]], args["max_tokens"], args["temperature"],
                                                  args["seed"], batch_size=1, top_logprobs=args["top_logprobs"])[0]
            except ConversationError as e:
                raise RequestError(400, str(e)) from None
            lp = logprobs_body(chat_model.tokenizer, answer) if args["top_logprobs"] is not None else None
            return completion_body(name, answer, lp)

        def do_POST(self):
            if urlsplit(self.path).path.rstrip("/") != "/v1/chat/completions":
                self._no_route()
                return
            try:
                reply = self._complete()
            except RequestError as e:
                # A refused body may be unread (413, 411): never parse it as the next request.
                self.close_connection = True
                self._error(e.status, str(e), e.kind, e.param)
                return
            except Exception:  # keep serving; the detail goes to the log, never to the client
                ref = uuid.uuid4().hex[:12]
                sys.stderr.write(f"moslim serve: error {ref} in {self.command} {self.path}:\n{traceback.format_exc()}")
                sys.stderr.flush()
                self.close_connection = True
                self._error(500, f"internal server error (reference {ref}; the detail is in the server log)",
                            "server_error")
                return
            self._send(200, reply)

    return Handler


def build_server(model_dir: str, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
                 max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, max_body_bytes: int = MAX_BODY_BYTES):
    from pathlib import Path

    for flag, value in (("--max-tokens-limit", max_tokens_limit), ("--max-body-bytes", max_body_bytes)):
        if value < 1:
            raise ValueError(f"moslim serve {flag}: must be >= 1, got {value}")
    chat_model = ChatModel.from_dir(model_dir)
    served = name or Path(model_dir).resolve().name
    server = ThreadingHTTPServer((host, port), make_handler(chat_model, served, max_tokens_limit, max_body_bytes))
    server.daemon_threads = True
    return server, served


def serve(model_dir: str, host: str, port: int, name: str | None = None,
          max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, max_body_bytes: int = MAX_BODY_BYTES) -> int:
    server, served = build_server(model_dir, host, port, name, max_tokens_limit, max_body_bytes)
    h, p = server.server_address[:2]
    print(f"moslim serve: model {served!r} listening on http://{h}:{p}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
