"""Load a model on a short-lived thread, so the thread that steps it has the only OpenMP team.

A thread that has run torch keeps an OpenMP (libgomp) team of its own. Once two teams exist and
their threads outnumber the cores, libgomp stops spin-waiting between parallel regions, and every
step on the executor thread ran ~1.8x slower (40 vs 22 ms a token at batch 1 on 2 cores) when the
main thread had loaded the model. A loading thread that exits takes its team with it.
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def load_on_thread(load: Callable[[], T]) -> T:
    """load() on a thread of its own, which then exits; its exception is raised here."""
    result: dict = {}

    def run():
        try:
            result["value"] = load()
        except BaseException as e:  # re-raised on the caller's thread
            result["error"] = e

    loader = threading.Thread(target=run, name="load-model")
    loader.start()
    loader.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
