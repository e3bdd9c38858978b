"""This process's Prometheus metrics (prometheus_client), served on `/metrics` of the HTTP port.

One registry per process (REGISTRY), metrics as module globals the way prometheus_client intends:
the code that sees an event counts it where it happens (a step, a launch, an import call) at the
cost of a lock and an add. What is a state rather than an event (KV pages free, held, cached,
exported) is read when scraped, by a collector the server registers for its workers
(`register_collector`). Names follow Prometheus's conventions: `pie_` first, `_total` on counters,
base units (`_seconds`). In cluster mode every actor has its own registry; the gateway gathers them
(cluster/actors/gateway.py) and labels each series with the actor it came from.
"""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

disable_created_metrics()  # a `_created` series beside every counter and histogram: noise on a status board
REGISTRY = CollectorRegistry(auto_describe=True)
_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds: steps, tokens, calls
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # passes in a step

INFERLETS_LAUNCHED = Counter("pie_inferlets_launched_total", "Inferlets launched", ["api"], registry=REGISTRY)
INFERLETS_ENDED = Counter("pie_inferlets_ended_total", "Inferlets ended, by cause (finished, failed, stopped)",
                          ["cause"], registry=REGISTRY)
INFERLETS_RUNNING = Gauge("pie_inferlets_running", "Inferlets running now", registry=REGISTRY)
LAUNCH_SECONDS = Histogram("pie_launch_seconds", "From a launch request to its inferlet running", buckets=_FAST,
                           registry=REGISTRY)
HANDLER_CALLS = Counter("pie_handler_calls_total", "Host calls (WIT imports) made by inferlets, by import",
                        ["call"], registry=REGISTRY)
STEP_SECONDS = Histogram("pie_step_seconds", "Time inside one executor step", buckets=_FAST, registry=REGISTRY)
STEP_PASSES = Histogram("pie_step_passes", "Forward passes (or chunks of them) batched into one step",
                        buckets=_SIZES, registry=REGISTRY)
TOKENS = Counter("pie_tokens_total", "Input tokens run through the model, by phase (a pass of one token: decode)",
                 ["phase"], registry=REGISTRY)
TOKENS_PREFILL, TOKENS_DECODE = TOKENS.labels("prefill"), TOKENS.labels("decode")
QUEUE_PASSES = Gauge("pie_queued_passes", "Forward passes waiting for a step, as of the last step",
                     registry=REGISTRY)
PREFIX_PAGES = Counter("pie_prefix_cache_pages_total", "Prefix-cache lookups, in pages: hit or miss",
                       ["result"], registry=REGISTRY)
PREFIX_HITS, PREFIX_MISSES = PREFIX_PAGES.labels("hit"), PREFIX_PAGES.labels("miss")
TTFT_SECONDS = Histogram("pie_time_to_first_token_seconds",
                         "From a request to its first message (gRPC) or first chunk with text (OpenAI)", ["api"],
                         buckets=_FAST, registry=REGISTRY)
ITL_SECONDS = Histogram("pie_inter_token_latency_seconds", "Between consecutive messages or text chunks of a "
                        "request", ["api"], buckets=_FAST, registry=REGISTRY)
HTTP_CALLS = Counter("pie_tool_http_requests_total", "Inferlets' HTTP requests (tool calls), by outcome",
                     ["outcome"], registry=REGISTRY)
HTTP_SECONDS = Histogram("pie_tool_http_request_seconds", "Inferlets' HTTP requests, start to answer",
                         buckets=_FAST, registry=REGISTRY)
BUS_MESSAGES = Counter("pie_bus_messages_total", "Messages between inferlets, by kind (publish, push)", ["kind"],
                       registry=REGISTRY)
BUS_PUBLISHED, BUS_PUSHED = BUS_MESSAGES.labels("publish"), BUS_MESSAGES.labels("push")

_lock = threading.Lock()
_collectors: dict[int, object] = {}


def register_collector(collector) -> None:
    """Add a collector read at each scrape (a server's KV pages); unregister_collector removes it."""
    with _lock:
        if id(collector) not in _collectors:
            REGISTRY.register(collector)
            _collectors[id(collector)] = collector


def unregister_collector(collector) -> None:
    with _lock:
        if _collectors.pop(id(collector), None) is not None:
            REGISTRY.unregister(collector)


def exposition() -> bytes:
    """This process's metrics in Prometheus's text format."""
    return generate_latest(REGISTRY)


class _Families:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return self.families


def merged(sources: list[tuple[str, str]]) -> bytes:
    """Several processes' expositions as one: each series gains the label actor=<its process>, and
    the series of one metric from every process come under one family (cluster mode's /metrics)."""
    families: dict[str, Metric] = {}
    for actor, text in sources:
        for family in text_string_to_metric_families(text):
            mine = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                           family.unit))
            mine.samples += [s._replace(labels={**s.labels, "actor": actor}) for s in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
