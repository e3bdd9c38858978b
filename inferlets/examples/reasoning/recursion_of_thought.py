"""Recursion-of-thought: a question is split into sub-questions, each answered in a context of its
own (recursively, to --depth), and the answers are filled back into the parent's context, which
then answers. Each sub-question starts from a fork of its parent, so the parent's KV is shared.

    pie run inferlets/examples/reasoning/recursion_of_thought.py -- --question "How is bread made?" --depth 2
"""
import argparse
import json

from pie_sdk import Context, send


def solve(ctx: Context, question: str, depth: int, opts, trace: list) -> str:
    """Answer `question` in `ctx` (which holds the conversation so far); sub-questions first."""
    ctx.fill_chat([("user", question)])
    if depth > 0:
        ctx.fill("Sub-question:")
        sub = ctx.generate(opts.max_tokens, stop_strings=["\n", "?"]).strip() + "?"
        with ctx.fork() as child:
            sub_answer = solve(child, sub, depth - 1, opts, trace)
        ctx.fill(f" {sub}\nIts answer: {sub_answer}\nSo:")
    answer = ctx.generate(opts.max_tokens, stop_strings=["\n"]).strip()
    trace.append({"depth": depth, "question": question, "answer": answer})
    return answer


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="recursion_of_thought")
    ap.add_argument("--question", default="How is bread made?")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    opts = ap.parse_args(args)
    trace = []
    with Context() as ctx:
        answer = solve(ctx, opts.question, opts.depth, opts, trace)
    send(json.dumps({"answer": answer, "trace": trace}))
