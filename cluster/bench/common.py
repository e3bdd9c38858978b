"""What the inferlet-host benchmarks share: the executor they load, a wrapper forwarding to it,
and the counters read from a host after a run (batcher steps, host imports, guest wasm time)."""
from __future__ import annotations

import statistics
import threading
import time
from typing import Callable

from cluster.runtime import wasm_async
from cluster.runtime.inferlet_host import InferletHost, Outcome, RunningInferlet
from workers.executor import Executor


def load_executor(num_pages: int, torch_threads: int | None = None, dtype: str = "bf16",
                  quant: str = "none", executor: str = "torch") -> Executor:
    """The default model on the CPU with `num_pages` KV pages and `quant` linear weights
    (workers.torch_executor.QUANTS) in an `executor` executor (workers.executors.EXECUTORS), loaded
    on a short-lived thread (workers/load_thread.py says why)."""
    import torch

    from workers import executors
    from workers.load_thread import load_on_thread

    if torch_threads:
        torch.set_num_threads(torch_threads)
    return load_on_thread(lambda: executors.load_executor(executor, None, dtype=dtype, quant=quant,
                                                          num_pages=num_pages))


class DelegatingExecutor(Executor):
    """Forwards everything to a real executor; subclasses override what they fake or measure."""

    def __init__(self, real: Executor):
        self.real = real

    info = property(lambda self: self.real.info)
    tokenizer = property(lambda self: self.real.tokenizer)
    num_free_pages = property(lambda self: self.real.num_free_pages)

    def allocate_pages(self, n):
        return self.real.allocate_pages(n)

    def free_pages(self, pages):
        self.real.free_pages(pages)

    def step(self, batch):
        return self.real.step(batch)

    def copy_slots(self, *args):
        self.real.copy_slots(*args)

    def mask_slots(self, *args):
        self.real.mask_slots(*args)

    def read_pages(self, pages):
        return self.real.read_pages(pages)

    def write_pages(self, pages, data):
        self.real.write_pages(pages, data)

    def check_idle_invariant(self):
        self.real.check_idle_invariant()


def run_concurrently(request: Callable[[int], None], count: int) -> tuple[float, float]:
    """request(i) for i in range(count), each on a thread of its own, all started together;
    (perf_counter at the start, seconds until the last one returned)."""
    threads = [threading.Thread(target=request, args=(i,)) for i in range(count)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return t0, time.perf_counter() - t0


def wait_all_ok(running: list[RunningInferlet], timeout_s: float = 1800) -> list[Outcome]:
    """Wait for every launched inferlet; raise if any of them failed."""
    outcomes = [r.wait(timeout_s) for r in running]
    failed = [o.error for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} inferlets failed; first: {failed[0]}")
    return outcomes


def reset_counters(host: InferletHost) -> None:
    """Start counting a run: the batcher's step history, host-import time, guest polling time."""
    host.worker.batcher.steps.clear()
    wasm_async.import_stats.reset()
    host.scheduler.poll_seconds = 0.0


def host_counters(host: InferletHost, wall_s: float, full_step_passes: int) -> dict:
    """What the host did since reset_counters. "Full" steps are decode steps of `full_step_passes`
    passes, one token each (every inferlet of the run in the step: the steady state; a step that
    also carries a chunk of a prompt is not one, and would weigh on the mean as a ten times longer
    step); the executor's idle time between consecutive full steps is what the host and the guests
    add per step."""
    steps = list(host.worker.batcher.steps)
    full = [s for s in steps if s.num_passes == full_step_passes == s.num_tokens] or steps
    gaps = [b.started - (a.started + a.exec_s) for a, b in zip(full, full[1:])]
    import_s = wasm_async.import_stats.seconds
    return {
        "steps": len(steps), "mean_passes_per_step": statistics.mean(s.num_passes for s in steps),
        "full_steps": len(full),
        "exec_ms_per_full_step": 1e3 * statistics.mean(s.exec_s for s in full),
        "host_ms_per_full_step": 1e3 * statistics.median(gaps) if gaps else float("nan"),
        "executor_busy_fraction": sum(s.exec_s for s in steps) / wall_s,
        "host_import_calls": wasm_async.import_stats.calls, "host_import_s": import_s,
        "guest_wasm_s": host.scheduler.poll_seconds - import_s,
    }
