"""Cache what wasmtime-py's component types ask the C API on every conversion.

A component type object (a record's fields, a variant's cases, a list's element type...)
never changes, but wasmtime-py 50 re-reads it through several FFI calls, building fresh
Python type objects, each time a value is converted: about 0.6 ms for one forward-pass
record. `install()` makes those properties compute once per type object; the host keeps
one set of type objects per import (cluster/runtime/wasm_async.py), so every call after the first
converts in pure Python.

Two conversions also redo per value what depends only on the type, and `install()` replaces
them with versions that keep the same results and errors:
- lowering a variant, option or result: which Python classes each case accepts (the stock
  code rebuilds that set for every case of every value);
- lifting a record: the stock code decodes each field's name from the C value only to
  assert it equals the type's (wasmtime writes fields in the type's order).
"""
from __future__ import annotations

import ctypes
import functools

from wasmtime import _ffi as ffi
from wasmtime.component import _types as T

_PROPERTIES = [(T.ListType, "element"), (T.RecordType, "fields"), (T.TupleType, "elements"),
               (T.VariantType, "cases"), (T.EnumType, "names"), (T.OptionType, "payload"),
               (T.ResultType, "ok"), (T.ResultType, "err"), (T.FlagsType, "names")]
_METHODS = [(T.VariantType, "_cases"), (T.OptionType, "_cases"), (T.ResultType, "_cases"),
            (T.VariantLikeType, "_tagged")]
_installed = False
# the stock conversions install() replaces (tests compare against them)
STOCK_LOWER_VARIANT = T.VariantLikeType._lower
STOCK_RECORD_FROM_C = T.RecordType.convert_from_c


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


def _case_classes(variant) -> list:
    """[(case name, payload type or None, the Python classes its payload may be)], once per type."""
    cases = variant.__dict__.get("_pie_case_classes")
    if cases is None:
        cases = []
        for name, ty in variant._cases():
            classes: set = set()
            if ty is not None:
                ty.add_classes(classes)
            cases.append((name, ty, tuple(classes)))
        variant.__dict__["_pie_case_classes"] = cases
    return cases


def _lower_variant(self, store, val):
    """VariantLikeType._lower: (case name, the payload as a new C value or None)."""
    tagged = self._tagged()
    if tagged and not isinstance(val, T.Variant):
        raise TypeError("expected Variant type")
    for name, ty, classes in _case_classes(self):
        if tagged:
            if name != val.tag:
                continue
        elif ty is None:
            if val is not None:
                continue
        elif not isinstance(val, classes):
            continue
        if ty is None:
            return name, None
        raw = ffi.wasmtime_component_val_t()
        ty.convert_to_c(store, val.payload if tagged else val, ctypes.pointer(raw))
        return name, ffi.wasmtime_component_val_new(ctypes.byref(raw))
    raise ValueError("value not valid for this variant")


def _record_from_c(self, c):
    """RecordType.convert_from_c, reading fields by position."""
    assert c.kind == ffi.WASMTIME_COMPONENT_RECORD.value
    try:
        fields = self.fields
        if c.of.record.size != len(fields):
            raise ValueError(f"a record value has {c.of.record.size} fields; its type has {len(fields)}")
        record = T.Record()
        data = c.of.record.data
        for i, (name, ty) in enumerate(fields):
            raw = data[i].val
            setattr(record, name, ty.convert_from_c(raw))
            raw.kind = ffi.WASMTIME_COMPONENT_BOOL
            raw.of.boolean = False
        return record
    finally:
        ffi.wasmtime_component_valrecord_delete(c.of.record)


def install() -> None:
    """Idempotent."""
    global _installed
    if _installed:
        return
    for cls, name in _PROPERTIES:
        setattr(cls, name, _cached_property(cls.__dict__[name].fget, f"_pie_{name}"))
    for cls, name in _METHODS:
        setattr(cls, name, _cached_method(cls.__dict__[name], f"_pie{name}"))
    T.VariantLikeType._lower = _lower_variant
    T.RecordType.convert_from_c = _record_from_c
    _installed = True
