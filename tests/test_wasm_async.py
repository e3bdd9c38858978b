"""wasm_async's import paths on a real component written in WAT (no guest build): a sync import
answers inside the guest's call, an async one suspends the guest until its Pending is done, and a
host function that breaks its contract traps the guest with a message naming the import."""
import pytest
import wasmtime
from wasmtime.component import Component

from cluster.runtime import wasm_async
from cluster.pending import Pending
from cluster.runtime.sandbox import Limits, Sandbox

# run() = now() * 1000 + later(): `now` is defined as a sync import, `later` as an async one
WAT = """(component
  (import "now" (func $now (result u32)))
  (import "later" (func $later (result u32)))
  (core func $now_lowered (canon lower (func $now)))
  (core func $later_lowered (canon lower (func $later)))
  (core module $m
    (import "host" "now" (func $now (result i32)))
    (import "host" "later" (func $later (result i32)))
    (func (export "run") (result i32)
      (i32.add (i32.mul (call $now) (i32.const 1000)) (call $later))))
  (core instance $i (instantiate $m (with "host" (instance (export "now" (func $now_lowered))
                                                           (export "later" (func $later_lowered))))))
  (func (export "run") (result u32) (canon lift (core func $i "run"))))"""


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox()


def start(sandbox, now, later):
    store = sandbox.new_store(Limits())
    linker = sandbox.new_linker()
    with linker.root() as root:
        wasm_async.add_sync_func(root, "now", now)
        wasm_async.add_async_func(root, "later", later)
    instance = wasm_async.instantiate(linker, store, Component(sandbox.engine, WAT))
    call = wasm_async.AsyncCall(store, instance.get_func(store, "run"))
    call.store = store  # the call does not keep its store alive (the scheduler's task does)
    return call


def test_a_sync_import_answers_within_the_call_and_an_async_one_waits_for_its_pending(sandbox):
    later = Pending()
    calls = []
    call = start(sandbox, lambda: calls.append("now") or 7, lambda: calls.append("later") or later)
    before = wasm_async.import_stats.calls
    assert call.poll() is False  # suspended in `later`: `now` has answered already
    assert calls == ["now", "later"]
    assert call.poll() is False  # still waiting: polling again does not finish it
    later.complete(5)
    assert call.poll() is True
    assert call.result() == 7005
    assert wasm_async.import_stats.calls - before == 2


def test_a_sync_import_that_raises_traps_the_guest_naming_the_import(sandbox):
    def broken():
        raise KeyError("no such thing")

    call = start(sandbox, broken, lambda: Pending.ready(1))
    assert call.poll() is True
    with pytest.raises(wasmtime.WasmtimeError, match=r"import now failed: KeyError\('no such thing'\)"):
        call.result()


def test_a_sync_import_returning_the_wrong_type_traps_instead_of_answering(sandbox):
    call = start(sandbox, lambda: "seven", lambda: Pending.ready(1))
    assert call.poll() is True
    with pytest.raises(wasmtime.WasmtimeError, match="import now failed"):
        call.result()


def test_an_async_import_whose_start_raises_traps_the_guest_naming_the_import(sandbox):
    def broken():
        raise RuntimeError("start broke")

    call = start(sandbox, lambda: 1, broken)
    assert call.poll() is True
    with pytest.raises(wasmtime.WasmtimeError, match=r"import later failed: RuntimeError\('start broke'\)"):
        call.result()


@pytest.mark.parametrize("outcome, cause", [
    (lambda: Pending.failed(RuntimeError("broke later")), r"RuntimeError\('broke later'\)"),
    (lambda: Pending.ready("not a u32"), "TypeError"),
])
def test_an_async_import_whose_pending_cannot_answer_ends_the_call_instead_of_suspending_it_forever(
        sandbox, outcome, cause):
    later = Pending()
    call = start(sandbox, lambda: 1, lambda: later)
    assert call.poll() is False
    done = outcome()
    later.fail(done.error) if done.error else later.complete(done.value)
    assert call.poll() is True  # before, the guest stayed suspended and every poll returned False
    with pytest.raises(wasmtime.WasmtimeError, match=f"import later failed: {cause}"):
        call.result()
    healthy = start(sandbox, lambda: 2, lambda: Pending.ready(3))  # the failure stays with its own call
    assert healthy.poll() is True and healthy.result() == 2003
