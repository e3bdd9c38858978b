"""What every workload of the agentic benchmark is: an inferlet launched once per task, and the same
work as a client loop (a function run on a thread per task against an OpenAI endpoint), timed
the same way."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cluster.bench.common import run_concurrently, wait_all_ok
from cluster.runtime.inferlet_host import InferletHost

INFERLETS = Path(__file__).resolve().parents[3] / "inferlets" / "bench"


@dataclass
class Env:
    """What a run's tasks share: the sizes, the tool's URL, the run's id (names its shared KV and
    topics), and for the client loop an openai client, the model's name and a dict."""
    sizes: dict
    tool_url: str
    run_id: str
    client: object = None
    model: str = ""
    shared: dict = field(default_factory=dict)  # what a workload's client-loop tasks share (a team's board)


@dataclass
class Workload:
    name: str
    inferlet: Path
    inferlet_args: Callable[[int, Env], list]  # task index -> the inferlet's arguments
    client_task: Callable[[int, Env], None]  # task index -> runs that task over the endpoint
    sizes: dict  # the default sizes; "tasks" among them
    quick: dict  # --quick's
    describe: Callable[[dict], str]  # sizes -> one line saying what runs


def latencies(ends: list[float], t0: float, wall: float) -> dict:
    per_task = sorted(e - t0 for e in ends)
    return {"tasks_per_min": 60 * len(ends) / wall, "wall_s": wall, "mean_s": statistics.mean(per_task),
            "p90_s": per_task[min(len(per_task) - 1, int(0.9 * len(per_task)))]}


def run_inferlets(host: InferletHost, workload: Workload, env: Env) -> dict:
    ends = [0.0] * env.sizes["tasks"]

    def ended(i):
        return lambda _outcome: ends.__setitem__(i, time.perf_counter())

    t0 = time.perf_counter()
    running = [host.launch(workload.inferlet, [str(a) for a in workload.inferlet_args(i, env)], on_end=ended(i))
               for i in range(env.sizes["tasks"])]
    wait_all_ok(running)
    return latencies(ends, t0, time.perf_counter() - t0)


def run_client_loop(workload: Workload, env: Env) -> dict:
    ends, errors = [0.0] * env.sizes["tasks"], []

    def task(i):
        try:
            workload.client_task(i, env)
            ends[i] = time.perf_counter()
        except Exception as e:  # reported after the run; a failed side has no figures
            errors.append(f"task {i}: {e!r}")

    t0, wall = run_concurrently(task, env.sizes["tasks"])
    if errors:
        raise RuntimeError(f"{workload.name}: {len(errors)} client-loop tasks failed; first: {errors[0]}")
    return latencies(ends, t0, wall)
