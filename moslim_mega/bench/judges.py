"""Pluggable judges, chosen by a SPEC string:

    openai:URL#MODEL   any OpenAI-compatible endpoint (vLLM, ``moslim serve``, a hosted API);
                       URL is the base (``http://host:8000`` or ``http://host:8000/v1``).
                       ``OPENAI_API_KEY`` is sent as a bearer token when set (over plain
                       http:// only to loopback, unless ``bench.allow_insecure_key``).
    hf:PATH            a local HF causal LM generating the verdict text
    rm:DIR             a multi-head reward model of this repo (a scalar score, no text)

Text judges (openai, hf) answer conversations; the RM judge scores (prompt, response) pairs.
Every judge describes itself for the report (:meth:`describe`): scores from different judges
are not comparable, and from a non-GPT-4 judge not comparable to the paper's.
"""

from __future__ import annotations

import abc
import ipaddress
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request

import torch

from ..config import BenchConfig

KINDS = ("openai", "hf", "rm")


MAX_RESPONSE_BYTES = 8 << 20
"""Largest judge reply read (a verdict is judge_max_tokens tokens: far below this)."""
ERROR_DETAIL_BYTES = 4096


class JudgeError(ValueError):
    """A bad judge SPEC, or a judge that cannot do what a suite asks; the message says which."""


