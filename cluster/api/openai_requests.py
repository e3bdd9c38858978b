"""OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`) checked and turned into the
job the built-in inferlet runs (inferlets/builtin/openai_server.py reads it as JSON).

Unknown fields are ignored, as OpenAI does; a bad value raises ApiError with OpenAI's error type,
the parameter's name and the HTTP status to answer with.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # each
MAX_TOP_LOGPROBS = 20  # as OpenAI
MAX_MESSAGES = 1024
MAX_SEED = 2**63 - 1


class ApiError(Exception):
    """An answer other than 200: OpenAI's error object with this HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request, checked: `spec` goes to the inferlet (JSON), the rest shapes the answer."""

    chat: bool  # /v1/chat/completions, else /v1/completions
    model: str
    stream: bool
    include_usage: bool  # stream_options.include_usage
    logprobs: int | None  # None: none asked; else how many top alternatives per token (0 = only the token's)
    spec: dict = field(default_factory=dict)

    def argument(self) -> str:
        return json.dumps(self.spec, separators=(",", ":"))


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


def _number(body: dict, name: str, default, low, high, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _bad(name, f"'{name}' must be {'an integer' if integer else 'a number'}, not {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise _bad(name, f"'{name}' is {value}; it must be between {low} and {high}")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, f"'{name}' must be true or false")
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop", "'stop' must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise _bad("stop", f"at most {MAX_STOP} stop strings of at most {MAX_STOP_CHARS} characters each")
    return stops


def _messages(body: dict) -> list[list[str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise _bad("messages", f"at most {MAX_MESSAGES} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones, joined
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content", "only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string or text parts")
        out.append([m["role"], content])
    return out


def _prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in prompt):
        return prompt  # token ids
    raise _bad("prompt", "'prompt' must be a string, a list of one string, or a list of token ids "
                         "(several prompts in one request are not supported: send one request each)")


def _response_format(body: dict) -> dict | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in (None, "text"):
        if kind is None:
            raise _bad("response_format", "'response_format' must be an object with a 'type'")
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt.get("json_schema"), dict) else None
        if not isinstance(schema, dict):
            raise _bad("response_format.json_schema.schema", "'json_schema' must carry a 'schema' object")
        return schema
    raise _bad("response_format.type", f"response_format type {kind!r} is not one of text, json_object, json_schema")


def parse(body, chat: bool, served_model: str, max_tokens_limit: int) -> Job:
    """Check a request body; the Job to run. Raises ApiError (400, or 404 for another model)."""
    if not isinstance(body, dict):
        raise _bad(None, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "'model' is required: a string naming the model (GET /v1/models lists it)")
    if model != served_model:
        raise ApiError(404, f"the model {model!r} does not exist here; this server serves {served_model!r}",
                       param="model", code="model_not_found")
    limit = _number(body, "max_completion_tokens", None, 1, max_tokens_limit, integer=True) if chat else None
    max_tokens = _number(body, "max_tokens", limit, 1, max_tokens_limit, integer=True)
    if max_tokens is None:
        max_tokens = 16 if not chat else max_tokens_limit  # OpenAI's defaults: 16, and the context's room
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    if chat:
        logprobs = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True) if _flag(body, "logprobs") \
            else None
        if logprobs is None and body.get("top_logprobs") is not None:
            raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    else:
        logprobs = _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _bad("stream_options", "'stream_options' must be an object")
    top_k = _number(body, "top_k", 0, -1, 1 << 20, integer=True)
    spec = {
        "max_tokens": max_tokens,
        "n": n,
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
        "top_k": max(top_k, 0),  # vLLM: -1 or 0 = off
        "min_p": _number(body, "min_p", 0.0, 0.0, 1.0),
        "seed": _number(body, "seed", None, -MAX_SEED, MAX_SEED, integer=True),
        "stop": _stops(body),
        "ignore_eos": _flag(body, "ignore_eos"),
        "logprobs": logprobs,
        "schema": _response_format(body),
    }
    if spec["top_p"] == 0.0:
        raise _bad("top_p", "'top_p' must be greater than 0")
    if chat:
        spec["messages"] = _messages(body)
    else:
        spec["prompt"] = _prompt(body)
    return Job(chat, model, _flag(body, "stream"), _flag(stream_options, "include_usage"), logprobs, spec)
