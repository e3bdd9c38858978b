"""Skeleton-of-thought: write a short outline first, then expand every point of it at once. The
outline's KV is shared by every expansion (forks of one context), and the expansions' passes go to
the executor together, so a long answer costs the steps of its longest point, not of all of them.

    pie run inferlets/examples/reasoning/skeleton_of_thought.py -- --question "How do I learn to cook?" --points 3
"""
import argparse
import json

from pie_sdk import Context, generate_together, send


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="skeleton_of_thought")
    ap.add_argument("--question", default="How do I learn to cook?")
    ap.add_argument("--points", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=24)
    opts = ap.parse_args(args)
    with Context() as ctx:
        ctx.fill_chat([("user", f"{opts.question} Give a numbered outline of {opts.points} short points.")])
        ctx.fill("1.")
        outline = "1." + ctx.generate(opts.max_tokens * opts.points, stop_strings=[f"\n{opts.points + 1}."])
        points = [line.split(".", 1)[-1].strip() for line in outline.splitlines() if line.strip()][:opts.points]
        points += [f"point {i + 1}" for i in range(len(points), opts.points)]  # a short outline still expands
        ctx.flush()
        expansions = []
        for i, point in enumerate(points):
            branch = ctx.fork()
            branch.fill(f"\n\nExpanding point {i + 1} ({point}):")
            expansions.append(branch)
        texts = generate_together(expansions, opts.max_tokens)
        for branch in expansions:
            branch.free()
    send(json.dumps({"outline": points, "expansions": [t.strip() for t in texts]}))