def _key_safe_url(url: str) -> bool:
    """https, or http to this machine (loopback never leaves it)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Surface a redirect as its HTTPError: following it would carry the Authorization header."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class TextJudge(abc.ABC):
    """A judge that writes a verdict text for each conversation."""

    kind = "text"

    @abc.abstractmethod
    def complete(self, conversations: list[list[dict]]) -> list[str]:
        """One verdict text per conversation, in order."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """What the report records as "the judge used"."""


class OpenAIJudge(TextJudge):
    """POST /v1/chat/completions, one request per conversation, bounded retries.

    ``OPENAI_API_KEY`` (when set) goes only to ``https://`` or loopback ``http://`` endpoints unless
    ``bench.allow_insecure_key``; redirects are never followed (the key would follow them), and a
    reply is read up to :data:`MAX_RESPONSE_BYTES`."""

    kind = "openai"

    def __init__(self, base_url: str, model: str, cfg: BenchConfig):
        base = base_url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise JudgeError(f"judge openai:{base_url}#{model}: the URL must start with http:// or https://")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        self.cfg = cfg
        self.num_requests = 0
        self._key = os.environ.get("OPENAI_API_KEY") or None
        if self._key and not cfg.allow_insecure_key and not _key_safe_url(self.base):
            raise JudgeError(
                f"judge {self.spec}: refusing to send OPENAI_API_KEY over plain http:// to a non-loopback host "
                "(anyone on the path can read it); use https://, unset OPENAI_API_KEY, or set "
                "bench.allow_insecure_key=true to send it anyway"
            )
        self._opener = urllib.request.build_opener(_NoRedirect)

    def _read_reply(self, resp) -> dict:
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
            raise JudgeError(f"judge {self.spec}: reply of {declared} bytes is above the "
                             f"{MAX_RESPONSE_BYTES}-byte cap (judges.MAX_RESPONSE_BYTES)")
        data = resp.read(MAX_RESPONSE_BYTES + 1)
        if len(data) > MAX_RESPONSE_BYTES:
            raise JudgeError(f"judge {self.spec}: reply is above the {MAX_RESPONSE_BYTES}-byte cap "
                             "(judges.MAX_RESPONSE_BYTES)")
        try:
            return json.loads(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise JudgeError(f"judge {self.spec}: the reply is not JSON ({e})") from None

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = "Bearer " + self._key
        last = None
        for attempt in range(max(self.cfg.max_retries, 1)):
            req = urllib.request.Request(self.base + "/chat/completions", data=data, headers=headers, method="POST")
            try:
                with self._opener.open(req, timeout=self.cfg.request_timeout) as resp:
                    self.num_requests += 1
                    return self._read_reply(resp)
            except urllib.error.HTTPError as e:
                detail = e.read(ERROR_DETAIL_BYTES).decode(errors="replace")[:300]
                if 300 <= e.code < 400:
                    raise JudgeError(f"judge {self.spec}: HTTP {e.code} redirect to {e.headers.get('Location')!r} "
                                     "not followed (the API key would go with it); give the final URL") from None
                if e.code < 500:  # a client error will not go away by asking again
                    raise JudgeError(f"judge {self.spec}: HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = str(e)
            if attempt + 1 < self.cfg.max_retries:
                time.sleep(min(2.0**attempt, 10.0))
        raise JudgeError(f"judge {self.spec}: no answer after {self.cfg.max_retries} attempts ({last})")

    @property
    def spec(self) -> str:
        return f"openai:{self.base}#{self.model}"

    def complete(self, conversations: list[list[dict]]) -> list[str]:
        out = []
        for msgs in conversations:
            reply = self._post(
                {
                    "model": self.model,
                    "messages": msgs,
                    "max_tokens": self.cfg.judge_max_tokens,
                    "temperature": self.cfg.judge_temperature,
                    "seed": self.cfg.seed,
                }
            )
            try:
                out.append(reply["choices"][0]["message"]["content"] or "")
            except (KeyError, IndexError, TypeError):
                # A malformed reply is a verdict we cannot parse: counted by the suite, not fatal.
                out.append("")
        return out

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": "openai", "model": self.model, "endpoint": self.base,
                "max_tokens": self.cfg.judge_max_tokens, "temperature": self.cfg.judge_temperature}


class HFJudge(TextJudge):
    """A local HF causal LM as the judge."""

    kind = "hf"

    def __init__(self, path: str, cfg: BenchConfig):
        from .generate import ChatModel

        self.path = path
        self.cfg = cfg
        self.model = ChatModel.from_dir(path)

    def complete(self, conversations: list[list[dict]]) -> list[str]:
        return self.model.chat(
            conversations, self.cfg.judge_max_tokens, self.cfg.judge_temperature, self.cfg.seed, self.cfg.batch_size
        )

    def describe(self) -> dict:
        return {"spec": f"hf:{self.path}", "kind": "hf", "model": self.path,
                "max_tokens": self.cfg.judge_max_tokens, "temperature": self.cfg.judge_temperature,
                "truncated_prompts": self.model.num_truncated}


class RMJudge:
    """A multi-head RM as a scalar scorer: the Eq. 11 mapped reward for ``rm_prefix`` targets
    (empty = every head at its top level), or the expected class (of ``rm_head``, or the mean
    over heads of the expected class scaled to 0-1)."""

    kind = "rm"

    def __init__(self, rm_dir: str, cfg: BenchConfig):
        from ..prefs import parse_prefix, targets_to_tensor
        from ..reward.evaluate import mapper_for
        from ..reward.io import load_reward_model

        self.rm_dir, self.cfg = rm_dir, cfg
        from .generate import default_device

        self.rm = load_reward_model(rm_dir, device=default_device())
        spec = self.rm.spec
        if cfg.rm_score == "mapped":
            prefix = cfg.rm_prefix or "".join(f"<{d.name} max>" for d in spec.dimensions)
            targets, rest = parse_prefix(prefix, spec)
            if rest.strip():
                raise JudgeError(f"bench.rm_prefix: {cfg.rm_prefix!r} must hold only preference tags")
            self.prefix = prefix
            self.targets = targets
            self.mapper = mapper_for(rm_dir, self.rm)
            self._targets_1H = targets_to_tensor([targets], spec)
        else:
            self.prefix = None
            if cfg.rm_head:
                try:
                    spec.index(cfg.rm_head)
                except ValueError:
                    raise JudgeError(f"bench.rm_head: {cfg.rm_head!r} is not a head of {rm_dir} ({', '.join(spec.names)})") from None

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        from ..prefs import PrefixError, check_plain_prompt

        for i, p in enumerate(prompts):  # benchmark prompts carry no prefix; markup is plain text
            try:
                check_plain_prompt(p, self.rm.spec)
            except PrefixError as e:
                raise JudgeError(f"prompt {i}: {e} (the RM would strip it)") from None
        probs = self.rm.probs(prompts, responses, batch_size=max(self.cfg.batch_size, 1))
        if self.cfg.rm_score == "mapped":
            targets_BH = self._targets_1H.expand(len(prompts), -1)
            return [float(x) for x in self.mapper(probs, targets_BH)]
        spec = self.rm.spec
        heads = [spec.index(self.cfg.rm_head)] if self.cfg.rm_head else range(len(spec))
        per_head = []
        for i in heads:
            k = spec.num_classes[i]
            expected_B = (probs[i] * torch.arange(k, dtype=probs[i].dtype)).sum(1)
            per_head.append(expected_B if self.cfg.rm_head else expected_B / max(k - 1, 1))
        return [float(x) for x in torch.stack(per_head, 1).mean(1)]

    def describe(self) -> dict:
        d = {"spec": f"rm:{self.rm_dir}", "kind": "rm", "model": self.rm_dir, "rm_score": self.cfg.rm_score}
        if self.cfg.rm_score == "mapped":
            d.update(prefix=self.prefix, mapping={"kind": self.mapper.kind, "normalize_by": self.mapper.normalize_by})
        else:
            d.update(head=self.cfg.rm_head or "mean over heads (each scaled to 0-1)")
        return d


def parse_spec(spec: str) -> tuple[str, str, str]:
    """``kind:target[#model]`` → (kind, target, model); JudgeError names the bad part."""
    if not isinstance(spec, str) or ":" not in spec:
        raise JudgeError(f"--judge {spec!r}: expected openai:URL#MODEL, hf:PATH or rm:DIR")
    kind, rest = spec.split(":", 1)
    if kind not in KINDS:
        raise JudgeError(f"--judge {spec!r}: unknown kind {kind!r} (one of {', '.join(KINDS)})")
    if not rest:
        raise JudgeError(f"--judge {spec!r}: nothing after '{kind}:'")
    model = ""
    if kind == "openai":
        if "#" not in rest:
            raise JudgeError(f"--judge {spec!r}: an openai judge needs the model name after '#' (openai:URL#MODEL)")
        rest, model = rest.rsplit("#", 1)
        if not model or not rest:
            raise JudgeError(f"--judge {spec!r}: empty URL or model name")
    return kind, rest, model


def build_judge(spec: str, cfg: BenchConfig):
    kind, target, model = parse_spec(spec)
    if kind == "openai":
        return OpenAIJudge(target, model, cfg)
    if kind == "hf":
        return HFJudge(target, cfg)
    return RMJudge(target, cfg)
