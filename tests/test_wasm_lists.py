"""The bulk list converters of cluster/runtime/wasm_lists.py against stock wasmtime-py.

The list types come from real components written in WAT text (no guest build): one whose import
takes list<u32>, list<f32>, list<u8>, list<bool> and list<string>, and one that echoes each scalar
list through a host import, so values cross the component boundary in both directions for real.
"""
import contextlib
import ctypes
import math
import struct
import time

import pytest
import wasmtime
from wasmtime import _ffi as ffi
from wasmtime.component import Component, Linker
from wasmtime.component import _types as T

from cluster.runtime import wasm_lists

SCALARS = ("u32", "f32", "u8", "bool")
F32_MAX = struct.unpack("<f", struct.pack("<I", 0x7F7FFFFF))[0]
F32_TINY = struct.unpack("<f", struct.pack("<I", 1))[0]  # the smallest subnormal
F32_MIN_NORMAL = struct.unpack("<f", struct.pack("<I", 0x00800000))[0]

TYPES_WAT = """(component
  (import "f" (func (param "u32" (list u32)) (param "f32" (list f32)) (param "u8" (list u8))
                    (param "bool" (list bool)) (param "string" (list string)))))"""


def echo_wat() -> str:
    """A component exporting echo-<t>: (list<t>) -> list<t> for each scalar t, implemented by calling
    the host import host-<t> with the list and returning what the host returned."""
    imports = "".join(f'(import "host-{t}" (func $h{t} (param "a" (list {t})) (result (list {t}))))\n'
                      for t in SCALARS)
    memory = '(memory (core memory $mem "mem")) (realloc (core func $mem "realloc"))'
    echoes = "".join(f"""
  (core func $low{t} (canon lower (func $h{t}) {memory}))
  (core instance $main{t} (instantiate $Main (with "host" (instance (export "f" (func $low{t}))))))
  (func (export "echo-{t}") (param "a" (list {t})) (result (list {t}))
    (canon lift (core func $main{t} "g") {memory}))""" for t in SCALARS)
    return f"""(component
  {imports}
  (core module $Mem
    (memory (export "mem") 1)
    (global $next (mut i32) (i32.const 64))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $r i32) (local $end i32)
      ;; a bump allocator, 8-aligned, growing memory as needed; never frees
      (local.set $r (i32.and (i32.add (global.get $next) (i32.const 7)) (i32.const -8)))
      (local.set $end (i32.add (local.get $r) (local.get 3)))
      (if (i32.gt_u (local.get $end) (i32.mul (memory.size) (i32.const 65536)))
        (then (drop (memory.grow (i32.add (i32.shr_u (local.get 3) (i32.const 16)) (i32.const 1))))))
      (global.set $next (local.get $end))
      (local.get $r)))
  (core instance $mem (instantiate $Mem))
  (core module $Main
    (import "host" "f" (func $f (param i32 i32 i32)))
    (func (export "g") (param i32 i32) (result i32)
      ;; (ptr, len) of the argument in; the host's list lands at offset 8 as (ptr, len)
      (call $f (local.get 0) (local.get 1) (i32.const 8))
      (i32.const 8)))
  {echoes}
)"""


@pytest.fixture(scope="module")
def engine():
    return wasmtime.Engine()


@pytest.fixture(scope="module")
def list_types(engine) -> dict[str, T.ListType]:
    func = Component(engine, TYPES_WAT).type.imports(engine)["f"].ty
    return dict(func.params)


@pytest.fixture
def store(engine):
    return wasmtime.Store(engine)


@pytest.fixture(autouse=True)
def bulk():
    """Every test starts with the bulk converters installed and leaves the patch as it found it."""
    was_installed = T.ListType.convert_to_c is wasm_lists._to_c
    wasm_lists.install()
    try:
        yield
    finally:
        (wasm_lists.install if was_installed else wasm_lists.uninstall)()


@contextlib.contextmanager
def stock():
    """Stock wasmtime-py converters for the duration of a block."""
    wasm_lists.uninstall()
    try:
        yield
    finally:
        wasm_lists.install()


