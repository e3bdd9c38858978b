"""The built-in OpenAI inferlet's events turned into OpenAI's response objects.

The inferlet (inferlets/builtin/openai_server.py) sends one JSON object per message:
- `{"prompt_tokens": P, "cached_tokens": C}` once, after the prompt is in the KV cache;
- `{"i": CHOICE, "text": DELTA, "lp": [[TOKEN, LOGPROB, [[ALT, LOGPROB], ...]], ...]}` as text is
  generated (`lp` only when logprobs were asked for);
- `{"i": CHOICE, "finish": "stop" | "length", "tokens": N}` when a choice ends;
- `{"error": MESSAGE, "status": HTTP_STATUS, "param": NAME}` for a request it cannot serve.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from cluster.api.openai_requests import ApiError, Job
from cluster.runtime.inferlet_host import Outcome


class InferletFailure(Exception):
    """The serving inferlet failed or broke its event protocol: a server error (500)."""


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # [token, logprob, [[alt, logprob], ...]] per token
    finish: str | None = None
    tokens: int = 0
    started: bool = False  # a streamed chat choice sends its role once


class ChoiceStreams:
    """What the inferlet said so far about each choice; `take` returns the streaming chunks."""

    def __init__(self, job: Job):
        self.job = job
        self.choices = [_Choice() for _ in range(job.spec["n"])]
        self.prompt_tokens = self.cached_tokens = 0
        self.id = ("chatcmpl-" if job.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def take(self, event, model: str = "") -> list[dict]:
        if isinstance(event, Outcome):
            if not event.ok:
                raise InferletFailure(f"the OpenAI inferlet failed: {event.error}")
            unfinished = [i for i, c in enumerate(self.choices) if c.finish is None]
            if unfinished:
                raise InferletFailure(f"the OpenAI inferlet ended without finishing choice {unfinished[0]}")
            return []
        if not isinstance(event, dict):
            raise InferletFailure(f"the OpenAI inferlet sent {event!r}, not an object")
        if "error" in event:
            raise ApiError(int(event.get("status", 400)), str(event["error"]), param=event.get("param"))
        if "prompt_tokens" in event:
            self.prompt_tokens, self.cached_tokens = int(event["prompt_tokens"]), int(event["cached_tokens"])
            return []
        index = event.get("i")
        if not isinstance(index, int) or not 0 <= index < len(self.choices):
            raise InferletFailure(f"the OpenAI inferlet named choice {index!r} of {len(self.choices)}")
        choice = self.choices[index]
        text, lp = event.get("text", ""), event.get("lp", [])
        choice.text.append(text)
        choice.logprobs.extend(lp)
        if "finish" in event:
            choice.finish, choice.tokens = event["finish"], int(event.get("tokens", 0))
        return [self._chunk(index, choice, text, lp, model)] if text or lp or "finish" in event else []

    # -- streaming -------------------------------------------------------------------------------
    def _chunk(self, index: int, choice: _Choice, text: str, lp: list, model: str) -> dict:
        offset = sum(len(t) for t in choice.text[:-1])  # the choice's text before this chunk's
        body = {"index": index, "logprobs": self.logprobs(lp, offset) if self.job.logprobs is not None else None,
                "finish_reason": choice.finish}
        if self.job.chat:
            body["delta"] = {"content": text}
            if not choice.started:
                body["delta"]["role"] = "assistant"
                choice.started = True
        else:
            body["text"] = text
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.job.chat else "text_completion",
                 "created": self.created, "model": model, "choices": [body]}
        if self.job.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, model: str) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.job.chat else "text_completion",
                "created": self.created, "model": model, "choices": [], "usage": self.usage()}

    # -- pieces ----------------------------------------------------------------------------------
    def usage(self) -> dict:
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def logprobs(self, entries: list, offset: int) -> dict:
        """OpenAI's logprobs object for `entries`; `offset`: characters of the text before them."""
        if self.job.chat:
            return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                                 "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(a.encode())}
                                                  for a, alp in alts]} for t, lp, alts in entries]}
        offsets = []
        for t, _, _ in entries:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{a: alp for a, alp in alts} for _, _, alts in entries], "text_offset": offsets}


def completion_object(job: Job, streams: ChoiceStreams, model: str) -> dict:
    """The non-streaming answer once every choice finished."""
    choices = []
    for index, choice in enumerate(streams.choices):
        text = "".join(choice.text)
        body = {"index": index, "finish_reason": choice.finish,
                "logprobs": streams.logprobs(choice.logprobs, 0) if job.logprobs is not None else None}
        if job.chat:
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["text"] = text
        choices.append(body)
    return {"id": streams.id, "object": "chat.completion" if job.chat else "text_completion",
            "created": streams.created, "model": model, "choices": choices, "usage": streams.usage()}
