"""Windowed attention: every token attends to the prompt and to the last --window tokens only.
Slots that fall out of the window are masked (hidden from every later pass) as generation goes,
without giving pages back: a sliding window by masks, on the model's own paged KV.

    pie run inferlets/examples/kv/windowed_attention.py -- --prompt "Count from one to fifty." --window 16
"""
import argparse
import json

from pie_sdk import Context, send


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="windowed_attention")
    ap.add_argument("--prompt", default="Count from one to fifty.")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    opts = ap.parse_args(args)
    with Context() as ctx:
        ctx.fill_chat([("user", opts.prompt)])
        ctx.flush(keep=1)
        prompt_end = masked_to = ctx.kv_len
        pieces = []
        for piece in ctx.generate_stream(opts.max_tokens, stop_tokens=()):
            pieces.append(piece)
            edge = ctx.kv_len - opts.window  # slots before it are out of the window
            if edge > masked_to:
                ctx.mask_slots(masked_to, edge)
                masked_to = edge
        send(json.dumps({"text": "".join(pieces), "masked_slots": masked_to - prompt_end, "kv_len": ctx.kv_len}))
