"""Cache what wasmtime-py's component types ask the C API on every conversion.

A component type object (a record's fields, a variant's cases, a list's element type...)
never changes, but wasmtime-py 50 re-reads it through several FFI calls, building fresh
Python type objects, each time a value is converted: about 0.6 ms for one forward-pass
record. `install()` makes those properties compute once per type object; the host keeps
one set of type objects per import (cluster/wasm_async.py), so every call after the first
converts in pure Python.
"""
from __future__ import annotations

import functools

from wasmtime.component import _types as T

_PROPERTIES = [(T.ListType, "element"), (T.RecordType, "fields"), (T.TupleType, "elements"),
               (T.VariantType, "cases"), (T.EnumType, "names"), (T.OptionType, "payload"),
               (T.ResultType, "ok"), (T.ResultType, "err"), (T.FlagsType, "names")]
_METHODS = [(T.VariantType, "_cases"), (T.OptionType, "_cases"), (T.ResultType, "_cases"),
            (T.VariantLikeType, "_tagged")]
_installed = False


def _cached_property(getter, key):
    @functools.wraps(getter)
    def get(self):
        cache = self.__dict__
        if key not in cache:
            cache[key] = getter(self)
        return cache[key]

    return property(get)


def _cached_method(method, key):
    @functools.wraps(method)
    def call(self):
        cache = self.__dict__
        if key not in cache:
            cache[key] = method(self)
        return cache[key]

    return call


def install() -> None:
    """Idempotent."""
    global _installed
    if _installed:
        return
    for cls, name in _PROPERTIES:
        setattr(cls, name, _cached_property(cls.__dict__[name].fget, f"_pie_{name}"))
    for cls, name in _METHODS:
        setattr(cls, name, _cached_method(cls.__dict__[name], f"_pie{name}"))
    _installed = True
