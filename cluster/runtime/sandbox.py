"""The wasmtime side of hosting: one engine, compiled components cached, one store per inferlet.

Each store gets its own limits: linear memory and fuel (CPU: wasm instructions). Fuel also
makes a computing guest yield its thread to the others every YIELD_FUEL units (the scheduler
enforces the wall-clock limit at each yield). Fuel rather than epochs: epochs need a thread
that wakes every few milliseconds whether or not a guest runs, and on a machine whose cores
are all in a torch step each such wake-up preempts one of the step's threads.

Each store has an empty WASI context: no preopened directory (so no file can be opened), an
empty environment, no arguments, no stdio, and no network (wasmtime denies every socket
address unless told otherwise). The guest's interpreter still gets what it needs to run
(clocks, randomness, failing file calls that Python turns into exceptions rather than
traps). Everything else goes through the inferlet world's imports.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import wasmtime
from wasmtime import component as wc

from cluster.errors import InvalidComponentError
from cluster.runtime.inferlet_build import cache_dir

YIELD_FUEL = 50_000_000  # a computing guest yields the scheduler thread this often (~5 ms of guest Python here)
MAX_COMPONENT_BYTES = 64 << 20  # a component larger than this is refused before compiling


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 256 << 20  # linear memory per inferlet (a Python guest needs ~13 MB to start)
    fuel: int = 20_000_000_000  # wasm instructions (roughly) an inferlet may execute in all
    wall_seconds: float = 600.0  # lifetime from launch, waiting included
    max_inbox_messages: int = 256  # client messages not yet received
    max_pages: int = 256  # KV pages held at once
    max_message_bytes: int = 64 << 10  # one message to the client
    max_outbox_messages: int = 256  # messages to the client not yet taken by it (past it, send waits)
    max_outbox_bytes: int = 4 << 20  # their bytes
    max_outstanding_passes: int = 64  # submitted, not yet awaited
    max_outstanding_http: int = 64  # HTTP requests started with http.send, not yet awaited
    max_pass_tokens: int = 8192  # input tokens of one forward pass
    max_pass_pages: int = 8192  # KV pages one forward pass reads
    max_mask_cells: int = 1 << 24  # tokens x KV slots of one pass with a custom attention mask
    max_text_bytes: int = 1 << 20  # a text to encode, a chat's messages together, a grammar's source
    max_decode_tokens: int = 1 << 18  # tokens to decode at once


class Sandbox:
    """Owns the engine and the compiled-component cache (memory and disk)."""

    def __init__(self):
        config = wasmtime.Config()
        config.consume_fuel = True
        config.max_wasm_stack = 1 << 20
        self.engine = wasmtime.Engine(config)
        self._components: dict[str, wc.Component] = {}
        self._lock = threading.Lock()

    def new_linker(self) -> wc.Linker:
        linker = wc.Linker(self.engine)
        linker.add_wasip2()
        return linker

    def load(self, wasm_path: str | Path) -> wc.Component:
        """The compiled component of a .wasm file: from memory, else the machine-code cache, else compiled."""
        data = Path(wasm_path).read_bytes()
        if len(data) > MAX_COMPONENT_BYTES:
            raise InvalidComponentError(f"{wasm_path} is {len(data)} bytes; the limit is {MAX_COMPONENT_BYTES}")
        key = hashlib.sha256(data).hexdigest()[:32]
        with self._lock:
            if key in self._components:
                return self._components[key]
        native = cache_dir() / f"{key}.cwasm"
        component = None
        if native.exists():
            try:
                component = wc.Component.deserialize_file(self.engine, str(native))
            except wasmtime.WasmtimeError:
                component = None  # compiled by another wasmtime or config: compile again
        if component is None:
            try:
                component = wc.Component(self.engine, data)
            except wasmtime.WasmtimeError as e:
                raise InvalidComponentError(f"{wasm_path} is not a valid WebAssembly component: {e}") from e
            native.parent.mkdir(parents=True, exist_ok=True)
            partial = native.with_suffix(".partial")
            partial.write_bytes(component.serialize())
            partial.replace(native)
        with self._lock:
            self._components[key] = component
        return component

    def new_store(self, limits: Limits) -> wasmtime.Store:
        store = wasmtime.Store(self.engine)
        store.set_wasi(wasmtime.WasiConfig())  # nothing preopened, inherited or allowed
        store.set_limits(memory_size=limits.memory_bytes)
        store.set_fuel(limits.fuel)
        return store
