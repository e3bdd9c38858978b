"""What the step loop's Prometheus metrics cost against the step they count, in one run.

    .venv/bin/python -m cluster.bench.metrics_cost [--batches 1,8,32] [--tokens 16] [--dtype fp32] [--quant none]
                                                     [--executor torch]

For each batch size: the time of a decode step on the real model (the plain decode loop, the median
of --tokens steps while every sequence runs) and the time of the batcher's per-step metrics (`_count_step`:
two histogram observations, two counters, a gauge) over the same number of one-token passes,
mean over 20,000 calls; then their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

from cluster.bench.common import DelegatingExecutor, load_executor
from cluster.worker.batcher import _count_step
from workers.decode_loop import generate
from workers.executors import EXECUTORS


def metrics_us(batch: int, calls: int = 20_000) -> float:
    passes = [SimpleNamespace(token_ids=[1]) for _ in range(batch)]
    for _ in range(1000):
        _count_step(passes, 0.02, 0)
    t0 = time.perf_counter()
    for _ in range(calls):
        _count_step(passes, 0.02, 0)
    return (time.perf_counter() - t0) / calls * 1e6


class _TimedSteps(DelegatingExecutor):
    """The real executor, each step's wall time kept with its batch size."""

    def __init__(self, real):
        super().__init__(real)
        self.steps: list[tuple[int, float]] = []

    def step(self, batch):
        t0 = time.perf_counter()
        out = self.real.step(batch)
        self.steps.append((batch.num_requests, time.perf_counter() - t0))
        return out


def step_ms(executor, batch: int, tokens: int) -> float:
    """Median decode step of `batch` sequences on the plain decode loop (prefill steps left out)."""
    timed = _TimedSteps(executor)
    prompts = [executor.tokenizer.encode(f"Tell me about the number {i}.") for i in range(batch)]
    generate(timed, prompts, tokens + 1, stop_token_ids=())  # every sequence runs every step
    decode = [s for _, s in timed.steps[1:]]  # after the prefill step
    return statistics.median(decode) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cluster.bench.metrics_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8,32", help="batch sizes, comma-separated (default 1,8,32)")
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed per batch size (default 16)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    ap.add_argument("--quant", default="none", choices=["none", "int8", "int4"],
                    help="the linear layers' weights: none, or int8 / int4 weight-only quantized (CPU kernels)")
    ap.add_argument("--executor", default="torch", choices=EXECUTORS,
                    help="torch: our model code; vllm: vLLM's model code and kernels (needs `make setup-vllm`)")
    opts = ap.parse_args(argv)
    batches = [int(b) for b in opts.batches.split(",")]
    print(f"[metrics-cost] loading the model ({opts.dtype}, quant {opts.quant}, {opts.executor} executor) ...",
          flush=True)
    executor = load_executor(num_pages=max(batches) * 8 + 64, dtype=opts.dtype, quant=opts.quant,
                             executor=opts.executor)
    print(f"{'batch':>6}{'step ms':>10}{'metrics us':>12}{'share':>9}")
    for batch in batches:
        ms, us = step_ms(executor, batch, opts.tokens), metrics_us(batch)
        print(f"{batch:>6}{ms:>10.2f}{us:>12.1f}{us / (ms * 1e3):>9.3%}", flush=True)


if __name__ == "__main__":
    main()
