"""The programmability tax: text completion as an inferlet versus the plain decode loop.

    python -m cluster.bench.tax [--concurrency 1 32] [--tokens 64] [--repeats 3] [--json OUT]

Both sides run on one executor (bf16, one model load), on the same thread (the host's
executor thread: the plain loop runs there as a queued call), with the same chat prompts and
the same number of new tokens: the inferlet is inferlets/examples/text_completion.py with
--ignore-eos, the plain loop is workers.decode_loop.generate with no stop tokens. At each
concurrency c, c requests start together (c inferlets launched at once; one batch of c
sequences). Per request: TTFT (start to its first token) and TPOT (decode time per token
after the first); per run: tokens/s over the whole run. Repeats alternate which side goes
first; every figure is the median over repeats, a ratio the median of the repeats' ratios. The
inferlet rows also show where the host's time goes: executor time per step, executor idle time
between steps, host imports and guest wasm per token. The inferlets run under the default
batching policy; with --ungathered also under adaptive without gathering (gather_ms=0), and with
--gather-ms also under one that waits for all c passes of a round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from cluster.worker.batcher import BatchPolicy
from cluster.bench.common import DelegatingExecutor, host_counters, load_executor, reset_counters, wait_all_ok
from cluster.runtime.inferlet_host import InferletHost
from workers.decode_loop import generate
from workers.executor import Executor

PROGRAM = Path(__file__).resolve().parents[2] / "inferlets" / "examples" / "text_completion.py"
PROMPTS = ("What is the capital of France?", "Name three primary colors.", "Why is the sky blue?",
           "Write a haiku about the sea.")


class TimedExecutor(DelegatingExecutor):
    """Records how long each step takes inside the real executor."""

    def __init__(self, real: Executor):
        super().__init__(real)
        self.step_s: list[float] = []

    def step(self, batch):
        t0 = time.perf_counter()
        out = self.real.step(batch)
        self.step_s.append(time.perf_counter() - t0)
        return out


def prompts_for(concurrency: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(concurrency)]


def summary(first_token_at: list[float], last_token_at: list[float], t0: float, wall: float, tokens: int) -> dict:
    """Per-request TTFT and TPOT (medians over the requests) and the run's throughput, in ms and tok/s."""
    return {
        "ttft_ms": 1e3 * statistics.median(f - t0 for f in first_token_at),
        "tpot_ms": 1e3 * statistics.median((last - first) / (tokens - 1)
                                           for first, last in zip(first_token_at, last_token_at)),
        "tok_s": len(first_token_at) * tokens / wall, "wall_s": wall,
    }


def run_plain(host: InferletHost, prompts: list[str], tokens: int) -> dict:
    """The plain loop over all prompts in one batch, run on the host's executor thread."""
    executor = host.executor
    tok = executor.tokenizer
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in prompts]
    timed = TimedExecutor(executor)
    step_done_at = []

    def loop(_executor):
        return generate(timed, ids, tokens, stop_token_ids=(), on_step=lambda live: step_done_at.append(time.perf_counter()))

    t0 = time.perf_counter()
    generated = host.worker.batcher.call(loop).wait(1800)
    wall = time.perf_counter() - t0
    n = len(prompts)
    return {**summary([step_done_at[0]] * n, [step_done_at[-1]] * n, t0, wall, tokens),
            "exec_ms_per_decode_step": 1e3 * statistics.mean(timed.step_s[1:]),
            "texts": [tok.decode(g) for g in generated]}


def run_inferlets(host: InferletHost, prompts: list[str], tokens: int) -> dict:
    """One text_completion inferlet per prompt, all launched at once."""
    reset_counters(host)
    sent_at = [[] for _ in prompts]  # when each inferlet sent each piece of text

    def recorder(i):
        return lambda message: sent_at[i].append(time.perf_counter())

    t0 = time.perf_counter()
    running = [host.launch(PROGRAM, ["--prompt", p, "--max-tokens", str(tokens), "--ignore-eos"],
                           on_message=recorder(i)) for i, p in enumerate(prompts)]
    outcomes = wait_all_ok(running)
    wall = time.perf_counter() - t0
    counters = host_counters(host, wall, full_step_passes=len(prompts))
    passes = len(prompts) * tokens
    return {**summary([t[0] for t in sent_at], [t[-1] for t in sent_at], t0, wall, tokens), **counters,
            "host_import_ms_per_token": 1e3 * counters["host_import_s"] / passes,
            "host_import_calls_per_token": counters["host_import_calls"] / passes,
            "guest_wasm_ms_per_token": 1e3 * counters["guest_wasm_s"] / passes,
            "texts": ["".join(o.messages) for o in outcomes]}


