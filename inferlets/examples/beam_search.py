"""Answer with beam search: every beam's next step runs in one batched pass.

    pie run inferlets/examples/beam_search.py -- --prompt "Name a primary color." --beams 3
"""
import argparse

from pie_sdk import Context, send


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="beam_search")
    ap.add_argument("--prompt", default="Name a primary color.")
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=24)
    opts = ap.parse_args(args)
    with Context() as ctx:
        ctx.fill_chat([("user", opts.prompt)])
        send(ctx.beam_search(opts.beams, opts.max_tokens))
