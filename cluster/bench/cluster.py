"""Cluster mode versus embedded mode: time per output token at the same load, in one run.

    python -m cluster.bench.cluster [--concurrency 1 8] [--tokens 48] [--repeats 3] [--workers 1]
                                    [--torch-threads N] [--json OUT]

Both sides serve the client API over loopback gRPC and are measured by the same client: c
text_completion inferlets (--ignore-eos, so each makes exactly --tokens tokens) launched
together, each timing its own messages. Embedded: `pie serve`'s stack in this process (one
executor, one host). Cluster: `pie serve --ray`'s stack on a local Ray: the gateway here, a host
actor and --workers worker actors, each pass crossing two process boundaries (gateway -> host
over gRPC for events, host -> worker over the handler-call stream). With --workers 1 both sides
have the same compute (one executor, the machine's cores); more workers split the cores here.
Per request: TTFT and TPOT (decode time per token after the first); every figure is the median
over requests, then over repeats. Each repeat starts and measures both modes, one after the other
(embedded first in odd repeats, cluster first in even ones), so a machine that slows down or speeds
up during the run weighs on both; a ratio is the median over repeats of cluster / embedded.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from cluster.api.grpc_client import Failed, Message, PieClient
from cluster.api.grpc_server import serve_service
from cluster.runtime.inferlet_build import build
from cluster.bench.common import run_concurrently
from workers.executors import EXECUTORS

PROGRAM = Path(__file__).resolve().parents[2] / "inferlets" / "examples" / "text_completion.py"
PROMPTS = ("What is the capital of France?", "Name three primary colors.", "Why is the sky blue?",
           "Write a haiku about the sea.")


def measure(target: str, program: Path, concurrency: int, tokens: int) -> dict:
    """c inferlets at once through the client API at `target`: median TTFT and TPOT in ms."""
    with PieClient(target, timeout_s=600) as client:
        program_id = client.upload(program)
        times: list[list[float]] = [[] for _ in range(concurrency)]
        errors: list[str] = []
        start = threading.Barrier(concurrency)
        t0 = [0.0] * concurrency

        def one(i: int) -> None:
            start.wait()
            t0[i] = time.perf_counter()
            for event in client.launch(program_id, ["--prompt", PROMPTS[i % len(PROMPTS)], "--max-tokens",
                                                    str(tokens), "--ignore-eos"]):
                if isinstance(event, Message):
                    times[i].append(time.perf_counter())
                elif isinstance(event, Failed):
                    errors.append(event.error)

        run_concurrently(one, concurrency)
    if errors:
        raise RuntimeError(f"{len(errors)} inferlets failed; first: {errors[0]}")
    short = [len(t) for t in times if len(t) < 2]
    if short:
        raise RuntimeError(f"an inferlet sent {short[0]} messages; the benchmark needs at least 2 per request")
    return {"ttft_ms": 1e3 * statistics.median(t[0] - s for t, s in zip(times, t0)),
            "tpot_ms": 1e3 * statistics.median((t[-1] - t[0]) / (len(t) - 1) for t in times)}


def step_stats(steps: list[tuple[int, float]]) -> dict:
    """Mean passes per batched step and mean executor ms per step, over the steps given."""
    if not steps:
        return {"passes_per_step": 0.0, "exec_ms": 0.0}
    return {"passes_per_step": statistics.mean(p for p, _ in steps), "exec_ms": 1e3 * statistics.mean(e for _, e in steps)}


def embedded(dtype: str, torch_threads: int | None = None, quant: str = "none", executor: str = "torch"):
    """`pie serve`'s stack in this process; returns (target, stop, steps)."""
    import torch

    from cluster.api.grpc_server import InferletService
    from cluster.runtime.inferlet_host import InferletHost
    from cluster.api.program_store import ProgramStore
    from workers.executors import load_executor
    from workers.load_thread import load_on_thread

    if torch_threads:
        torch.set_num_threads(torch_threads)
    host = InferletHost(load_on_thread(lambda: load_executor(executor, None, dtype=dtype, quant=quant)))
    server = serve_service(InferletService(host, ProgramStore()), port=0)
    def steps():  # the steps since the last call
        history = host.worker.batcher.steps
        taken = [(s.num_passes, s.exec_s) for s in list(history)]
        history.clear()
        return taken
    return server.target, lambda: (server.stop(0), host.close()), steps


