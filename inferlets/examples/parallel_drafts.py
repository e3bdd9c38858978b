"""Write several sampled drafts in parallel from one shared prompt.

The prompt's KV is computed once and every draft is a fork of it, sharing its full pages.
Each draft samples its own tokens, from the first one on; each round, the next token of every
draft is one pass, and the passes of all drafts go to the executor together.

    pie run inferlets/examples/parallel_drafts.py -- --prompt "Write a haiku about the sea." --drafts 4
"""
import argparse

from pie_sdk import Context, generate_together, sample, send


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="parallel_drafts")
    ap.add_argument("--prompt", default="Write a haiku about the sea.")
    ap.add_argument("--drafts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=40)
    opts = ap.parse_args(args)
    samplers = [sample(temperature=0.8, top_p=0.95, seed=i) for i in range(opts.drafts)]
    with Context() as prompt:
        prompt.fill_chat([("user", opts.prompt)])
        prompt.flush(keep=1)  # the prompt's KV, once; its last token goes into every draft's first pass
        drafts = [prompt.fork() for _ in samplers]
        texts = generate_together(drafts, opts.max_tokens, samplers)
        for draft in drafts:
            draft.free()
    for i, text in enumerate(texts, 1):
        send(f"--- draft {i}\n{text}\n")
