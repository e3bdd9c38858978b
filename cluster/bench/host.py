"""How much the inferlet host costs: many concurrent inferlets on one executor.

    python -m cluster.bench.host [--inferlets 200] [--tokens 32] [--json OUT]

Rows:
- launch: a cached inferlet, from launch() to its first handler call (its first message).
- host-only: N inferlets decode through an executor whose step does no model work (it
  returns the next token id at once), so the time per batched step is the host's own
  cost: scheduling N guests, their handler calls, batching, and the guests' SDK code.
- model: the same N inferlets on the real model (bf16): tokens/s, mean passes per step,
  and the executor's idle time between steps; beside it, the plain batched decode loop
  (workers.decode_loop) over the same N sequences, no inferlets: the programmability tax.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from cluster.worker.batcher import BatchPolicy
from cluster.bench.common import DelegatingExecutor, host_counters, load_executor, reset_counters, wait_all_ok
from cluster.runtime.inferlet_host import InferletHost
from cluster.runtime.sandbox import Limits
from workers.step_types import OutputResult, StepOutput

PROGRAM = Path(__file__).resolve().parents[2] / "inferlets" / "bench" / "decode_tokens.py"


class InstantExecutor(DelegatingExecutor):
    """Wraps a real executor (pages, tokenizer, info) but answers every step at once: output
    token = input token + 1. Isolates the host's cost from the model's."""

    def copy_slots(self, *args):
        pass

    def mask_slots(self, *args):
        pass

    def step(self, batch):
        last = batch.token_ids[batch.output_token_indices]
        return StepOutput([OutputResult(token=int(t + 1) % self.info.vocab_size) for t in last])


def run_many(host: InferletHost, n: int, tokens: int) -> dict:
    """Launch n decode inferlets at once; return timings of the whole run and of its steps."""
    reset_counters(host)
    started = {}
    launched_at = {}
    lock = threading.Lock()

    def on_message(i):
        def record(message):
            if message == "started":
                with lock:
                    started[i] = time.perf_counter()
        return record

    t0 = time.perf_counter()
    running = []
    for i in range(n):
        launched_at[i] = time.perf_counter()
        running.append(host.launch(PROGRAM, ["Once upon a time", str(tokens)], on_message=on_message(i)))
    wait_all_ok(running)
    wall = time.perf_counter() - t0
    return {
        "inferlets": n, "tokens_each": tokens, "wall_s": wall, "tok_s": n * tokens / wall,
        **host_counters(host, wall, full_step_passes=n), "passes": n * tokens,
        "launch_to_first_call_ms_median": 1e3 * statistics.median(started[i] - launched_at[i] for i in started),
    }


def launch_latency(host: InferletHost, repeats: int = 20) -> dict:
    """One inferlet at a time: launch() -> its first handler call, cached component."""
    samples = []
    for _ in range(repeats):
        got = threading.Event()
        t0 = time.perf_counter()
        r = host.launch(PROGRAM, ["Hi", "1"], on_message=lambda m: m == "started" and got.set())
        got.wait(60)
        samples.append(time.perf_counter() - t0)
        r.wait(60)
    return {"median_ms": 1e3 * statistics.median(samples), "max_ms": 1e3 * max(samples), "repeats": repeats}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inferlets", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--skip-model", action="store_true", help="only the launch and host-only rows")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads for the executor")
    ap.add_argument("--json", default=None)
    opts = ap.parse_args(argv)

    pages_needed = opts.inferlets * (-(-(opts.tokens + 8) // 16) + 1)
    real = load_executor(pages_needed + 64, opts.torch_threads)
    limits = Limits(max_pages=64)
    results = {}
    # one inferlet at a time, under the default policy (gather_all below would hold each lone pass for t_ms)
    with InferletHost(InstantExecutor(real), limits=limits) as host:
        host.component(PROGRAM)  # build + compile once (cached)
        results["launch"] = launch_latency(host)
        print(f"launch (cached) -> first handler call: median {results['launch']['median_ms']:.1f} ms, "
              f"max {results['launch']['max_ms']:.1f} ms over {results['launch']['repeats']}", flush=True)
    # wait for every inferlet's pass: a step that costs nothing would otherwise always run one pass
    gather_all = BatchPolicy("kort", k=opts.inferlets, t_ms=10_000.0, max_batch_tokens=1 << 20)
    with InferletHost(InstantExecutor(real), limits=limits, policy=gather_all) as host:
        host.component(PROGRAM)  # compiled before the run, as above
        results["host_only"] = r = run_many(host, opts.inferlets, opts.tokens)
        print(f"host-only, {r['inferlets']} inferlets x {r['tokens_each']} tokens: "
              f"{r['host_ms_per_full_step']:.2f} ms per batched step (median, steps with all {r['inferlets']}), "
              f"{r['mean_passes_per_step']:.1f} passes/step, {r['tok_s']:.0f} tok/s, "
              f"launch->first call under load {r['launch_to_first_call_ms_median']:.1f} ms", flush=True)
        print(f"  per pass: host imports {1e3 * r['host_import_s'] / r['passes']:.3f} ms "
              f"({r['host_import_calls'] / r['passes']:.1f} calls), guest wasm {1e3 * r['guest_wasm_s'] / r['passes']:.3f} ms "
              f"(launches included)", flush=True)
    if not opts.skip_model:
        with InferletHost(real, limits=limits, policy=BatchPolicy(max_batch_tokens=1 << 20)) as host:
            results["model"] = r = run_many(host, opts.inferlets, opts.tokens)
            print(f"model bf16, {r['inferlets']} inferlets x {r['tokens_each']} tokens: {r['tok_s']:.1f} tok/s, "
                  f"{r['mean_passes_per_step']:.1f} passes/step, executor {r['exec_ms_per_full_step']:.1f} ms "
                  f"+ idle {r['host_ms_per_full_step']:.2f} ms between steps (median), executor busy "
                  f"{100 * r['executor_busy_fraction']:.0f}% of the run", flush=True)
        # the peer: the same sequences decoded by the plain batched loop, no inferlets
        from workers.decode_loop import generate

        prompt = real.tokenizer.encode("Once upon a time")
        t0 = time.perf_counter()
        generate(real, [prompt] * opts.inferlets, opts.tokens, stop_token_ids=())
        plain = opts.inferlets * opts.tokens / (time.perf_counter() - t0)
        results["plain_loop_tok_s"] = plain
        print(f"plain decode loop, batch {opts.inferlets} x {opts.tokens} tokens: {plain:.1f} tok/s -> "
              f"inferlets reach {r['tok_s'] / plain:.2f}x of it", flush=True)
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
