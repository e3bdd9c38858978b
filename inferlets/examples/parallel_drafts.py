"""Write several sampled drafts in parallel from one shared prompt.

The prompt's KV is computed once; each fork shares its full pages. Every draft's next token
is one pass, and the passes of all drafts go to the executor together.

    pie run inferlets/examples/parallel_drafts.py -- --prompt "Write a haiku about the sea." --drafts 4
"""
import argparse

from pie_sdk import Context, sample, send
from pie_sdk.runtime import unwrap
from wit_world.imports import forward, model


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="parallel_drafts")
    ap.add_argument("--prompt", default="Write a haiku about the sea.")
    ap.add_argument("--drafts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=40)
    opts = ap.parse_args(args)
    with Context() as base:
        base.fill_chat([("user", opts.prompt)])
        first = base.step()  # the shared prompt, written once
        base.fill_tokens([first])
        drafts = [base.fork() for _ in range(opts.drafts)]
        outputs = {i: [first] for i in range(opts.drafts)}
        live = list(range(opts.drafts))
        for _ in range(opts.max_tokens):
            handles = [drafts[i].submit_step(sample(temperature=0.8, top_p=0.95, seed=i)) for i in live]
            for i, outs in zip(list(live), unwrap(forward.wait_all, handles)):
                token = outs[0].value
                if token in base.stop_tokens:
                    live.remove(i)
                else:
                    outputs[i].append(token)
                    drafts[i].fill_tokens([token])
            if not live:
                break
        texts = [unwrap(model.decode, outputs[i]) for i in range(opts.drafts)]
        for d in drafts:
            d.free()
    for i, text in enumerate(texts):
        send(f"--- draft {i + 1}\n{text}\n")
