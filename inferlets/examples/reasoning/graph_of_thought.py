"""Graph-of-thought: several independent thoughts on one question (forks of its KV, stepped
together), then one node that reads them all and merges them into an answer: a graph, not a
chain or a tree. The merge is a fresh context holding the question and every thought.

    pie run inferlets/examples/reasoning/graph_of_thought.py -- --question "Why do cities have parks?" --thoughts 3
"""
import argparse
import json

from pie_sdk import Context, generate_together, sample, send


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="graph_of_thought")
    ap.add_argument("--question", default="Why do cities have parks?")
    ap.add_argument("--thoughts", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    opts = ap.parse_args(args)
    with Context() as question:
        question.fill_chat([("user", f"{opts.question} Give one reason.")])
        question.flush(keep=1)
        forks = [question.fork() for _ in range(opts.thoughts)]
        thoughts = [t.strip() for t in generate_together(forks, opts.max_tokens,
                                                         [sample(0.9, seed=i) for i in range(opts.thoughts)])]
        for ctx in forks:
            ctx.free()
    with Context() as merge:
        listed = "\n".join(f"- {t}" for t in thoughts)
        merge.fill_chat([("user", f"{opts.question}\nReasons given:\n{listed}\nCombine them into one answer.")])
        answer = merge.generate(opts.max_tokens * 2).strip()
    send(json.dumps({"thoughts": thoughts, "answer": answer}))