def to_c(list_type, store, value):
    val = ffi.wasmtime_component_val_t()
    list_type.convert_to_c(store, value, ctypes.pointer(val))
    return val


def round_trip(list_type, store, value, write_stock=False, read_stock=False):
    """convert_to_c then convert_from_c (which frees the C list), each by stock or bulk code."""
    with stock() if write_stock else contextlib.nullcontext():
        val = to_c(list_type, store, value)
    with stock() if read_stock else contextlib.nullcontext():
        return list_type.convert_from_c(val)


def f32_bits(values):
    return [struct.pack("<f", v) for v in values]


VALUES = {
    "u32": [[], [0], [0, 1, 2**31, 2**32 - 1], [(i * 2654435761) % 2**32 for i in range(5000)]],
    "f32": [[], [0.0], [0.0, -0.0, 1.5, -2.25, F32_MAX, -F32_MAX, F32_TINY, F32_MIN_NORMAL, math.inf, -math.inf],
            [i * 0.25 - 600.0 for i in range(5000)]],
    "u8": [b"", b"\x00", bytes(range(256)), bytes(i * 7 % 256 for i in range(5000))],
    "bool": [[], [True], [True, False, False, True], [i % 3 == 0 for i in range(5000)]],
}
ROUND_TRIPS = [(t, v) for t, values in VALUES.items() for v in values]
ROUND_TRIP_IDS = [f"{t}-{len(v)}" for t, v in ROUND_TRIPS]


def test_install_is_idempotent_and_uninstall_restores_stock():
    wasm_lists.install()
    wasm_lists.install()
    assert T.ListType.convert_to_c is wasm_lists._to_c and T.ListType.convert_from_c is wasm_lists._from_c
    with stock():
        assert T.ListType.convert_to_c.__module__ == T.ListType.convert_from_c.__module__ == T.__name__
    assert T.ListType.convert_to_c is wasm_lists._to_c


@pytest.mark.parametrize("kind, value", ROUND_TRIPS, ids=ROUND_TRIP_IDS)
def test_round_trip_equals_the_value_and_stock(list_types, store, kind, value):
    lt = list_types[kind]
    got = round_trip(lt, store, value)
    assert type(got) is type(value)
    assert got == value
    if kind == "f32":
        assert f32_bits(got) == f32_bits(value)  # -0.0 keeps its sign
    elif kind == "bool":
        assert all(type(v) is bool for v in got)
    elif kind == "u32":
        assert all(type(v) is int for v in got)
    # the C values are laid out exactly as stock writes and reads them: mix the two either way
    assert round_trip(lt, store, value, write_stock=True) == value
    assert round_trip(lt, store, value, read_stock=True) == value
    assert round_trip(lt, store, value, write_stock=True, read_stock=True) == value


def test_f32_nan_and_rounding_match_stock(list_types, store):
    lt = list_types["f32"]
    value = [math.nan, 0.1, 1e-45, 1 / 3]  # not all representable: both round to the nearest f32
    got = round_trip(lt, store, value)
    want = round_trip(lt, store, value, write_stock=True, read_stock=True)
    assert math.isnan(got[0]) and math.isnan(want[0])
    assert got[1:] == want[1:] == [struct.unpack("<f", struct.pack("<f", v))[0] for v in value[1:]]


def test_other_element_types_keep_the_stock_converters(list_types, store):
    assert round_trip(list_types["string"], store, ["a", "", "héllo"]) == ["a", "", "héllo"]
    with pytest.raises(TypeError):
        to_c(list_types["string"], store, ["a", 1])


WRONG_TYPES = [
    ("u32", "0123"), ("u32", (1, 2)), ("u32", None), ("u32", b"\x01"), ("u32", [1.0]), ("u32", [1, "2"]),
    ("u32", [1, None]),
    ("f32", "1.0"), ("f32", [1]), ("f32", [1.0, None]), ("f32", (1.0,)),
    ("u8", [1, 2]), ("u8", "ab"), ("u8", bytearray(b"ab")), ("u8", None),
    ("bool", "true"), ("bool", [1]), ("bool", [0]), ("bool", [True, None]), ("bool", b"\x01"),
]


