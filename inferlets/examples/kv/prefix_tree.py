"""A prefix tree of prompts: one system prompt, a few topics under it, a few questions under each
topic. Every node is a fork of its parent, so each prefix's KV is computed once for all the prompts
below it, and every leaf's answer is generated in one batch with the others.

    pie run inferlets/examples/kv/prefix_tree.py -- --max-tokens 16
"""
import argparse
import json

from pie_sdk import Context, generate_together, send

SYSTEM = "You are a concise tutor. Answer in one sentence."
TREE = {"geography": ["What is the capital of France?", "Which river runs through Cairo?"],
        "cooking": ["How long do you boil an egg?", "What is a roux?"]}


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="prefix_tree")
    ap.add_argument("--max-tokens", type=int, default=16)
    opts = ap.parse_args(args)
    root = Context()
    root.fill_chat([("system", SYSTEM)], add_generation_prompt=False)
    root.flush()
    computed = root.kv_len
    naive = 0  # what the prompts would cost computed one by one
    leaves, questions = [], []
    for topic, asked in TREE.items():
        branch = root.fork()
        branch.fill_chat([("user", f"Topic: {topic}.")], add_generation_prompt=False, after=[("system", SYSTEM)])
        branch.flush()
        computed += branch.kv_len - root.kv_len
        for q in asked:
            leaf = branch.fork()
            leaf.fill_chat([("user", q)], after=[("system", SYSTEM), ("user", f"Topic: {topic}.")])
            computed += len(leaf.pending)
            naive += leaf.kv_len + len(leaf.pending)
            leaves.append(leaf)
            questions.append(q)
        branch.free()
    answers = generate_together(leaves, opts.max_tokens)
    for leaf in leaves:
        leaf.free()
    root.free()
    send(json.dumps({"answers": dict(zip(questions, (a.strip() for a in answers))),
                     "prompt_tokens_computed": computed, "prompt_tokens_one_by_one": naive}))
