"""Benchmark inferlet: say it started, then greedy-decode exactly N tokens, one pass per token.

    pie run inferlets/bench/decode_tokens.py -- "Once upon a time" 32
"""
from pie_sdk import Context, send


def main(args):
    send("started")  # the client times launch -> first handler call with this
    prompt, count = args[0], int(args[1])
    with Context() as ctx:
        ctx.fill(prompt)
        for _ in range(count):
            ctx.fill_tokens([ctx.step()])
    send("done")
