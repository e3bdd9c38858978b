"""The OpenAI API's server side, one request per launch: `pie serve --http-port` runs this for
every /v1/completions and /v1/chat/completions request (cluster/api/openai_http.py).

Its one argument is the checked request as JSON (cluster/api/openai_requests.py); it answers
with JSON events (cluster/api/openai_events.py). It reuses the KV of every full page of its
prompt that an earlier request computed (the worker's prefix cache, scoped to this program and
the client's API key), offers its own full pages back when done, and runs `n` choices as forks
of one prompt, stepped together so their passes share batches.

    pie run inferlets/builtin/openai_server.py -- '{"prompt": "Once upon a time", "max_tokens": 16, "n": 1,
        "temperature": 0, "top_p": 1, "top_k": 0, "min_p": 0, "seed": null, "stop": [],
        "ignore_eos": false, "logprobs": null, "schema": null}'
"""
import json
import math

from wit_world.imports import model

from pie_sdk import Context, Grammar, greedy, model_info, sample, send, wait_all
from pie_sdk.detokenize import IncrementalText, held_back
from pie_sdk.runtime import unwrap


class Choice:
    def __init__(self, index, ctx, spec, stops):
        self.index, self.ctx, self.spec, self.stops = index, ctx, spec, stops
        self.text = IncrementalText(lambda tokens: unwrap(model.decode, tokens))
        self.shown = ""  # text so far, stop strings cut
        self.printed = 0
        self.tokens = 0
        self.finish = None
        self.grammar = Grammar.json_schema(spec["schema"]) if spec["schema"] is not None else None
        self.logprobs = []  # not yet sent
        if spec["temperature"] == 0:
            self.sampler = greedy()
        else:
            seed = spec["seed"]
            self.sampler = sample(spec["temperature"], top_p=spec["top_p"], top_k=spec["top_k"],
                                  min_p=spec["min_p"], seed=None if seed is None else (seed + index) % (1 << 64))

    def submit(self):
        return self.ctx.submit_step(self.sampler, grammar=self.grammar, logprob=self.spec["logprobs"] is not None,
                                    top_logprobs=self.spec["logprobs"] or 0)

    def take(self, outputs, max_tokens):
        """Account for one step's outputs; False once the choice is finished."""
        token, logprob = outputs[0] if self.spec["logprobs"] is not None else (outputs[0], None)
        if self.grammar is not None:
            self.grammar.accept(token)
        if token in self.stops:
            return self.end("stop")
        self.tokens += 1
        self.ctx.pending.append(token)
        if logprob is not None:
            alternatives = []
            if len(outputs) > 1:
                ids, probs = outputs[1]
                alternatives = [[decode(i), math.log(p) if p > 0 else -9999.0] for i, p in zip(ids, probs)]
            self.logprobs.append([decode(token), logprob, alternatives])
        text = self.text.append(token)
        hit = min((i for i in (text.find(s) for s in self.spec["stop"]) if i >= 0), default=-1)
        if hit >= 0:
            self.shown = text[:hit]
            return self.end("stop")
        self.shown = text
        if self.grammar is not None and self.grammar.is_finished():
            return self.end("stop")
        if self.tokens >= max_tokens:
            return self.end("length")
        safe = len(text) - held_back(text, self.spec["stop"])
        if not text.endswith("\ufffd") and (safe > self.printed or self.logprobs):
            self.send(text[self.printed:max(safe, self.printed)])
            self.printed = max(safe, self.printed)
        return True

    def send(self, text, **extra):
        event = {"i": self.index, "text": text}
        if self.logprobs:
            event["lp"], self.logprobs = self.logprobs, []
        event.update(extra)
        send(json.dumps(event))

    def end(self, reason):
        self.finish = reason
        self.send(self.shown[self.printed:], finish=reason, tokens=self.tokens)
        return False


def decode(token):
    return unwrap(model.decode, [token])


def refuse(message, param=None):
    send(json.dumps({"error": message, "status": 400, "param": param}))


def main(args: list[str]) -> None:
    spec = json.loads(args[0])
    info = model_info()
    ctx = Context()
    choices = []
    try:
        if "messages" in spec:
            ctx.fill_chat([tuple(m) for m in spec["messages"]])
        elif isinstance(spec["prompt"], str):
            ctx.fill(spec["prompt"])
        else:
            if any(t >= info.vocab_size for t in spec["prompt"]):
                return refuse(f"a prompt token id is past the vocabulary of {info.vocab_size}", "prompt")
            ctx.fill_tokens(spec["prompt"])
        prompt_tokens = len(ctx.pending)
        room = info.max_position - prompt_tokens
        if not prompt_tokens or room < 1:
            return refuse(f"the prompt has {prompt_tokens} tokens; this model's context holds {info.max_position}",
                          "messages" if "messages" in spec else "prompt")
        max_tokens = min(spec["max_tokens"], room)
        cached = ctx.reuse_cached_prefix()
        ctx.flush(keep=1)  # the prompt's KV but its last token, which each choice samples after
        ctx.cache_prefix()
        send(json.dumps({"prompt_tokens": prompt_tokens, "cached_tokens": cached}))
        stops = set() if spec["ignore_eos"] else set(info.stop_tokens)
        choices += [Choice(i, ctx if i == 0 else ctx.fork(), spec, stops) for i in range(spec["n"])]
        running = list(choices)
        while running:  # every choice's pass submitted before any is awaited: they share steps
            handles = [c.submit() for c in running]
            outputs = wait_all(handles)
            running = [c for c, out in zip(running, outputs) if c.take(out, max_tokens)]
        ctx.cache_prefix()  # the answer's full pages too, for the next turn of a conversation
    finally:
        for c in choices[1:]:  # the forks; choice 0 is ctx itself
            c.ctx.free()
        ctx.free()
