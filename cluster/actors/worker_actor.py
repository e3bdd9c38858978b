"""A GPU worker as a Ray actor: one executor and its KV pages, serving handler calls to every host.

The actor loads the model into an executor of the kind it is given (workers/executors.py: "torch", ours,
or "vllm", vLLM's model code) on a short-lived thread (see workers/load_thread.py), wraps it in a
LocalWorker (the batcher and the page registry) and serves it over the handler-call service on
its node's address. It joins the directory under its worker id with that address, and reports
its free pages every LOAD_REPORT_S for placement; a directory that Ray restarted (empty) does not know
it, and it joins again (ending its exports, whose names are gone). Ray restarts it when it dies: the new process
loads the model again and joins again, empty, at a new address; hosts that lost the old one
have marked it dead meanwhile, so nothing is placed on it until it is back. A model that cannot be
loaded (ModelLoadError; a node without vLLM for the vllm executor too) is not a reason to restart: the
actor stays up without joining and `load_failure()` says why (start_cluster's wait reports it).
"""
from __future__ import annotations

import logging
import os
import threading

from cluster import metrics
from cluster.actors.directory_actor import DIRECTORY_NAME, NAMESPACE, DirectoryHandle
from cluster.api import status
from cluster.worker.batcher import BatchPolicy
from cluster.errors import UnknownWorker
from cluster.worker.local_worker import LocalWorker
from cluster.rpc.worker_service import WorkerServer, describe
from workers.errors import ModelLoadError

LOAD_REPORT_S = 1.0

log = logging.getLogger("pie.worker")


class WorkerActor:
    def __init__(self, worker_id: str, directory_name: str = DIRECTORY_NAME, model: str | None = None,
                 dtype: str = "bf16", num_pages: int | None = None, torch_threads: int | None = None,
                 policy: BatchPolicy = BatchPolicy(), device: str = "cpu", address: str | None = None,
                 quant: str = "none", executor: str = "torch"):
        """`address`: where to serve handler calls (default: the node's address, for other nodes' hosts);
        `quant`: the linear layers' weights (workers.torch_executor.QUANTS); `executor`: which executor runs
        the model (workers.executors.EXECUTORS: torch, ours, or vllm, which needs vLLM on the worker's node)."""
        import ray
        import torch

        from workers.executors import load_executor
        from workers.load_thread import load_on_thread

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        options = {"dtype": dtype, "quant": quant, "device": device, **({"num_pages": num_pages} if num_pages else {})}
        self.worker_id = worker_id
        self.load_error: str | None = None
        try:
            loaded = load_on_thread(lambda: load_executor(executor, model, **options))
        except ModelLoadError as e:
            # a model that cannot be found or read will not load after a restart either: raising here
            # would have Ray restart the actor forever. It stays up, serves nothing and says why.
            self.load_error = str(e)
            log.error("worker %s cannot load its model: %s", worker_id, e)
            return
        self.worker = LocalWorker(loaded, policy)
        status.watch_worker(worker_id, self.worker)  # its KV pages on its metrics
        self.directory = DirectoryHandle(ray.get_actor(directory_name, namespace=NAMESPACE))
        self.server = WorkerServer(self.worker, address=address or ray.util.get_node_ip_address(),
                                   token=self.directory.internal_token())  # only the cluster's hosts
        self._join()
        log.info("worker %s serves %s (%d KV pages) at %s", worker_id, loaded.info.name, loaded.info.num_pages,
                 self.server.target)
        threading.Thread(target=self._report_load, name="report-load", daemon=True).start()
        niceness = os.getpriority(os.PRIO_PROCESS, 0)
        if niceness > 0:
            log.warning("worker %s runs at nice %d (Ray's default for workers): its executor yields every core it "
                        "shares; start Ray with RAY_worker_niceness=0 in its environment", worker_id, niceness)

    def _join(self) -> None:
        info = self.worker.info
        self.directory.join(self.worker_id, self.server.target, info.num_pages, describe(self.worker))

    def _report_load(self) -> None:
        stop = threading.Event()
        while not stop.wait(LOAD_REPORT_S):
            try:
                self.directory.report_load(self.worker_id, self.worker.num_free_pages, self.worker.pages.num_cached())
            except UnknownWorker:  # Ray restarted the directory, empty: join it again, without the old names
                dropped = self.worker.pages.drop_exports()
                log.warning("the directory restarted: worker %s joins again and ends its %d exports, whose names "
                            "it no longer knows", self.worker_id, len(dropped))
                self._join()
            except Exception as e:  # the directory is restarting, or a host marked us dead: the next round retries
                log.debug("load report failed: %r", e)

    def load_failure(self) -> str | None:
        """Why the model could not be loaded (the actor then serves nothing), or None."""
        return self.load_error

    def _serving(self) -> LocalWorker:
        """The worker; ModelLoadError naming the cause when the model never loaded."""
        if self.load_error is not None:
            raise ModelLoadError(f"worker {self.worker_id} serves nothing: {self.load_error}")
        return self.worker

    def target(self) -> str:
        self._serving()
        return self.server.target

    def free_pages(self) -> int:
        return self._serving().num_free_pages

    def check_idle(self) -> None:
        """Raise unless every page is free or accounted for (free + allocated == total)."""
        self._serving().check_idle()

    def reset_prefix_cache(self) -> int:
        """Give back every cached prefix page no inferlet holds (as vLLM's reset_prefix_cache); how
        many pages the cache still holds (those in use)."""
        pages = self._serving().pages
        pages.drop_cache()
        return pages.num_cached()

    def steps(self, drain: bool = False) -> list[tuple[int, float]]:
        """(passes, seconds in the executor) of each recent batched step; `drain` forgets them."""
        history = self._serving().batcher.steps
        steps = [(s.num_passes, s.exec_s) for s in list(history)]
        if drain:
            history.clear()
        return steps

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this actor runs on (hex), for placement checks."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def metrics_text(self) -> str:
        """This process's Prometheus metrics (the gateway gathers them onto its /metrics)."""
        return metrics.exposition().decode()

    def recent_steps(self) -> list[list]:
        """The last steps for the status page: [seconds ago, passes, tokens, ms]."""
        return status.recent_steps(self._serving())
