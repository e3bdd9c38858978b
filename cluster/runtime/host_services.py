"""The shared services every inferlet on one host reaches through its imports."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cluster.pending import Pending
from cluster.rpc.bus_service import RemoteBus
from cluster.services.http_client import HttpClient
from cluster.worker.local_worker import LocalWorker
from cluster.services.messaging import MessageBus
from cluster.rpc.remote_worker import RemoteWorker
from cluster.services.timers import Timers
from workers.executor import ModelInfo
from workers.tokenizer import Tokenizer


@dataclass
class HostServices:
    worker: LocalWorker | RemoteWorker  # the handler calls of the executor the inferlets run on
    bus: MessageBus | RemoteBus  # topics, queues, key-value store (the cluster's one bus, in cluster mode)
    http: HttpClient  # outbound HTTP under the deployment's allow-list
    timers: Timers  # sleeps and timeouts
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _grammar_compiler: object = None
    _vocabulary: list[str] | None = None
    _offload: ThreadPoolExecutor | None = None

    def offload(self, fn, *args) -> Pending:
        """fn(*args) on a small pool of threads, off the scheduler's (work proportional to a large
        input, such as encoding a long text, would stall every inferlet on the host)."""
        with self._lock:
            if self._offload is None:
                self._offload = ThreadPoolExecutor(2, thread_name_prefix="pie-offload")
        pending = Pending()

        def run():
            try:
                pending.complete(fn(*args))
            except BaseException as e:
                pending.fail(e)

        self._offload.submit(run)
        return pending

    def grammars(self):
        """The grammar compiler, built on first use (llguidance reads the tokenizer: ~1 s)."""
        with self._lock:
            if self._grammar_compiler is None:
                from cluster.services.grammar import GrammarCompiler

                info = self.info
                self._grammar_compiler = GrammarCompiler(self.tokenizer, info.vocab_size, info.stop_token_ids)
            return self._grammar_compiler

    def vocabulary(self) -> list[str]:
        with self._lock:
            if self._vocabulary is None:
                tok = self.tokenizer
                self._vocabulary = [tok.id_to_token(i) or "" for i in range(self.info.vocab_size)]
            return self._vocabulary

    @property
    def info(self) -> ModelInfo:
        return self.worker.info

    @property
    def tokenizer(self) -> Tokenizer:
        return self.worker.tokenizer

    def close(self, close_worker: bool = True) -> None:
        if close_worker:
            self.worker.close()
        self.http.close()
        self.timers.close()
        if self._offload is not None:
            self._offload.shutdown(wait=False, cancel_futures=True)
