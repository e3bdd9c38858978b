"""Jacobi decoding: guess the next --window tokens all at once, run them through the model in one
pass, keep the prefix the model agrees with, and guess again with what the model said at the
rest. The text is exactly greedy decoding's; where the guesses settle, a pass yields several
tokens (counted in "rounds" against "tokens").

    pie run inferlets/examples/decoding/jacobi.py -- --prompt "Count from one to twenty." --window 4
"""
import argparse
import json

from pie_sdk import Context, JacobiDrafter, send
from pie_sdk.runtime import unwrap
from wit_world.imports import model


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="jacobi")
    ap.add_argument("--prompt", default="Count from one to twenty.")
    ap.add_argument("--window", type=int, default=4, help="tokens guessed per pass")
    ap.add_argument("--max-tokens", type=int, default=48)
    opts = ap.parse_args(args)
    with Context() as ctx:
        ctx.fill_chat([("user", opts.prompt)])
        text, accepted, rounds = ctx.generate_speculative(JacobiDrafter(opts.window), opts.max_tokens,
                                                          max_draft=opts.window)
    tokens = len(unwrap(model.encode, text))
    send(json.dumps({"text": text, "tokens": tokens, "rounds": rounds, "accepted_guesses": accepted}))
