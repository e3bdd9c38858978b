"""Best-of-n: sample n answers from one shared prompt, keep the one the model itself finds most
likely (mean log-probability of its tokens). Every answer is a fork of the prompt's KV; their
passes go to the executor together, and each sampled token comes with its log-probability from
the same pass.

    pie run inferlets/examples/reasoning/best_of_n.py -- --prompt "Name a famous bridge." --n 4
"""
import argparse
import json

from pie_sdk import Context, sample, send, wait_all
from pie_sdk.runtime import model_info, unwrap
from wit_world.imports import model


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="best_of_n")
    ap.add_argument("--prompt", default="Name a famous bridge.")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=24)
    opts = ap.parse_args(args)
    stops = set(model_info().stop_tokens)
    with Context() as prompt:
        prompt.fill_chat([("user", opts.prompt)])
        prompt.flush(keep=1)
        answers = [prompt.fork() for _ in range(opts.n)]
        tokens, logprobs = [[] for _ in answers], [[] for _ in answers]
        live = list(range(opts.n))
        for _ in range(opts.max_tokens):
            if not live:
                break
            handles = [answers[i].submit_step(sample(0.9, seed=i), logprob=True) for i in live]
            for i, outputs in zip(list(live), wait_all(handles)):
                token, logprob = outputs[0]
                if token in stops:
                    live.remove(i)
                    continue
                tokens[i].append(token)
                logprobs[i].append(logprob)
                answers[i].fill_tokens([token])
        scores = [sum(lp) / len(lp) if lp else float("-inf") for lp in logprobs]
        for ctx in answers:
            ctx.free()
    best = max(range(opts.n), key=lambda i: scores[i])
    for i in range(opts.n):
        send(json.dumps({"answer": unwrap(model.decode, tokens[i]), "mean_logprob": scores[i], "best": i == best}))
