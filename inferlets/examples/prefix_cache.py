"""Answer a question under a system prompt whose KV is computed once and shared by every later run.

The first inferlet with a given system prompt fills it and exports its KV pages under a name
made from the prompt's hash; the export is persistent, so it outlives that inferlet. Later
inferlets import the pages and compute only their own question. The first message says
whether the prefix came from the cache; the answer streams after it.

    pie run inferlets/examples/prefix_cache.py -- --system "You are a terse geography tutor." \\
        --question "What is the capital of France?"
    pie run inferlets/examples/prefix_cache.py -- --system "You are a terse geography tutor." --unexport
"""
import argparse
import hashlib

from pie_sdk import Context, HostError, send


def cache_name(system_prompt: str) -> str:
    return "prefix-cache/" + hashlib.sha256(system_prompt.encode()).hexdigest()[:32]


def system_prefix(system, name: str) -> tuple[Context, str]:
    """The system prompt's KV: imported when it is cached, else computed (and cached if possible)."""
    try:
        return Context.import_(name), "cache hit"
    except HostError:  # nothing is exported under that name yet
        pass
    ctx = Context()
    ctx.fill_chat(system, add_generation_prompt=False)
    ctx.flush()
    try:
        ctx.export(name, persistent=True)
    except HostError as e:  # another inferlet cached it first, or the host's cache is full
        return ctx, f"cache miss, not cached: {e}"
    return ctx, "cache miss"


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="prefix_cache")
    ap.add_argument("--system", default="You are a terse geography tutor. Answer in one sentence.")
    ap.add_argument("--question", default="What is the capital of France?")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--unexport", action="store_true", help="remove the cached prefix of --system, answer nothing")
    opts = ap.parse_args(args)
    system = [("system", opts.system)]
    name = cache_name(opts.system)
    if opts.unexport:
        Context.unexport(name)
        send(f"unexported {name}")
        return
    ctx, status = system_prefix(system, name)
    send(status)
    with ctx:  # its pages are read-only now: the question goes into a copy of the partial last page
        ctx.fill_chat([("user", opts.question)], after=system)
        for text in ctx.generate_stream(opts.max_tokens):
            send(text)