def clustered(dtype: str, workers: int, torch_threads: int | None = None, quant: str = "none",
              executor: str = "torch"):
    """`pie serve --ray`'s stack on a local Ray; returns (target, stop, steps)."""
    import ray

    from cluster.actors.cluster import ClusterSpec, init_local_ray, start_cluster

    init_local_ray(log_to_driver=False)
    cluster = start_cluster(ClusterSpec(workers=workers, hosts=1, dtype=dtype, quant=quant, executor=executor,
                                        bind_address="127.0.0.1", torch_threads=torch_threads))
    server = serve_service(cluster.gateway_service(), port=0)
    steps = lambda: [s for w in cluster.workers for s in ray.get(w.steps.remote(drain=True))]
    return server.target, lambda: (server.stop(0), ray.shutdown()), steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.bench.cluster", description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--quant", default="none", choices=["none", "int8", "int4"], help="weight format (workers/quant)")
    ap.add_argument("--executor", default="torch", choices=EXECUTORS,
                    help="both sides' executor: torch (ours) or vllm (vLLM's model code; needs `make setup-vllm`)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="threads of each side's step (default: the machine's cores); fewer leave cores to the rest")
    ap.add_argument("--json", default=None, help="also write the results here")
    opts = ap.parse_args(argv)
    program = build(PROGRAM)
    results: dict = {"cores": os.cpu_count(), "tokens": opts.tokens, "workers": opts.workers,
                     "torch_threads": opts.torch_threads, "rows": {}, "repeats": []}
    starts = {"embedded": lambda: embedded(opts.dtype, opts.torch_threads, opts.quant, opts.executor),
              "cluster": lambda: clustered(opts.dtype, opts.workers, opts.torch_threads, opts.quant, opts.executor)}
    runs: dict[str, list[dict]] = {}
    for r in range(opts.repeats):  # each repeat runs both modes, first one then the other, alternating
        order = ("embedded", "cluster") if r % 2 == 0 else ("cluster", "embedded")
        repeat: dict = {}
        for mode in order:
            print(f"[bench] repeat {r + 1}/{opts.repeats}: starting {mode} mode ...", file=sys.stderr, flush=True)
            target, stop, steps = starts[mode]()
            try:
                measure(target, program, 1, 4)  # warm: compile the component, first steps
                for c in opts.concurrency:
                    steps()
                    repeat[f"{mode} c={c}"] = measure(target, program, c, opts.tokens) | step_stats(steps())
            finally:
                stop()
        for c in opts.concurrency:
            repeat[f"ratio c={c}"] = {key: repeat[f"cluster c={c}"][key] / repeat[f"embedded c={c}"][key]
                                      for key in ("ttft_ms", "tpot_ms")}
        results["repeats"].append(repeat)
        for name, row in repeat.items():
            runs.setdefault(name, []).append(row)
    for name, rows in runs.items():  # medians over repeats; a ratio is the median of the paired ratios
        results["rows"][name] = {k: statistics.median(x[k] for x in rows) for k in rows[0]}
    print(f"{'':>22} {'TTFT ms':>9} {'TPOT ms':>9} {'passes/step':>12} {'step ms':>9}")
    for name, row in results["rows"].items():
        if not name.startswith("ratio"):
            print(f"{name:>22} {row['ttft_ms']:9.1f} {row['tpot_ms']:9.2f} {row['passes_per_step']:12.2f} "
                  f"{row['exec_ms']:9.2f}")
    for c in opts.concurrency:
        ratio = results["rows"][f"ratio c={c}"]
        paired = ", ".join(f"{x['tpot_ms']:.3f}" for x in runs[f"ratio c={c}"])
        print(f"{'cluster/embedded c=' + str(c):>22} {ratio['ttft_ms']:8.3f}x {ratio['tpot_ms']:8.3f}x"
              f"   (TPOT, each repeat: {paired})")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
