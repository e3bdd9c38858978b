"""The conversions cluster/runtime/wasm_type_cache.py replaces (variant lowering, record lifting) against
stock wasmtime-py: the same C values, the same Python values back, the same errors.

The types come from a real component's import written in WAT (no guest build)."""
import ctypes

import pytest
import wasmtime
from wasmtime import _ffi as ffi
from wasmtime.component import Component, Record, Variant
from wasmtime.component import _types as T

from cluster.runtime import wasm_type_cache

WAT = """(component
  (type $r0 (record (field "a" u32) (field "b" string) (field "c" (list u32)) (field "d" (option u32))))
  (import "r" (type $r (eq $r0)))
  (type $v0 (variant (case "none") (case "num" u32) (case "text" string) (case "pair" (tuple u32 u32))))
  (import "v" (type $v (eq $v0)))
  (type $t0 (variant (case "x" u32) (case "y" u32) (case "z")))
  (import "t" (type $t (eq $t0)))
  (import "f" (func (param "r" $r) (param "v" $v) (param "t" $t) (param "o" (option string))
                    (param "res" (result (list u32) (error string))) (param "l" (list $v)))))"""

# (param, value): untagged variants (cases told apart by Python class), a tagged one (two u32 cases),
# option, result, a list of variants and a record holding an option
GOOD = [("v", None), ("v", 7), ("v", "seven"), ("v", (3, 4)),
        ("t", Variant("x", 1)), ("t", Variant("y", 2)), ("t", Variant("z")),
        ("o", None), ("o", "text"), ("res", [1, 2, 3]), ("res", "refused"), ("res", []),
        ("l", [None, 1, "a", (5, 6)])]
BAD = [("v", 1.5), ("v", [1]), ("t", 1), ("t", Variant("w", 1)), ("res", 2.5), ("o", 3)]


@pytest.fixture(scope="module")
def types():
    wasm_type_cache.install()
    engine = wasmtime.Engine()
    return dict(Component(engine, WAT).type.imports(engine)["f"].ty.params)


@pytest.fixture
def store():
    return wasmtime.Store(wasmtime.Engine())


def lower(ty, store, value, stock=False):
    """value -> C value, with the stock variant lowering or the installed one."""
    saved = T.VariantLikeType._lower
    if stock:
        T.VariantLikeType._lower = wasm_type_cache.STOCK_LOWER_VARIANT
    try:
        val = ffi.wasmtime_component_val_t()
        ty.convert_to_c(store, value, ctypes.pointer(val))
        return val
    finally:
        T.VariantLikeType._lower = saved


def as_python(value):
    return (value.tag, value.payload) if isinstance(value, Variant) else value


@pytest.mark.parametrize("param,value", GOOD, ids=[f"{p}-{v!r}" for p, v in GOOD])
def test_variant_lowering_equals_stock(types, store, param, value):
    ty = types[param]
    ours = ty.convert_from_c(lower(ty, store, value))
    theirs = ty.convert_from_c(lower(ty, store, value, stock=True))
    assert as_python(ours) == as_python(theirs)
    if not isinstance(value, Variant):
        assert ours == value and type(ours) is type(value)


def test_result_lowering_sets_ok_and_err_as_stock(types, store):
    ty = types["res"]
    for value, ok in (([1], True), ("no", False)):
        assert bool(lower(ty, store, value).of.result.is_ok) is ok
        assert bool(lower(ty, store, value, stock=True).of.result.is_ok) is ok


@pytest.mark.parametrize("param,value", BAD, ids=[f"{p}-{v!r}" for p, v in BAD])
def test_values_of_no_case_are_refused_like_stock(types, store, param, value):
    with pytest.raises((TypeError, ValueError)) as ours:
        lower(types[param], store, value)
    with pytest.raises((TypeError, ValueError)) as theirs:
        lower(types[param], store, value, stock=True)
    assert type(ours.value) is type(theirs.value)


def record(a, b, c, d):
    r = Record()
    r.a, r.b, r.c, r.d = a, b, c, d
    return r


@pytest.mark.parametrize("value", [record(1, "x", [1, 2], None), record(2**32 - 1, "", [], 5)])
def test_record_lifting_equals_stock(types, store, value):
    ty = types["r"]
    ours = ty.convert_from_c(lower(ty, store, value))
    theirs = wasm_type_cache.STOCK_RECORD_FROM_C(ty, lower(ty, store, value))
    assert vars(ours) == vars(theirs) == vars(value)
