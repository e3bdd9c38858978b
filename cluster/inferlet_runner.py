"""Runs inferlets: each in its own wasmtime store and thread, beside the others.

A handler call blocks only its own inferlet's thread (wasm execution releases the GIL), so
many inferlets run at once. However an inferlet ends (returns, raises, traps, hits a limit),
everything it held is released and the outcome names the cause.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import wasmtime
from wasmtime import component as wc

from cluster.errors import InvalidComponentError
from cluster.host_api import InferletSession
from cluster.inferlet_build import build
from cluster.sandbox import Limits, Sandbox
from workers.executor import Executor

# wasmtime's trap messages (component calls report traps as WasmtimeError) -> what to tell the client
_TRAP_CAUSES = {
    "all fuel consumed": "it used up its CPU limit (fuel)",
    "wasm trap: interrupt": "it ran past its wall-clock limit",
    "call stack exhausted": "its stack overflowed",
}


def _trap_cause(error: Exception) -> str:
    text = str(error)
    for needle, cause in _TRAP_CAUSES.items():
        if needle in text:
            return cause
    last = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"it trapped ({last[-1] if last else type(error).__name__})"


@dataclass
class Outcome:
    instance_id: str
    messages: list[str] = field(default_factory=list)  # what it sent to its client, in order
    error: str | None = None  # None on success; else the cause, with the guest's traceback when it has one

    @property
    def ok(self) -> bool:
        return self.error is None


class RunningInferlet:
    def __init__(self, instance_id: str, thread: threading.Thread, outcome: Outcome):
        self.instance_id = instance_id
        self._thread = thread
        self.outcome = outcome

    def wait(self, timeout: float | None = None) -> Outcome:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"inferlet {self.instance_id} still running after {timeout} s")
        return self.outcome


class InferletRunner:
    """Launches inferlets on one executor. `program` is a .py source (built on demand) or a .wasm."""

    def __init__(self, executor: Executor, limits: Limits = Limits(), sandbox: Sandbox | None = None):
        self.executor = executor
        self.limits = limits
        self.sandbox = sandbox or Sandbox()
        self._executor_lock = threading.Lock()
        self._ids = itertools.count(1)

    def component(self, program: str | Path) -> wc.Component:
        path = Path(program)
        if path.suffix == ".py":
            path = build(path)
        elif path.suffix != ".wasm":
            raise InvalidComponentError(f"{program}: expected a .py source or a .wasm component")
        return self.sandbox.load(path)

    def launch(self, program: str | Path, arguments: list[str] = (), limits: Limits | None = None,
               on_message: Callable[[str], None] | None = None) -> RunningInferlet:
        component = self.component(program)
        instance_id = f"inferlet-{next(self._ids)}"
        outcome = Outcome(instance_id)

        def deliver(message: str) -> None:
            outcome.messages.append(message)
            if on_message:
                on_message(message)

        session = InferletSession(instance_id, list(arguments), self.executor, self._executor_lock,
                                  limits or self.limits, deliver)
        thread = threading.Thread(target=self._run, args=(component, session, limits or self.limits, outcome),
                                  name=instance_id, daemon=True)
        thread.start()
        return RunningInferlet(instance_id, thread, outcome)

    def run(self, program: str | Path, arguments: list[str] = (), **kwargs) -> Outcome:
        return self.launch(program, arguments, **kwargs).wait()

    def _run(self, component: wc.Component, session: InferletSession, limits: Limits, outcome: Outcome) -> None:
        try:
            store = self.sandbox.new_store(limits)
            linker = self.sandbox.new_linker()
            session.define(linker)
            instance = linker.instantiate(store, component)
            run = instance.get_func(store, "run")
            if run is None:
                outcome.error = "the component exports no `run` function: is it built for the inferlet world?"
                return
            result = run(store)
            if isinstance(result, str):
                outcome.error = result
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            outcome.error = f"inferlet {session.instance_id} stopped: {_trap_cause(e)}"
        finally:
            session.release()
