"""Self-consistency: sample several short answers to one question and return the most common one.
The question's KV is computed once; every sample is a fork stepped together with the others.

    pie run inferlets/examples/reasoning/self_consistency.py -- --question "What is 2 + 3?" --samples 5
"""
import argparse
import collections
import json

from pie_sdk import Context, generate_together, sample, send


def normalize(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())[:60]


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="self_consistency")
    ap.add_argument("--question", default="What is 2 + 3? Answer with a number.")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=12)
    opts = ap.parse_args(args)
    with Context() as prompt:
        prompt.fill_chat([("user", opts.question)])
        prompt.flush(keep=1)
        forks = [prompt.fork() for _ in range(opts.samples)]
        answers = generate_together(forks, opts.max_tokens, [sample(0.7, seed=i) for i in range(opts.samples)])
        for ctx in forks:
            ctx.free()
    votes = collections.Counter(normalize(a) for a in answers)
    winner, count = votes.most_common(1)[0]
    send(json.dumps({"answers": answers, "answer": next(a for a in answers if normalize(a) == winner),
                     "votes": count}))