@pytest.mark.parametrize("kind, value", WRONG_TYPES, ids=[f"{t}-{v!r}" for t, v in WRONG_TYPES])
def test_wrong_types_raise_type_error_like_stock(list_types, store, kind, value):
    with pytest.raises(TypeError):
        to_c(list_types[kind], store, value)
    with stock(), pytest.raises(TypeError):
        to_c(list_types[kind], store, value)


@pytest.mark.parametrize("value", [[-1], [2**32], [0, 2**40], [5, -2**31]])
def test_out_of_range_u32_raises_overflow_error(list_types, store, value):
    with pytest.raises(OverflowError):
        to_c(list_types["u32"], store, value)
    # stock wasmtime-py 50 stores through a ctypes field and silently wraps instead; the bulk
    # converter refuses, so a guest is never handed a truncated token id
    with stock():
        assert round_trip(list_types["u32"], store, value) == [v % 2**32 for v in value]


def test_bool_in_a_u32_list_is_refused_though_stock_takes_it(list_types, store):
    with pytest.raises(TypeError):
        to_c(list_types["u32"], store, [1, True])
    with stock():
        assert round_trip(list_types["u32"], store, [1, True]) == [1, 1]


@pytest.fixture(scope="module")
def echo(engine):
    """(store, {kind: echo-<kind> export}, {kind: lists the host import received})."""
    store = wasmtime.Store(engine)
    linker = Linker(engine)
    received = {t: [] for t in SCALARS}
    for t in SCALARS:
        def host(_store, value, t=t):
            received[t].append(value)
            return value
        linker.root().add_func(f"host-{t}", host)
    instance = linker.instantiate(store, Component(engine, echo_wat()))
    return store, {t: instance.get_func(store, f"echo-{t}") for t in SCALARS}, received


@pytest.mark.parametrize("kind", SCALARS)
def test_lists_cross_a_real_component_boundary_both_ways(echo, kind):
    """Host -> guest export (to_c), guest -> host import (from_c), the import's result back into the
    guest (to_c) and the export's result out (from_c), with the bulk converters and with stock."""
    store, funcs, received = echo
    for use_stock in (False, True):
        for value in VALUES[kind]:
            received[kind].clear()
            with stock() if use_stock else contextlib.nullcontext():
                got = funcs[kind](store, value)
                funcs[kind].post_return(store)
            assert received[kind] == [value]
            assert got == value and type(got) is type(value)


def test_time_1024_u32_both_ways_stock_vs_bulk(list_types, store, capsys):
    """Measured, not asserted: microseconds per conversion of 1024 token ids."""
    lt, value, n = list_types["u32"], list(range(50_000, 51_024)), 200

    def measure():
        to_s = from_s = 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            val = to_c(lt, store, value)
            t1 = time.perf_counter()
            got = lt.convert_from_c(val)
            t2 = time.perf_counter()
            assert got == value
            to_s += t1 - t0
            from_s += t2 - t1
        return to_s / n * 1e6, from_s / n * 1e6

    with stock():
        stock_us = measure()
    bulk_us = measure()
    with capsys.disabled():
        print(f"\n1024 x u32: to_c stock {stock_us[0]:.0f} us, bulk {bulk_us[0]:.0f} us "
              f"({stock_us[0] / bulk_us[0]:.1f}x); from_c stock {stock_us[1]:.0f} us, bulk {bulk_us[1]:.0f} us "
              f"({stock_us[1] / bulk_us[1]:.1f}x)")


def test_a_list_past_the_cap_is_refused_before_python_copies_it(list_types, store, monkeypatch):
    monkeypatch.setattr(wasm_lists, "MAX_ELEMENTS", 1000)
    with pytest.raises(ValueError, match="1001 elements"):
        round_trip(list_types["u32"], store, list(range(1001)))
    assert round_trip(list_types["u32"], store, list(range(1000))) == list(range(1000))
