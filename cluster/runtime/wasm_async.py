"""Many component instances on one thread, through wasmtime's async C API.

wasmtime-py 50 exposes only synchronous component calls. Its private `_ffi` module binds the
async ones, and this module is the one place that touches them (pinned: wasmtime==50.0.1):

- `add_async_func(linker_instance, name, start)`: an import whose host side may wait. When
  the guest calls it, `start(*args)` runs and returns a Pending; the guest stays suspended
  until that Pending is done, while the thread polls other instances.
- `add_sync_func(linker_instance, name, fn)`: an import answering at once, `fn(*args)` its value:
  a plain synchronous host function (its value types are read once per import, not on every call).
- A host function that breaks its contract (raises, or answers a value that does not fit the
  import's type) ends the guest's call with an error naming the import, rather than aborting
  the process from inside a ctypes callback or leaving the guest suspended.
- `instantiate(linker, store, component)`: async instantiation (required once a linker has
  async imports), polled to completion.
- `AsyncCall(store, func, args)`: an export call in flight. `poll()` runs the guest until it
  waits on an import, yields (fuel) or finishes; `result()` converts its return value or
  raises the trap; `cancel()` drops it (the store must not be used afterwards).
- `yield_every_fuel(store, interval)`: a guest that computes without calling the host gives
  the thread back each `interval` units of fuel instead of holding it.

Value conversion reuses wasmtime-py's component types (see cluster/runtime/wasm_lists.py for the
bulk list conversion it adds).
"""
from __future__ import annotations

import ctypes
import itertools
import threading
import time
from ctypes import POINTER, byref
from typing import Any, Callable

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime.component import Component, Instance, Linker, LinkerInstance
from wasmtime.component._func import Func
from wasmtime.component._types import FuncType

from cluster import metrics
from cluster.runtime import wasm_lists, wasm_type_cache
from cluster.pending import Pending

wasm_lists.install()
wasm_type_cache.install()


class CallStats:
    """Time the polling thread spends inside host imports (for benchmarks; read, then reset)."""

    def __init__(self):
        self.calls = 0
        self.seconds = 0.0

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0


import_stats = CallStats()


class _Import:
    """One import: its Python function (a sync import's value, an async import's start returning a
    Pending) and, after its first call, its parameter and result types."""

    def __init__(self, name: str, fn: Callable):
        self.name = name
        self.fn = fn
        self.calls = metrics.HANDLER_CALLS.labels(name)
        self.param_types = None
        self.result_type = None

    def arguments(self, fty_raw, args, nargs: int) -> list:
        """The call's arguments as Python values (the types are read on the first call only)."""
        if self.param_types is None:
            fty = FuncType._from_ptr(fty_raw, owner=self)  # borrowed: wasmtime owns it
            self.param_types = [ty for _, ty in fty.params]
            self.result_type = fty.result
        return [ty.convert_from_c(args[i]) for i, ty in enumerate(self.param_types[:nargs])]


class _InFlight:
    """An async import call waiting on its Pending; the continuation writes its result."""

    __slots__ = ("imp", "pending", "results", "context")

    def __init__(self, imp: _Import, pending: Pending, results, context: int):
        self.imp, self.pending, self.results, self.context = imp, pending, results, context


_lock = threading.Lock()
_imports: dict[int, _Import] = {}  # env id -> import (ids stay valid until the linker drops them)
_in_flight: dict[int, _InFlight] = {}  # env id of a continuation -> its call
_failed: dict[int, str] = {}  # store context address -> why an async import could not answer its guest
_ids = itertools.count(1)


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _forget_import(env):
    with _lock:
        _imports.pop(env or 0, None)


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _forget_in_flight(env):
    with _lock:
        _in_flight.pop(env or 0, None)


@ffi.wasmtime_func_async_continuation_callback_t
def _continue(env):
    call = _in_flight.get(env or 0)
    if call is None or not call.pending.done:
        return False
    t0 = time.perf_counter()
    try:
        if call.imp.result_type is not None:
            if call.pending.error is not None:  # the start function's contract is to complete with values
                raise call.pending.error
            call.imp.result_type.convert_to_c(None, call.pending.value, call.results)
    except Exception as e:  # a host bug. A continuation cannot fail the call: its AsyncCall does, at its next poll
        _failed[call.context] = f"import {call.imp.name} failed: {e!r}"
        return False
    finally:
        import_stats.seconds += time.perf_counter() - t0
    return True


@ffi.wasmtime_component_func_async_callback_t
def _start(env, context, fty_raw, args, nargs, results, nresults, error_ret, continuation):
    t0 = time.perf_counter()
    imp = _imports[env or 0]
    try:
        pending = imp.fn(*imp.arguments(fty_raw, args, nargs))
    except Exception as e:  # a host bug (start's contract is to return a Pending): trap the guest
        error_ret[0] = _trap(imp, e)
        return
    call_id = next(_ids)
    with _lock:
        _in_flight[call_id] = _InFlight(imp, pending, results, ctypes.cast(context, ctypes.c_void_p).value)
    continuation[0].callback = _continue
    continuation[0].env = call_id
    continuation[0].finalizer = _forget_in_flight
    import_stats.calls += 1
    imp.calls.inc()
    import_stats.seconds += time.perf_counter() - t0


