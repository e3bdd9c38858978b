"""One task of the agentic benchmark's beam-search workload (cluster/bench/agentic/): WIDTH beams
over TOKENS tokens (end of text ignored: the same work every run) with Context.beam_search, each
step's beams forked from their parents' KV and run in one batched step.

    pie run inferlets/bench/beam_task.py -- --prompt "The best way to learn is" --width 4 --tokens 24
"""
import argparse
import json

from pie_sdk import Context, send


def main(args: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="beam_task")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24)
    opts = ap.parse_args(args)
    with Context() as ctx:
        ctx.fill(opts.prompt)
        send(json.dumps({"text": ctx.beam_search(opts.width, opts.tokens, stop_tokens=())}))
