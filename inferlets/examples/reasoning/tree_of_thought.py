"""Tree-of-thought: grow a tree of short thoughts, keeping at each depth the --beam most promising
(mean log-probability of their tokens, from the same passes that sampled them). Every node is a
fork of its parent: the path's KV is shared, never recomputed; a pruned branch's pages go back.

    pie run inferlets/examples/reasoning/tree_of_thought.py -- --question "How can a town save water?" --depth 2
"""
import argparse
import json

from pie_sdk import Context, model_info, sample, send, wait_all
from pie_sdk.runtime import unwrap
from wit_world.imports import model


def expand(parents, children: int, tokens: int, stops, seed: int):
    """Every parent's `children` sampled continuations of `tokens` tokens, stepped together:
    [(context, text tokens, mean log-probability, parent's path)]."""
    nodes = []
    for p_ctx, _, _, path in parents:
        for c in range(children):
            nodes.append([p_ctx.fork(), [], [], path, seed + len(nodes)])
    live = list(range(len(nodes)))
    for _ in range(tokens):
        if not live:
            break
        handles = [nodes[i][0].submit_step(sample(1.0, top_p=0.9, seed=nodes[i][4]), logprob=True) for i in live]
        for i, outputs in zip(list(live), wait_all(handles)):
            token, logprob = outputs[0]
            if token in stops:
                live.remove(i)
                continue
            nodes[i][1].append(token)
            nodes[i][2].append(logprob)
            nodes[i][0].fill_tokens([token])
    return [(ctx, toks, sum(lps) / len(lps) if lps else float("-inf"), path + [unwrap(model.decode, toks)])
            for ctx, toks, lps, path, _ in nodes]


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="tree_of_thought")
    ap.add_argument("--question", default="How can a town save water?")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--children", type=int, default=3)
    ap.add_argument("--beam", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=12, help="tokens per thought")
    opts = ap.parse_args(args)
    stops = set(model_info().stop_tokens)
    root = Context()
    root.fill_chat([("user", f"{opts.question} Think step by step.")])
    root.flush(keep=1)
    frontier = [(root, [], 0.0, [])]
    explored = 0
    for level in range(opts.depth):
        nodes = expand(frontier, opts.children, opts.tokens, stops, seed=1000 * level)
        explored += len(nodes)
        nodes.sort(key=lambda n: n[2], reverse=True)
        for ctx, _, _, _ in frontier:
            ctx.free()
        for ctx, _, _, _ in nodes[opts.beam:]:
            ctx.free()  # pruned: its own pages go back now
        frontier = nodes[:opts.beam]
    best = frontier[0]
    for ctx, _, _, _ in frontier:
        ctx.free()
    send(json.dumps({"path": best[3], "score": best[2], "explored": explored}))
