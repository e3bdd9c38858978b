"""The shared services every inferlet on one host reaches through its imports."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from cluster.batcher import Batcher
from cluster.http_client import HttpClient
from cluster.messaging import MessageBus
from cluster.page_registry import PageRegistry
from cluster.timers import Timers
from workers.executor import Executor


@dataclass
class HostServices:
    executor: Executor  # model info and tokenizer (thread-safe reads); tensor work goes through the batcher
    batcher: Batcher  # forward passes and executor operations
    pages: PageRegistry  # page ownership, sharing and exports
    bus: MessageBus  # topics, queues, key-value store
    http: HttpClient  # outbound HTTP under the deployment's allow-list
    timers: Timers  # sleeps and timeouts
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _grammar_compiler: object = None
    _vocabulary: list[str] | None = None

    def grammars(self):
        """The grammar compiler, built on first use (llguidance reads the tokenizer: ~1 s)."""
        with self._lock:
            if self._grammar_compiler is None:
                from cluster.grammar import GrammarCompiler

                info = self.executor.info
                self._grammar_compiler = GrammarCompiler(self.executor.tokenizer, info.vocab_size,
                                                         info.stop_token_ids)
            return self._grammar_compiler

    def vocabulary(self) -> list[str]:
        with self._lock:
            if self._vocabulary is None:
                tok = self.executor.tokenizer
                self._vocabulary = [tok.id_to_token(i) or "" for i in range(self.executor.info.vocab_size)]
            return self._vocabulary

    def close(self) -> None:
        self.batcher.close()
        self.http.close()
        self.timers.close()
