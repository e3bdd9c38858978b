"""The OpenAI API's cost: a chat request over HTTP against the same request as the gRPC
text_completion inferlet and the plain decode loop, at each concurrency, in one run.

    python -m cluster.bench.openai [--concurrency 1 16] [--tokens 32] [--repeats 3] [--dtype bf16] [--quant none]
                                   [--executor torch] [--json OUT]

One executor (bf16, one model load), one host, one InferletService behind both APIs, all in this
process, clients included (a thread per request: the openai client streaming
/v1/chat/completions with ignore_eos; PieClient launching inferlets/examples/text_completion.py
with --ignore-eos); the plain loop is workers.decode_loop.generate on the host's executor thread.
Every request asks for the same number of new tokens. TTFT: request to its first text; TPOT:
decode time per token after the first. Each HTTP run uses an API key of its own, so the prefix
cache never serves one run's prompts to the next (the sides compute the same prompt tokens).
Repeats rotate which side goes first; figures are medians over repeats, ratios the medians of
each repeat's ratios.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

from cluster.api.grpc_client import Message, PieClient
from cluster.api.grpc_server import InferletService, serve_service
from cluster.api.openai_http import serve_openai
from cluster.api.program_store import ProgramStore
from cluster.bench.common import load_executor, run_concurrently
from cluster.bench.tax import PROGRAM, prompts_for, run_plain, summary
from cluster.runtime.inferlet_build import build
from cluster.runtime.inferlet_host import InferletHost
from workers.executors import EXECUTORS

SIDES = ("plain", "grpc", "http")
_keys = itertools.count()


def run_grpc(target: str, program_id: str, prompts: list[str], tokens: int) -> dict:
    text_at = [[] for _ in prompts]

    def request(i):
        with PieClient(target) as client:
            for event in client.launch(program_id, ["--prompt", prompts[i], "--max-tokens", str(tokens), "--ignore-eos"]):
                if isinstance(event, Message):
                    text_at[i].append(time.perf_counter())

    t0, wall = run_concurrently(request, len(prompts))
    return summary([t[0] for t in text_at], [t[-1] for t in text_at], t0, wall, tokens)


def run_http(url: str, model: str, prompts: list[str], tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url, api_key=f"bench-{next(_keys)}", max_retries=0, timeout=600)
    text_at = [[] for _ in prompts]

    def request(i):
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompts[i]}],
                                                max_tokens=tokens, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text_at[i].append(time.perf_counter())

    t0, wall = run_concurrently(request, len(prompts))
    return summary([t[0] for t in text_at], [t[-1] for t in text_at], t0, wall, tokens)


def measure(host, target, program_id, url, model, concurrency: int, tokens: int, repeats: int) -> dict:
    prompts = prompts_for(concurrency)
    run = {"plain": lambda: run_plain(host, prompts, tokens),
           "grpc": lambda: run_grpc(target, program_id, prompts, tokens),
           "http": lambda: run_http(url, model, prompts, tokens)}
    runs = {side: [] for side in SIDES}
    for r in range(repeats):
        for side in SIDES[r % 3:] + SIDES[:r % 3]:
            result = run[side]()
            result.pop("texts", None)
            runs[side].append(result)
    row = {side: {k: statistics.median(x[k] for x in runs[side]) for k in ("ttft_ms", "tpot_ms", "tok_s")}
           for side in SIDES}
    paired = lambda a, b, key: statistics.median(x[key] / y[key] for x, y in zip(runs[a], runs[b]))
    row["http_vs_grpc_tpot"] = paired("http", "grpc", "tpot_ms")
    row["http_vs_plain_tpot"] = paired("http", "plain", "tpot_ms")
    row["grpc_vs_plain_tpot"] = paired("grpc", "plain", "tpot_ms")
    row["http_vs_grpc_ttft"] = paired("http", "grpc", "ttft_ms")
    row["runs"] = runs
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                    help="the executor's (fp32 runs ~3x faster than bf16 on CPUs without AVX-512)")
    ap.add_argument("--quant", default="none", choices=["none", "int8", "int4"],
                    help="the linear layers' weights: none, or int8 / int4 weight-only quantized (CPU kernels)")
    ap.add_argument("--executor", default="torch", choices=EXECUTORS,
                    help="torch: our model code; vllm: vLLM's model code and kernels (needs `make setup-vllm`)")
    ap.add_argument("--json", default=None)
    opts = ap.parse_args(argv)
    if opts.tokens < 2:
        ap.error("--tokens must be at least 2 (TPOT is measured after the first token)")
    executor = load_executor(max(opts.concurrency) * (-(-(64 + opts.tokens) // 16) + 1) + 64, dtype=opts.dtype,
                             quant=opts.quant, executor=opts.executor)
    rows = []
    with InferletHost(executor) as host:
        service = InferletService(host, ProgramStore())
        grpc_server = serve_service(service, port=0)
        http = serve_openai(service, port=0)
        try:
            program_id = service.add_program(build(PROGRAM).read_bytes())
            model = service.model_name()
            for c in opts.concurrency:
                prompts = prompts_for(c)
                run_plain(host, prompts, 4)  # warm-up: each side, this shape
                run_grpc(grpc_server.target, program_id, prompts, 4)
                run_http(http.url, model, prompts, 4)
                row = {"concurrency": c, **measure(host, grpc_server.target, program_id, http.url, model, c,
                                                   opts.tokens, opts.repeats)}
                rows.append(row)
                print(f"c={c}: TPOT http {row['http']['tpot_ms']:.2f} ms, grpc {row['grpc']['tpot_ms']:.2f} ms, "
                      f"plain {row['plain']['tpot_ms']:.2f} ms -> http/grpc {row['http_vs_grpc_tpot']:.3f}x",
                      flush=True)
        finally:
            http.stop()
            grpc_server.stop(0)
    print(f"\n{opts.tokens} new tokens per request, medians over {opts.repeats} repeats")
    print("| concurrency | side | TTFT ms | TPOT ms | tok/s | TPOT vs plain |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        for side in SIDES:
            r = row[side]
            ratio = {"plain": "1", "grpc": f"{row['grpc_vs_plain_tpot']:.3f}x",
                     "http": f"{row['http_vs_plain_tpot']:.3f}x"}[side]
            print(f"| {row['concurrency']} | {side} | {r['ttft_ms']:.1f} | {r['tpot_ms']:.2f} | {r['tok_s']:.1f} | {ratio} |")
        print(f"| {row['concurrency']} | **http / grpc** | {row['http_vs_grpc_ttft']:.3f}x | "
              f"**{row['http_vs_grpc_tpot']:.3f}x** | | |")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"tokens": opts.tokens, "repeats": opts.repeats, "dtype": opts.dtype,
                                               "quant": opts.quant, "executor": opts.executor,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
