"""One task of the agentic benchmark's tree-of-thought workload (cluster/bench/agentic/): DEPTH
levels; at each, every kept thought branches into BRANCH continuations of TOKENS sampled tokens
(end of text ignored: the same work every run), scored by the sum of their tokens'
log-probabilities, and the KEEP best go on. Branches are forks: they share their parent's KV
pages and every branch's pass of a level goes in one batched step.

    pie run inferlets/bench/tree_task.py -- --prompt "Plan a trip." --depth 3 --branch 3 --keep 2 --tokens 16
"""
import argparse
import json

from wit_world.imports import model

from pie_sdk import Context, sample, send, wait_all
from pie_sdk.runtime import unwrap


def grow(children, tokens, temperature):
    """Sample `tokens` tokens on every child at once; each child is [ctx, score, generated]."""
    for _ in range(tokens):
        handles = [ctx.submit_step(sample(temperature), logprob=True) for ctx, _, _ in children]
        for child, outputs in zip(children, wait_all(handles)):
            token, logprob = outputs[0]
            child[0].pending = [token]
            child[1] += logprob
            child[2].append(token)


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="tree_task")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--branch", type=int, default=3)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.8)
    opts = ap.parse_args(args)
    root = Context()
    root.fill(opts.prompt)
    root.flush(keep=1)  # the prompt's KV once, shared by every branch; each samples its own next token
    frontier = [[root, 0.0, []]]
    try:
        for _ in range(opts.depth):
            children = [[ctx.fork(), score, list(generated)] for ctx, score, generated in frontier
                        for _ in range(opts.branch)]
            for ctx, _, _ in frontier:
                ctx.free()
            frontier = children
            grow(children, opts.tokens, opts.temperature)
            children.sort(key=lambda c: -c[1])
            for ctx, _, _ in children[opts.keep:]:
                ctx.free()
            frontier = children[:opts.keep]
        _, score, generated = frontier[0]
        send(json.dumps({"score": score, "text": unwrap(model.decode, generated)}))
    finally:
        for ctx, _, _ in frontier:
            ctx.free()
