"""Speculative decoding with a drafter: guess the next tokens, check every guess in one pass, keep
the ones the model agrees with. The drafter here is prompt lookup (n-grams of the text so far), so
repetitive text (code, lists, quotes of the prompt) costs fewer steps than tokens; the output is
exactly greedy decoding's.

    pie run inferlets/examples/decoding/speculative.py -- --prompt "Repeat: one two three, one two three." --max-tokens 48
"""
import argparse
import json

from pie_sdk import Context, ngram_drafter, send


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="speculative")
    ap.add_argument("--prompt", default="Repeat five times: one two three.")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--draft", type=int, default=4, help="tokens guessed per round")
    opts = ap.parse_args(args)
    with Context() as ctx:
        ctx.fill_chat([("user", opts.prompt)])
        text, accepted, rounds = ctx.generate_speculative(ngram_drafter(2, opts.draft), opts.max_tokens,
                                                          max_draft=opts.draft)
    send(json.dumps({"text": text, "accepted_drafts": accepted, "rounds": rounds}))
