"""What a running server is doing, for people and for Prometheus: `/status.json` (the status page's
data) and the KV-page gauges read at each scrape of `/metrics`.

Both read the service as it is: its running inferlets and recent failures, and its workers: the
embedded one's pages and last steps directly; in cluster mode the directory's view of each worker
(pages as last reported; steps stay on the worker actors). Neither shows any prompt or message text:
an inferlet appears by its instance and program ids, a failure by the last line of its cause.
"""
from __future__ import annotations

import time
import weakref

from prometheus_client.core import GaugeMetricFamily

from cluster import metrics

STATUS_STEPS = 120  # the last steps each worker's chart shows


def _local_worker(service):
    """The embedded server's LocalWorker, or None (a cluster gateway's workers are actors)."""
    worker = getattr(service.host, "worker", None)
    return worker if hasattr(worker, "batcher") else None


def _pages_view(worker_id: str, worker) -> dict:
    pages = {"total": worker.info.num_pages, "free": worker.num_free_pages, "cached": worker.pages.num_cached(),
             "exported": worker.pages.num_exported()}
    return {"id": worker_id, "pages": pages}


def recent_steps(worker) -> list[list]:
    """A LocalWorker's last steps: [seconds ago, passes, tokens, ms in the executor]."""
    now = time.perf_counter()
    return [[round(now - s.started, 3), s.num_passes, s.num_tokens, round(s.exec_s * 1e3, 2)]
            for s in list(worker.batcher.steps)[-STATUS_STEPS:]]


def worker_views(service) -> list[dict]:
    """Each worker: its id, KV pages (total, free, cached, exported) and its last steps as
    [seconds ago, passes, tokens, ms] (embedded mode only)."""
    worker = _local_worker(service)
    if worker is not None:
        return [{**_pages_view("worker-0", worker), "live": True, "running": len(service.live()),
                 "steps": recent_steps(worker)}]
    directory = getattr(service, "directory", None)
    if directory is None:
        return []
    steps = getattr(service, "worker_steps", lambda: {})()
    return [{"id": w.worker_id, "live": w.live, "running": w.running, "steps": steps.get(w.worker_id, []),
             "pages": {"total": w.num_pages, "free": w.free_pages, "cached": w.cached_pages, "exported": None}}
            for w in directory.workers()]


def metrics_text(service) -> bytes:
    """/metrics: this process's, or in cluster mode the gateway's and every actor's, each labelled."""
    sources = getattr(service, "metrics_sources", None)
    return metrics.exposition() if sources is None else metrics.merged(sources())


def _counts(*names: str) -> dict[tuple[str, str], float]:
    """(sample name, its one label's value) -> value for the named counters, in one pass over the
    registry (get_sample_value collects all of it for each value asked)."""
    return {(s.name, next(iter(s.labels.values()), "")): s.value for family in metrics.REGISTRY.collect()
            if family.name in names for s in family.samples}


def status(service, started: float) -> dict:
    """The status page's data. `started`: time.time() when the server started."""
    worker = _local_worker(service)
    inferlets = [{"id": iid, "program": program[:12], "age_s": round(age, 1), "api": api,
                  "pages": worker.pages.num_held(iid) if worker is not None else None,
                  **dict(zip(("tokens", "state"), service.activity(iid)))}
                 for iid, program, age, api in sorted(service.live(), key=lambda x: -x[2])]
    counts = _counts("pie_prefix_cache_pages", "pie_inferlets_ended")
    hits, misses = (counts.get(("pie_prefix_cache_pages_total", r), 0.0) for r in ("hit", "miss"))
    workers = worker_views(service)
    return {
        "model": service.model_name(),
        "uptime_s": round(time.time() - started, 1),
        "inferlets": inferlets,
        "workers": workers,
        "prefix_cache": {"pages": sum(w["pages"]["cached"] or 0 for w in workers), "hit_pages": int(hits),
                         "miss_pages": int(misses), "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None},
        "ended": {cause: int(counts.get(("pie_inferlets_ended_total", cause), 0.0))
                  for cause in ("finished", "failed", "stopped")},
        "failures": [{"id": f.instance_id, "program": f.program_id[:12], "ended": f.ended, "cause": f.cause}
                     for f in reversed(service.failures)],
    }


class _KvPages:
    """pie_kv_pages{worker, state}: total, free, cached (held only by the prefix cache), exported
    (named by an export) and held (by inferlets or exports), read at each scrape from the embedded
    services and worker actors of this process (one, but tests start several: all are listed)."""

    def __init__(self):
        self.services: weakref.WeakSet = weakref.WeakSet()
        self.workers: dict[str, object] = {}  # a worker actor's id -> its LocalWorker

    def describe(self):
        return []  # series appear with the workers; nothing to check at registration

    def collect(self):
        family = GaugeMetricFamily("pie_kv_pages", "KV pages of each worker, by state", labels=["worker", "state"])
        views = [w for service in list(self.services) for w in worker_views(service)]
        views += [_pages_view(worker_id, worker) for worker_id, worker in list(self.workers.items())]
        for w in views:
            pages = w["pages"]
            held = pages["total"] - pages["free"] - (pages["cached"] or 0)
            for state, value in (*pages.items(), ("held", held)):
                if value is not None:
                    family.add_metric([w["id"], state], value)
        yield family


_kv_pages = _KvPages()


def watch(service) -> None:
    """Report the embedded service's KV pages on /metrics (until it is garbage). A cluster gateway's
    workers report their own, gathered with the rest of their metrics."""
    if _local_worker(service) is not None:
        _kv_pages.services.add(service)
        metrics.register_collector(_kv_pages)


def watch_worker(worker_id: str, worker) -> None:
    """Report a worker actor's KV pages on its process's metrics."""
    _kv_pages.workers[worker_id] = worker
    metrics.register_collector(_kv_pages)
