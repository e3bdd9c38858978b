"""Answer a prompt with the model's chat template, streaming the text as it is generated.

    pie run inferlets/examples/text_completion.py -- --prompt "What is the capital of France?" --max-tokens 64
"""
import argparse

from pie_sdk import Context, send


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="text_completion")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ignore-eos", action="store_true", help="generate all max-tokens, past the stop tokens")
    opts = ap.parse_args(args)
    with Context() as ctx:
        ctx.fill_chat([("user", opts.prompt)])
        for text in ctx.generate_stream(opts.max_tokens, stop_tokens=() if opts.ignore_eos else None):
            send(text)