def _trap(imp: _Import, error: Exception):
    """The error that ends the guest's call when a host function breaks its contract. An exception
    escaping a ctypes callback would abort the whole process instead."""
    return ffi.wasmtime_error_new(ctypes.create_string_buffer(f"import {imp.name} failed: {error!r}".encode()))


@ffi.wasmtime_component_func_callback_t
def _call_sync(env, context, fty_raw, args, nargs, results, nresults):
    t0 = time.perf_counter()
    imp = _imports[env or 0]
    try:
        value = imp.fn(*imp.arguments(fty_raw, args, nargs))
        if imp.result_type is not None:
            imp.result_type.convert_to_c(None, value, results)
    except Exception as e:  # a host bug (fn's contract is to return the import's value): trap the guest
        return ctypes.cast(_trap(imp, e), ctypes.c_void_p).value
    finally:
        import_stats.calls += 1
        imp.calls.inc()
        import_stats.seconds += time.perf_counter() - t0
    return 0


def add_sync_func(linker_instance: LinkerInstance, name: str, fn: Callable[..., Any]) -> None:
    """Define import `name` answering at once: fn(*args) -> its value. A plain (synchronous) host
    function: no continuation, no Pending. Unlike wasmtime-py's own add_func, the import's types
    are read once, not on every call."""
    _define(ffi.wasmtime_component_linker_instance_add_func, linker_instance, name, fn, _call_sync)


def add_async_func(linker_instance: LinkerInstance, name: str, start: Callable[..., Pending]) -> None:
    """Define import `name`: start(*args) -> Pending whose value is the import's return value.

    start runs on the polling thread and must not block; it must also not raise (return a
    Pending holding the import's error value instead): an exception here would trap the guest.
    """
    _define(ffi.wasmtime_component_linker_instance_add_func_async, linker_instance, name, start, _start)


def _define(add, linker_instance: LinkerInstance, name: str, fn: Callable, callback) -> None:
    env = next(_ids)
    with _lock:
        _imports[env] = _Import(name, fn)
    encoded = name.encode()
    error = add(linker_instance.ptr(), ctypes.create_string_buffer(encoded), len(encoded), callback, env, _forget_import)
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)


def _drive(future) -> None:
    try:
        while not ffi.wasmtime_call_future_poll(future):
            pass
    finally:
        ffi.wasmtime_call_future_delete(future)


def instantiate(linker: Linker, store: wasmtime.Store, component: Component) -> Instance:
    """Instantiate with the async API (needed once async imports are defined), polled to the end."""
    raw = ffi.wasmtime_component_instance_t()
    error = POINTER(ffi.wasmtime_error_t)()
    _drive(ffi.wasmtime_component_linker_instantiate_async(linker.ptr(), store._context(), component.ptr(),
                                                           byref(raw), byref(error)))
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)
    return Instance._from_raw(raw)


def yield_every_fuel(store: wasmtime.Store, interval: int) -> None:
    """A running guest gives its thread back each time it has used `interval` more fuel."""
    error = ffi.wasmtime_context_fuel_async_yield_interval(store._context(), interval)
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)


class AsyncCall:
    """One call of a component export, advanced by poll() on the thread that owns its store."""

    def __init__(self, store: wasmtime.Store, func: Func, *args: Any):
        fty = func.type(store)
        params = [ty for _, ty in fty.params]
        if len(params) != len(args):
            raise TypeError(f"the export takes {len(params)} arguments, got {len(args)}")
        self._result_type = fty.result
        self._args = (ffi.wasmtime_component_val_t * max(1, len(args)))()
        for i, (ty, value) in enumerate(zip(params, args)):
            ty.convert_to_c(store, value, ctypes.pointer(self._args[i]))
        self._nargs = len(args)
        self._result = ffi.wasmtime_component_val_t()
        self._error = POINTER(ffi.wasmtime_error_t)()
        self._func = func  # keep the raw func struct alive while the future refers to it
        self._context = ctypes.cast(store._context(), ctypes.c_void_p).value  # how _continue names this store
        self._future = ffi.wasmtime_component_func_call_async(
            byref(func._func), store._context(), self._args, len(args), byref(self._result),
            1 if self._result_type is not None else 0, byref(self._error))
        self.finished = False

    def poll(self) -> bool:
        """Run the guest until it waits on the host, yields, or ends. True once it has ended."""
        if self.finished:
            return True
        if not ffi.wasmtime_call_future_poll(self._future):
            failure = _failed.pop(self._context, None) if _failed else None
            if failure is None:
                return False
            self._error = ffi.wasmtime_error_new(ctypes.create_string_buffer(failure.encode()))  # result() raises it
        self._close()
        self.finished = True
        return True

    def result(self) -> Any:
        """The export's return value; raises wasmtime.WasmtimeError if the guest trapped."""
        if not self.finished:
            raise RuntimeError("the call has not finished")
        if self._error:
            error, self._error = wasmtime.WasmtimeError._from_ptr(self._error), None
            raise error
        if self._result_type is None:
            return None
        return self._result_type.convert_from_c(self._result)

    def cancel(self) -> None:
        """Drop the call mid-flight; its store is in an unknown state and must be discarded."""
        if not self.finished:
            self._close()
            self.finished = True

    def _close(self) -> None:
        _failed.pop(self._context, None)  # a later store at the same address must not inherit it
        ffi.wasmtime_call_future_delete(self._future)
        for i in range(self._nargs):
            ffi.wasmtime_component_val_delete(byref(self._args[i]))
        self._nargs = 0
