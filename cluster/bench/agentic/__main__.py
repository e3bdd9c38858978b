"""python -m cluster.bench.agentic: see the package's docstring."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cluster.bench.agentic as package
from cluster.api.grpc_server import InferletService
from cluster.api.openai_http import serve_openai
from cluster.api.program_store import ProgramStore
from cluster.bench.agentic.agents import CODEACT, REACT, SWARM
from cluster.bench.agentic.ideal import ideal_seconds
from cluster.bench.agentic.report import chart, table
from cluster.bench.agentic.search import BEAM, TREE
from cluster.bench.agentic.tool_server import start_tool
from cluster.bench.agentic.workload import Env, run_client_loop, run_inferlets
from cluster.bench.common import load_executor
from cluster.runtime.inferlet_host import InferletHost
from cluster.services.http_client import HttpPolicy
from workers.executors import EXECUTORS

WORKLOADS = {w.name: w for w in (REACT, CODEACT, SWARM, TREE, BEAM)}


def sizes_for(workload, opts) -> dict:
    sizes = dict(workload.quick if opts.quick else workload.sizes, tool_ms=opts.tool_ms)
    for key in ("tasks", "rounds", "tokens"):
        if getattr(opts, key) is not None and key in sizes:
            sizes[key] = getattr(opts, key)
    if sizes["tasks"] % sizes.get("team", 1):
        raise SystemExit(f"{workload.name}: --tasks {sizes['tasks']} is not a multiple of its team size {sizes['team']}")
    return sizes


def pages_needed(sizes: dict) -> int:
    """KV pages for one side of a workload at once (16-token pages), generously."""
    s, pages = sizes, lambda tokens: -(-tokens // 16) + 2
    if "width" in s:
        return s["tasks"] * 2 * s["width"] * pages(80 + s["tokens"])
    if "branch" in s:
        return s["tasks"] * s["keep"] * s["branch"] * pages(80 + s["depth"] * s["tokens"])
    turn = s["tokens"] + 40 + s.get("team", 1) * (s["tokens"] + 12)
    return s["tasks"] * pages(200 + s["rounds"] * turn)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes of every workload")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, of " + ", ".join(WORKLOADS))
    ap.add_argument("--tasks", type=int, default=None, help="tasks at once (every workload)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per agent (react, codeact, swarm)")
    ap.add_argument("--tokens", type=int, default=None, help="generated tokens per round, thought or beam")
    ap.add_argument("--tool-ms", type=float, default=100.0, help="the HTTP tool's latency (react)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                    help="the executor's (fp32 runs ~3x faster than bf16 on CPUs without AVX-512)")
    ap.add_argument("--quant", default="none", choices=["none", "int8", "int4"],
                    help="the linear layers' weights: none, or int8 / int4 weight-only quantized (CPU kernels)")
    ap.add_argument("--executor", default="torch", choices=EXECUTORS,
                    help="torch: our model code; vllm: vLLM's model code and kernels (run from .venv-vllm)")
    ap.add_argument("--openai-url", default=None, help="drive this OpenAI endpoint's client loop instead of ours")
    ap.add_argument("--openai-model", default=None, help="with --openai-url: the model name it serves")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    opts = ap.parse_args(argv)
    if bool(opts.openai_url) != bool(opts.openai_model):
        ap.error("--openai-url and --openai-model go together")
    unknown = [w for w in opts.workloads.split(",") if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    chosen = [(WORKLOADS[w], sizes_for(WORKLOADS[w], opts)) for w in opts.workloads.split(",")]
    tool = start_tool(opts.tool_ms / 1e3)
    tool_url = f"http://127.0.0.1:{tool.server_address[1]}/"
    executor = load_executor(max(pages_needed(s) for _, s in chosen) + 256, dtype=opts.dtype, quant=opts.quant,
                             executor=opts.executor)
    policy = HttpPolicy(allowed_hosts=(f"127.0.0.1:{tool.server_address[1]}",))
    results, failures = {}, {}
    with InferletHost(executor, http_policy=policy) as host:
        service = InferletService(host, ProgramStore())
        http = None if opts.openai_url else serve_openai(service, port=0)
        url, model = (opts.openai_url, opts.openai_model) if opts.openai_url else (http.url, service.model_name())
        try:
            import openai

            print("building and compiling the inferlets, warming up ...", flush=True)
            for workload, _ in chosen:
                host.component(workload.inferlet)
            client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=1800)
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
            for workload, sizes in chosen:
                print(f"{workload.name}: {workload.describe(sizes)}", flush=True)
                try:
                    results[workload.name] = run_workload(host, workload, sizes, tool_url, client, model, url)
                except Exception as e:  # the other workloads still run; the failure is reported
                    failures[workload.name] = repr(e)
                    print(f"  FAILED: {e!r}", flush=True)
        finally:
            if http is not None:
                http.stop()
    tool.shutdown()
    weights = opts.dtype if opts.quant == "none" else f"{opts.dtype}, {opts.quant}"
    weights += "" if opts.executor == "torch" else f", {opts.executor} executor"
    print(f"\nAgentic workloads, {weights}, client loop over {url}:")
    print(table(results))
    for name, error in failures.items():
        print(f"{name} failed: {error}")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"dtype": opts.dtype, "quant": opts.quant, "executor": opts.executor, "client_loop_server": url,
                                               "workloads": results, "failures": failures}, indent=1))
    if opts.png and results:
        chart(results, opts.png, f"Inferlet vs client loop over an OpenAI API ({weights}, same host)")
    return 1 if failures else 0


def run_workload(host, workload, sizes: dict, tool_url: str, client, model: str, url: str) -> dict:
    """Both sides of one workload (and ReAct's ideal), the inferlets first."""
    run_id = f"{workload.name}-{time.time_ns()}"
    result = {"what": workload.describe(sizes), "sizes": sizes}
    if workload is REACT:
        result["ideal"] = ideal_seconds(host, sizes)
    result["inferlet"] = run_inferlets(host, workload, Env(sizes, tool_url, run_id))
    print(f"  inferlets {result['inferlet']['wall_s']:.1f} s; the client loop over {url} ...", flush=True)
    result["client_loop"] = run_client_loop(workload, Env(sizes, tool_url, run_id, client, model))
    print(f"  client loop {result['client_loop']['wall_s']:.1f} s", flush=True)
    result["inferlet_vs_loop"] = result["inferlet"]["tasks_per_min"] / result["client_loop"]["tasks_per_min"]
    if "ideal" in result:
        result["inferlet_vs_ideal"] = result["inferlet"]["wall_s"] / result["ideal"]["seconds"]
    return result


if __name__ == "__main__":
    sys.exit(main())
