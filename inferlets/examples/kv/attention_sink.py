"""Attention sink: generate a long text with a bounded KV cache. The first pages (the sink) and
the most recent --window tokens stay; every page that falls between them is given back as soon
as it is whole, so the context never holds more than sink + window + a page of KV, however long
the text grows (StreamingLLM's recipe, done by the program, not the server).

    pie run inferlets/examples/kv/attention_sink.py -- --prompt "Tell me a long story." --max-tokens 200
"""
import argparse
import json

from pie_sdk import Context, send


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="attention_sink")
    ap.add_argument("--prompt", default="Tell me a long story.")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--window", type=int, default=64, help="recent tokens kept (whole pages)")
    opts = ap.parse_args(args)
    with Context() as ctx:
        ctx.fill_chat([("user", opts.prompt)])
        ctx.flush(keep=1)
        sink = (ctx.kv_len // ctx.page_size) * ctx.page_size  # the prompt's whole pages stay
        window = -(-opts.window // ctx.page_size) * ctx.page_size
        most_pages, dropped, text = len(ctx.pages), 0, []
        for piece in ctx.generate_stream(opts.max_tokens, stop_tokens=()):
            text.append(piece)
            if ctx.kv_len - sink >= window + ctx.page_size:  # a whole page past the window: give it back
                ctx.drop(sink, sink + ctx.page_size)
                dropped += 1
            most_pages = max(most_pages, len(ctx.pages))
        send(json.dumps({"text": "".join(text), "positions": ctx.next_position, "pages_dropped": dropped,
                         "most_pages": most_pages}))
