"""Pending.map and Pending.then: chaining results that arrive later (the forward and HTTP imports'
conversions, and a moved inferlet's calls queued behind its move)."""
import pytest

from cluster.pending import Pending


def test_map_converts_the_value_and_passes_errors_through():
    source = Pending()
    doubled = source.map(lambda v: v * 2)
    assert not doubled.done
    source.complete(21)
    assert doubled.wait(1) == 42
    failed = Pending.failed(ValueError("no")).map(lambda v: v)
    with pytest.raises(ValueError, match="no"):
        failed.wait(1)


def test_a_conversion_that_raises_fails_the_mapped_pending_instead_of_leaving_it_open():
    broken = Pending.ready("x").map(int)
    assert broken.done
    with pytest.raises(ValueError):
        broken.wait(1)


def test_then_starts_the_next_step_when_the_first_is_done():
    gate, steps = Pending(), []

    def step(_):
        steps.append("started")
        return Pending.ready("result")

    chained = gate.then(step)
    assert steps == [] and not chained.done
    gate.complete(None)
    assert steps == ["started"] and chained.wait(1) == "result"
    with pytest.raises(RuntimeError, match="refused"):
        Pending.ready(None).then(lambda _: (_ for _ in ()).throw(RuntimeError("refused"))).wait(1)
    with pytest.raises(KeyError):
        Pending.ready(None).then(lambda _: Pending.failed(KeyError("k"))).wait(1)
    with pytest.raises(TimeoutError):
        Pending.failed(TimeoutError("gate")).then(step).wait(1)
    assert steps == ["started"]  # a failed first step starts nothing
