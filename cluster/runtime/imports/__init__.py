"""The inferlet world's imports, one module per WIT interface, bound to one session.

Each module's `imports(session)` returns {name: Import}; `define` adds them to a linker under
their interface. Sync imports answer at once; async ones return a Pending and suspend the
inferlet until it is done (see cluster/runtime/wasm_async.py).
"""
from __future__ import annotations

from wasmtime import component as wc

from cluster.runtime import wasm_async
from cluster.runtime.imports import forward, grammar, http, kv, messaging, model, runtime
from cluster.runtime.imports._common import Import
from cluster.runtime.session import InferletSession

PACKAGE = "pie:inferlet"
VERSION = "0.1.0"
INTERFACES = {"runtime": runtime, "model": model, "kv": kv, "forward": forward, "grammar": grammar,
              "messaging": messaging, "http": http}

__all__ = ["define", "Import", "INTERFACES"]


def define(linker: wc.Linker, session: InferletSession) -> None:
    with linker.root() as root:
        for interface, module in INTERFACES.items():
            with root.add_instance(f"{PACKAGE}/{interface}@{VERSION}") as inst:
                for name, imp in module.imports(session).items():
                    if imp.is_async:
                        wasm_async.add_async_func(inst, name, imp.fn)
                    else:
                        wasm_async.add_sync_func(inst, name, imp.fn)