def measure(host: InferletHost, concurrency: int, tokens: int, repeats: int) -> dict:
    prompts = prompts_for(concurrency)
    runs = {"plain": [], "inferlet": []}
    for r in range(repeats):
        order = ("plain", "inferlet") if r % 2 == 0 else ("inferlet", "plain")
        for side in order:
            run = run_plain if side == "plain" else run_inferlets
            runs[side].append(run(host, prompts, tokens))
    median = lambda side, key: statistics.median(run[key] for run in runs[side])
    row = {side: {key: median(side, key) for key, value in runs[side][0].items() if isinstance(value, (int, float))}
           for side in runs}
    # each repeat pairs the two sides under the same machine load: the ratio is the median of the pairs'
    paired = lambda key: statistics.median(i[key] / p[key] for i, p in zip(runs["inferlet"], runs["plain"]))
    row["tpot_ratio"], row["tok_s_ratio"] = paired("tpot_ms"), paired("tok_s")
    row["same_text"] = sum(a == b for a, b in zip(runs["plain"][-1]["texts"], runs["inferlet"][-1]["texts"]))
    row["runs"] = {side: [{k: v for k, v in run.items() if k != "texts"} for run in runs[side]] for side in runs}
    return row


def print_table(rows: list[dict], tokens: int) -> None:
    print(f"\n{tokens} new tokens per request, medians over repeats; ratio = inferlet / plain")
    print("| concurrency | batching | side | TTFT ms | TPOT ms | tok/s | TPOT ratio | tok/s ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        for side in ("plain", "inferlet"):
            r = row[side]
            ratios = f"**{row['tpot_ratio']:.3f}x** | {row['tok_s_ratio']:.3f}x" if side == "inferlet" else " | "
            print(f"| {row['concurrency']} | {row['policy']} | {side} | {r['ttft_ms']:.1f} | {r['tpot_ms']:.2f} | "
                  f"{r['tok_s']:.1f} | {ratios} |")
    print("\nwhere the inferlet's time goes (per step / per token):")
    for row in rows:
        r, p = row["inferlet"], row["plain"]
        print(f"  c={row['concurrency']} {row['policy']}: executor {r['exec_ms_per_full_step']:.2f} ms/step "
              f"(plain loop {p['exec_ms_per_decode_step']:.2f}), executor idle {r['host_ms_per_full_step']:.2f} ms "
              f"between steps, {r['mean_passes_per_step']:.1f} passes/step; per token: host imports "
              f"{r['host_import_ms_per_token']:.3f} ms ({r['host_import_calls_per_token']:.1f} calls), guest wasm "
              f"{r['guest_wasm_ms_per_token']:.3f} ms; same text as the plain loop: {row['same_text']}/{row['concurrency']}")


def policies(concurrency: int, gather_ms: float | None, ungathered: bool = False) -> dict[str, BatchPolicy]:
    """The default policy; with --ungathered also adaptive without gathering (gather_ms=0: a step
    goes as soon as the executor is idle); with --gather-ms one that waits for all `concurrency` passes."""
    chosen = {"adaptive": BatchPolicy()}
    if ungathered and concurrency > 1:
        chosen["adaptive gather_ms=0"] = BatchPolicy(gather_ms=0)
    if gather_ms is not None and concurrency > 1:
        chosen[f"kort k={concurrency} t={gather_ms:g}ms"] = BatchPolicy("kort", k=concurrency, t_ms=gather_ms)
    return chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gather-ms", type=float, default=None,
                    help="also measure the inferlets under a kort policy: a step waits up to this long for all passes")
    ap.add_argument("--ungathered", action="store_true",
                    help="also measure adaptive batching without gathering a step's callers (gather_ms=0)")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads for the executor")
    ap.add_argument("--json", default=None)
    opts = ap.parse_args(argv)
    if opts.tokens < 2:
        ap.error("--tokens must be at least 2 (TPOT is measured after the first token)")

    pages_per_request = -(-(64 + opts.tokens) // 16) + 1  # the longest prompt is under 64 tokens
    executor = load_executor(max(opts.concurrency) * pages_per_request + 64, opts.torch_threads)
    load_before = os.getloadavg()
    rows = []
    for c in opts.concurrency:
        for name, policy in policies(c, opts.gather_ms, opts.ungathered).items():
            # one host at a time: each has its own executor thread, and two threads running torch slow both
            with InferletHost(executor, policy=policy) as host:
                host.component(PROGRAM)  # build + compile once (cached)
                run_plain(host, prompts_for(c), 4)  # warm-up: both sides, this shape
                run_inferlets(host, prompts_for(c), 4)
                row = {"concurrency": c, "policy": name, **measure(host, c, opts.tokens, opts.repeats)}
                host.worker.pages.check_idle()
            rows.append(row)
            print(f"c={c} {name}: TPOT inferlet {row['inferlet']['tpot_ms']:.2f} ms, plain {row['plain']['tpot_ms']:.2f} ms "
                  f"-> {row['tpot_ratio']:.3f}x", flush=True)
    load_after = os.getloadavg()
    print_table(rows, opts.tokens)
    print(f"\nload average (1, 5, 15 min) before {load_before}, after {load_after}: other work on the machine "
          f"makes every figure noisy")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"tokens": opts.tokens, "repeats": opts.repeats, "load_before": load_before,
                                               "load_after": load_after, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
