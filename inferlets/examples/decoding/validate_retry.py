"""Output validation with retry: ask for JSON, check it, and when it does not parse or misses a
field, try again with another seed. Each attempt is a fork of the prompt's KV, and a failed
attempt's KV is given back at once: the prompt is computed once however many attempts it takes.

    pie run inferlets/examples/decoding/validate_retry.py -- --attempts 4
"""
import argparse
import json

from pie_sdk import Context, sample, send

PROMPT = 'Describe a city as JSON with the keys "name" and "country", nothing else.'


def check(text: str):
    """The parsed object, or the reason it is not acceptable."""
    try:
        value = json.loads(text)
    except ValueError as e:
        return None, f"not JSON: {e}"
    if not isinstance(value, dict) or not {"name", "country"} <= set(value):
        return None, "not an object with name and country"
    return value, None


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="validate_retry")
    ap.add_argument("--attempts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    opts = ap.parse_args(args)
    failures = []
    with Context() as prompt:
        prompt.fill_chat([("user", PROMPT)])
        prompt.fill("{")
        prompt.flush(keep=1)
        for attempt in range(opts.attempts):
            with prompt.fork() as ctx:
                text = "{" + ctx.generate(opts.max_tokens, sampler=sample(0.8, seed=attempt), stop_strings=["}"]) + "}"
            value, why = check(text)
            if value is not None:
                send(json.dumps({"value": value, "attempts": attempt + 1, "failures": failures}))
                return
            failures.append({"text": text, "why": why})
    send(json.dumps({"value": None, "attempts": opts.attempts, "failures": failures}))
