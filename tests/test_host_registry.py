"""What the gateways share through the directory (cluster/actors/host_registry.py): hosts and their
picks, the table of running inferlets, programs. The logic alone, no Ray."""
import hashlib
import threading
import time

import pytest

import cluster.actors.host_registry as registry
from cluster.actors.directory_actor import Directory
from cluster.actors.host_registry import HostRegistry, token_digest
from cluster.errors import (HostBusy, InvalidDirectoryRequest, NoLiveHost, ProgramTooLarge, UnknownInferlet,
                            UnknownProgram)

PROGRAM = "p" * 64


def hosts(*names: str, max_running: int = 2) -> HostRegistry:
    r = HostRegistry()
    for name in names:
        assert r.host_alive(name, f"127.0.0.1:{len(name)}", max_running) is False  # new: restore its inferlets
    return r


def test_picks_go_to_the_least_loaded_host_and_count_until_the_inferlet_starts():
    r = hosts("a", "b")
    assert [r.pick_host().host_id for _ in range(4)] == ["a", "b", "a", "b"]  # each pick counted
    with pytest.raises(HostBusy, match=r"every inferlet host is full: 4 inferlets on 2 hosts of 2, 2 each"):
        r.pick_host()
    r.instance_started("i1", "a", PROGRAM, token_digest("t"))  # settles one of a's picks
    r.unpick_host("b")  # a launch picked for b did not start there
    loads = {h.host_id: (h.running, h.picked) for h in r.hosts()}
    assert loads == {"a": (1, 1), "b": (0, 1)}
    assert r.pick_host().host_id == "b"


def test_concurrent_picks_from_several_gateways_never_overfill_a_host():
    r = hosts("a", "b", "c", max_running=5)
    got, lock = [], threading.Lock()

    def gateway():
        for _ in range(10):
            try:
                pick = r.pick_host()
            except HostBusy:
                continue
            with lock:
                got.append(pick.host_id)

    threads = [threading.Thread(target=gateway) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(got) == ["a"] * 5 + ["b"] * 5 + ["c"] * 5


def test_draining_silent_and_excluded_hosts_get_nothing(monkeypatch):
    r = hosts("a", "b")
    r.set_host_draining("a")
    assert r.pick_host().host_id == "b"
    with pytest.raises(NoLiveHost, match="no inferlet host is up besides b"):
        hosts().pick_host(("b",))
    with pytest.raises(NoLiveHost, match="none of the 1 inferlet hosts takes inferlets now"):
        r.pick_host(exclude=("b",))
    monkeypatch.setattr(registry, "HOST_STALE_S", 0.05)
    time.sleep(0.1)
    r.host_alive("a", "127.0.0.1:1", 2)
    r.set_host_draining("a", False)
    assert r.pick_host().host_id == "a"  # b is silent: skipped
    with pytest.raises(InvalidDirectoryRequest):
        r.set_host_draining("nobody")


def test_a_host_silent_too_long_is_dropped_with_its_inferlets_and_the_directory_ends_what_they_owned(monkeypatch):
    d = Directory(page_size=16)
    d.register("worker-0", 32)
    d.host_alive("h", "127.0.0.1:1", 4)
    d.place_owner("inferlet-h-1", "h")
    d.instance_started("inferlet-h-1", "h", PROGRAM, token_digest("t"))
    monkeypatch.setattr(registry, "HOST_DEAD_S", 0.05)
    time.sleep(0.1)
    assert d.hosts() == []
    assert d.instance("inferlet-h-1").ended and d.instances() == []
    assert [w.running for w in d.workers()] == [0]  # its owner ended in the KV directory too
    d.check_invariants()


def test_the_instance_table_keeps_ended_records_a_while_and_ignores_a_start_recorded_after_the_end(monkeypatch):
    r = hosts("h")
    r.instance_started("i1", "h", PROGRAM, token_digest("secret"))
    record = r.instance("i1")
    assert (record.host_id, record.target, record.program_id) == ("h", "127.0.0.1:1", PROGRAM)
    assert record.token_digest == hashlib.sha256(b"secret").hexdigest() and not record.ended
    r.instance_ended("i1")
    assert r.instance("i1").ended and r.instances() == []
    r.instance_ended("i2")  # its end recorded before its start (a very short inferlet)
    r.instance_started("i2", "h", PROGRAM, token_digest("t"))
    assert r.instances() == []
    with pytest.raises(UnknownInferlet, match="no inferlet 'i3' runs in this cluster"):
        r.instance("i3")
    with pytest.raises(InvalidDirectoryRequest, match="not registered"):
        r.instance_started("i4", "nobody", PROGRAM, "x")
    monkeypatch.setattr(registry, "ENDED_KEPT_S", 0.0)
    r.hosts()  # reaps
    with pytest.raises(UnknownInferlet):
        r.instance("i1")


def test_a_host_restores_its_inferlets_when_the_directory_forgot_them():
    r = hosts("h")
    assert r.host_alive("h", "127.0.0.1:1", 2) is True  # known: nothing to restore
    fresh = HostRegistry()  # the directory restarted
    assert fresh.host_alive("h", "127.0.0.1:1", 2) is False
    fresh.instances_restore("h", [("i1", PROGRAM, token_digest("t"), 123.0)])
    assert [(x.instance_id, x.started) for x in fresh.instances()] == [("i1", 123.0)]


def test_programs_are_checked_against_their_id_and_the_least_recently_used_go_first(monkeypatch):
    r = HostRegistry()
    blobs = [bytes([i]) * 100 for i in range(3)]
    ids = [hashlib.sha256(b).hexdigest() for b in blobs]
    with pytest.raises(InvalidDirectoryRequest, match="another digest"):
        r.put_program(ids[0], blobs[1])
    monkeypatch.setattr(registry, "MAX_PROGRAM_BYTES", 250)
    r.put_program(ids[0], blobs[0])
    r.put_program(ids[1], blobs[1])
    assert r.program(ids[0]) == blobs[0]  # used: now the most recent
    r.put_program(ids[2], blobs[2])  # 300 bytes: the least recently used goes
    assert [r.has_program(i) for i in ids] == [True, False, True]
    with pytest.raises(UnknownProgram, match="upload it first"):
        r.program(ids[1])
    with pytest.raises(ProgramTooLarge):
        r.put_program(hashlib.sha256(b"x" * 300).hexdigest(), b"x" * 300)


def test_ids_and_addresses_are_size_checked():
    r = HostRegistry()
    with pytest.raises(InvalidDirectoryRequest, match="at most 256 bytes"):
        r.host_alive("h" * 300, "127.0.0.1:1", 2)
    with pytest.raises(InvalidDirectoryRequest, match="max_running 0"):
        r.host_alive("h", "127.0.0.1:1", 0)


def test_running_counts_follow_starts_ends_restores_and_dropped_hosts():
    r = hosts("a", "b", max_running=10)
    for i in range(3):
        r.instance_started(f"i{i}", "a", PROGRAM, "d")
    r.instances_restore("b", [("i0", PROGRAM, "d", 1.0)])  # recorded again, on b: counted once
    r.instance_ended("i1")
    assert {h.host_id: h.running for h in r.hosts()} == {"a": 1, "b": 1}
    assert r.drop_host("a") == ["i2"]
    assert {h.host_id: h.running for h in r.hosts()} == {"b": 1}
