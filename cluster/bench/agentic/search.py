"""The search workloads: tree of thought (sampled branches scored by log-probability, the best kept
each level) and beam search. The inferlets (inferlets/bench/tree_task.py, beam_task.py) fork
their KV; the client loop sends each node's text back to /v1/completions (n branches at once for
the tree; one token with its top alternatives per beam and step for beam search)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from cluster.bench.agentic.workload import INFERLETS, Env, Workload


def prompt(i: int) -> str:
    return f"Question {i}: how would you spend a day in city number {i}? Let us think step by step.\n"


def tree_args(i: int, env: Env) -> list:
    s = env.sizes
    return ["--prompt", prompt(i), "--depth", s["depth"], "--branch", s["branch"], "--keep", s["keep"],
            "--tokens", s["tokens"], "--temperature", s["temperature"]]


def tree_client(i: int, env: Env) -> None:
    s = env.sizes

    def expand(node):
        text, score = node
        reply = env.client.completions.create(model=env.model, prompt=prompt(i) + text, n=s["branch"],
                                              max_tokens=s["tokens"], temperature=s["temperature"], logprobs=0,
                                              extra_body={"ignore_eos": True})
        return [(text + c.text, score + sum(c.logprobs.token_logprobs)) for c in reply.choices]

    frontier = [("", 0.0)]
    with ThreadPoolExecutor(s["keep"]) as pool:
        for _ in range(s["depth"]):
            children = [child for children in pool.map(expand, frontier) for child in children]
            frontier = sorted(children, key=lambda c: -c[1])[:s["keep"]]


def beam_args(i: int, env: Env) -> list:
    return ["--prompt", prompt(i), "--width", env.sizes["width"], "--tokens", env.sizes["tokens"]]


def beam_client(i: int, env: Env) -> None:
    s = env.sizes

    def step(beam):
        text, score = beam
        reply = env.client.completions.create(model=env.model, prompt=prompt(i) + text, max_tokens=1, temperature=0,
                                              logprobs=s["width"], extra_body={"ignore_eos": True})
        return [(text + token, score + logprob) for token, logprob in reply.choices[0].logprobs.top_logprobs[0].items()]

    beams = [("", 0.0)]
    with ThreadPoolExecutor(s["width"]) as pool:
        for _ in range(s["tokens"]):
            candidates = [c for cs in pool.map(step, beams) for c in cs]
            beams = sorted(candidates, key=lambda c: -c[1])[:s["width"]]


TREE = Workload("tree_of_thought", INFERLETS / "tree_task.py", tree_args, tree_client,
                {"tasks": 8, "depth": 3, "branch": 3, "keep": 2, "tokens": 16, "temperature": 0.8},
                {"tasks": 2, "depth": 2, "branch": 2, "keep": 1, "tokens": 6, "temperature": 0.8},
                lambda s: f"{s['tasks']} tasks, {s['depth']} levels of {s['branch']} branches per kept thought "
                          f"({s['keep']} kept) of {s['tokens']} sampled tokens")
BEAM = Workload("beam_search", INFERLETS / "beam_task.py", beam_args, beam_client,
                {"tasks": 8, "width": 4, "tokens": 24}, {"tasks": 2, "width": 2, "tokens": 6},
                lambda s: f"{s['tasks']} tasks, {s['width']} beams over {s['tokens']} tokens")
