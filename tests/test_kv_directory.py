"""KvDirectory: workers, owners, named exports, copy leases, the prefix index and placement.
Every test ends by asserting the directory's own invariants (the `d` fixture)."""
import threading

import pytest

from cluster.actors import kv_directory as kvd
from cluster.errors import InferletError
from cluster.actors.directory_records import CopyPlan, DropHolder, EndExport, PrefixMatch, Reclaimed
from cluster.actors.kv_directory import KvDirectory
from cluster.errors import (DirectoryError, DirectoryInvariantBroken, ExportNameTaken, InvalidDirectoryRequest,
                            NoLiveWorker, NotExportOwner, OwnerExists, UnknownExport, UnknownOwner, UnknownWorker,
                            WorkerDead)
from cluster.worker.prefix_hashes import block_hashes, tokens_from_sdk_meta

PS = 4  # page size of these tests: short prompts still span several pages


@pytest.fixture
def d():
    directory = KvDirectory(page_size=PS, cache_key="smollm2")
    yield directory
    directory.check_invariants()


def two_workers(d, pages=64):
    d.register("w0", pages)
    d.register("w1", pages)


def tokens(n, start=0):
    return list(range(start, start + n))


# -- registry-like rules ---------------------------------------------------------------------------

def test_register_export_lookup_unexport(d):
    two_workers(d)
    d.add_owner("a", "h0", "w1")
    info = d.export("a", "sys", [3, 4, 5], meta="m", tokens=tokens(10))
    assert (info.worker_id, info.pages, info.meta, info.owner, info.persistent) == ("w1", (3, 4, 5), "m", "a", False)
    assert info.num_indexed_tokens == 8  # two full pages of 4; the partial third is not indexed
    assert d.lookup("sys") == info
    assert d.list_exports() == ["sys"] and d.list_exports("s") == ["sys"] and d.list_exports("x") == []
    loads = {w.worker_id: w for w in d.workers()}
    assert loads["w1"].num_exports == 1 and loads["w1"].running == 1 and loads["w0"].running == 0
    d.check_invariants()
    assert d.unexport("a", "sys") == EndExport("w1", "sys", (3, 4, 5))
    with pytest.raises(UnknownExport, match="nothing is exported under 'sys'"):
        d.lookup("sys")
    assert d.list_exports() == []
    assert d.prefix_match(tokens(10)).num_tokens == 0  # gone from the prefix index too


def test_name_conflicts_are_global_and_refused_until_unexported(d):
    two_workers(d)
    d.add_owner("a", "h0", "w0")
    d.add_owner("b", "h0", "w1")
    d.export("a", "x", [1])
    with pytest.raises(ExportNameTaken, match=r"'x' is already exported \(on worker 'w0'\); unexport it first"):
        d.export("b", "x", [2])  # another worker: still one namespace
    with pytest.raises(ExportNameTaken):
        d.export("a", "x", [2])
    assert d.lookup("x").pages == (1,)
    d.unexport("a", "x")
    assert d.export("b", "x", [2]).worker_id == "w1"


def test_unexport_rules_mirror_the_page_registry(d):
    two_workers(d)
    d.add_owner("a", "h0", "w0")
    d.add_owner("b", "h0", "w0")
    d.export("a", "private", [1])
    d.export("a", "shared", [2], persistent=True)
    with pytest.raises(NotExportOwner, match="only it can unexport"):
        d.unexport("b", "private")
    assert d.unexport("b", "shared") == EndExport("w0", "shared", (2,))  # persistent: anyone may
    assert d.unexport("a", "private").name == "private"
    with pytest.raises(UnknownExport):
        d.unexport("a", "private")


def test_bad_arguments_are_refused_with_the_cause(d):
    with pytest.raises(InvalidDirectoryRequest, match="at least 1"):
        d.register("w0", 0)
    with pytest.raises(InvalidDirectoryRequest, match="8-token pages"):
        d.register("w0", 16, page_size=8)
    d.register("w0", 16, page_size=PS)
    d.add_owner("a", "h0", "w0")
    with pytest.raises(InvalidDirectoryRequest, match="1 to 256 bytes"):
        d.export("a", "", [1])
    with pytest.raises(InvalidDirectoryRequest, match="1 to 256 bytes"):
        d.export("a", "n" * 257, [1])
    with pytest.raises(InvalidDirectoryRequest, match="page 16 is not a page of worker 'w0'"):
        d.export("a", "n", [15, 16])
    with pytest.raises(InvalidDirectoryRequest, match="9 tokens do not fit in 2 pages"):
        d.export("a", "n", [1, 2], tokens=tokens(9))
    with pytest.raises(InvalidDirectoryRequest, match="reports 17 free and 0 cached pages of 16"):
        d.report_load("w0", 17)
    with pytest.raises(InvalidDirectoryRequest, match="reports 10 free and 7 cached pages of 16"):
        d.report_load("w0", 10, 7)  # more than the pages not free
    with pytest.raises(UnknownOwner, match="'ghost'"):
        d.export("ghost", "n", [1])
    with pytest.raises(UnknownWorker, match="no worker 'w9'"):
        d.add_owner("b", "h0", "w9")
    with pytest.raises(OwnerExists, match="already running"):
        d.add_owner("a", "h0", "w0")
    assert d.list_exports() == []
    # one base for the directory, under the runtime's base (imports answer it as a refusal)
    assert issubclass(ExportNameTaken, DirectoryError) and issubclass(DirectoryError, InferletError)


def test_export_name_limit_matches_the_page_registry():
    from cluster.worker.page_registry import MAX_EXPORT_NAME_BYTES
    assert kvd.MAX_EXPORT_NAME_BYTES == MAX_EXPORT_NAME_BYTES


# -- owners and hosts ending -----------------------------------------------------------------------

def test_owner_end_reclaims_its_non_persistent_exports_only(d):
    two_workers(d)
    d.add_owner("a", "h0", "w0")
    d.add_owner("b", "h0", "w0")
    d.export("a", "mine", [1, 2])
    d.export("a", "kept", [3], persistent=True)
    d.export("b", "theirs", [4])
    reclaimed = d.owner_ended("a")
    assert [o.instance_id for o in reclaimed.owners] == ["a"]
    assert [e.name for e in reclaimed.exports] == ["mine"]
    assert reclaimed.releases == (EndExport("w0", "mine", (1, 2)), DropHolder("w0", "a"))
    assert d.list_exports() == ["kept", "theirs"]
    assert d.lookup("kept").owner == "a"  # the persistent export outlives its owner
    with pytest.raises(UnknownOwner):
        d.owner_ended("a")
    assert {w.worker_id: w.running for w in d.workers()} == {"w0": 1, "w1": 0}
    d.check_invariants()
    d.unexport("b", "kept")  # anyone may end it now


def test_host_death_ends_every_owner_on_that_host(d):
    two_workers(d)
    d.add_owner("a", "h0", "w0")
    d.add_owner("b", "h0", "w1")
    d.add_owner("c", "h1", "w1")
    d.export("a", "a1", [1])
    d.export("b", "b1", [1])
    d.export("b", "b2", [2], persistent=True)
    d.export("c", "c1", [3])
    reclaimed = d.host_died("h0")
    assert sorted(o.instance_id for o in reclaimed.owners) == ["a", "b"]
    assert sorted(e.name for e in reclaimed.exports) == ["a1", "b1"]
    assert set(reclaimed.releases) == {EndExport("w0", "a1", (1,)), EndExport("w1", "b1", (1,)),
                                       DropHolder("w0", "a"), DropHolder("w1", "b")}
    assert d.list_exports() == ["b2", "c1"]
    assert d.owner("c").host_id == "h1"
    assert d.host_died("h0") == Reclaimed()  # nothing left there


# -- workers dying ---------------------------------------------------------------------------------

def test_worker_death_drops_its_exports_and_placement_skips_it(d):
    two_workers(d)
    d.add_owner("a", "h0", "w0")
    d.add_owner("b", "h0", "w1")
    d.export("a", "a-temp", [1], tokens=tokens(4))
    d.export("a", "a-kept", [2, 3], persistent=True, tokens=tokens(8))
    d.export("b", "b1", [5])
    assert d.place(tokens(8)) == "w0"  # it holds the prefix
    reclaimed = d.worker_died("w0")
    assert [o.instance_id for o in reclaimed.owners] == ["a"]
    assert sorted(e.name for e in reclaimed.exports) == ["a-kept", "a-temp"]  # persistent ones too
    assert reclaimed.releases == ()  # the dead worker's pages are gone; nothing to release
    assert d.list_exports() == ["b1"]
    assert d.prefix_match(tokens(8)).num_tokens == 0
    assert d.place(tokens(8)) == "w1"
    assert d.place_owner("c", "h0").worker_id == "w1"
    with pytest.raises(WorkerDead, match="'w0' died"):
        d.add_owner("x", "h0", "w0")
    with pytest.raises(WorkerDead):
        d.report_load("w0", 3)
    assert d.worker_died("w0") == Reclaimed()  # noticed twice: once is enough
    d.check_invariants()
    d.worker_died("w1")
    with pytest.raises(NoLiveWorker, match="no live GPU worker"):
        d.place()
    # Ray restarts it: it registers again with an empty cache and takes inferlets
    assert d.register("w0", 64) == Reclaimed()
    assert d.place(tokens(8)) == "w0"
    assert [(w.worker_id, w.live) for w in d.workers()] == [("w0", True), ("w1", False)]
    d.forget("w1")
    assert [w.worker_id for w in d.workers()] == ["w0"]
    with pytest.raises(UnknownWorker):
        d.worker_died("w1")


def test_registering_a_live_worker_again_drops_its_old_incarnation(d):
    two_workers(d)
    d.add_owner("a", "h0", "w0")
    d.export("a", "x", [1], persistent=True)
    lost = d.register("w0", 32)  # restarted before anyone noticed it died
    assert [o.instance_id for o in lost.owners] == ["a"] and [e.name for e in lost.exports] == ["x"]
    assert d.list_exports() == []
    assert {w.worker_id: (w.num_pages, w.running) for w in d.workers()} == {"w0": (32, 0), "w1": (64, 0)}


def test_forgetting_a_live_worker_reclaims_it_first(d):
    two_workers(d)
    d.add_owner("a", "h0", "w1")
    lost = d.forget("w1")
    assert [o.instance_id for o in lost.owners] == ["a"]
    assert [w.worker_id for w in d.workers()] == ["w0"]


# -- imports across workers ------------------------------------------------------------------------

def test_import_on_the_same_worker_needs_no_copy(d):
    two_workers(d)
    d.add_owner("a", "h0", "w0")
    d.add_owner("b", "h1", "w0")
    d.export("a", "x", [7, 8], meta="tokens")
    plan = d.import_("b", "x")
    assert (plan.worker_id, plan.pages, plan.meta, plan.copy) == ("w0", (7, 8), "tokens", None)
    assert d.lookup("x").num_imports == 1 and d.lookup("x").copies_in_flight == 0


def test_import_from_another_worker_yields_a_copy_plan_and_a_lease(d):
    two_workers(d)
    d.add_owner("a", "h0", "w0")
    d.add_owner("b", "h0", "w1")
    d.add_owner("c", "h0", "w1")
    d.export("a", "x", [7, 8], meta="m")
    plan_b = d.import_("b", "x")
    plan_c = d.import_("c", "x")
    assert plan_b.copy == CopyPlan(plan_b.copy.lease_id, "x", "b", "w0", (7, 8), "w1")
    assert plan_b.meta == "m" and plan_c.copy.lease_id != plan_b.copy.lease_id
    assert d.lookup("x").copies_in_flight == 2 and d.lookup("x").num_imports == 2
    assert d.copies_in_flight() == [plan_b.copy, plan_c.copy]
    d.check_invariants()
    assert d.end_lease(plan_b.copy.lease_id) is True
    assert d.end_lease(plan_b.copy.lease_id) is False  # already over
    assert d.lookup("x").copies_in_flight == 1
    # unexporting under an open copy is allowed (the copy holds its own references on w0)
    d.unexport("a", "x")
    assert d.copies_in_flight() == [plan_c.copy]
    d.check_invariants()
    assert d.end_lease(plan_c.copy.lease_id) is True
    assert d.copies_in_flight() == []


def test_copies_in_flight_are_cancelled_when_either_side_or_the_importer_ends(d):
    for w in ("w0", "w1", "w2"):
        d.register(w, 64)
    d.add_owner("a", "h0", "w0")
    d.add_owner("b", "h0", "w1")
    d.add_owner("c", "h0", "w2")
    d.export("a", "x", [1])
    d.export("b", "y", [2])
    from_w0 = d.import_("c", "x").copy  # w0 -> w2
    to_w1 = d.import_("b", "x").copy  # w0 -> w1
    from_w1 = d.import_("c", "y").copy  # w1 -> w2
    reclaimed = d.owner_ended("c")  # the importer of two copies
    assert reclaimed.copies == (from_w0, from_w1)
    assert d.copies_in_flight() == [to_w1] and d.lookup("y").copies_in_flight == 0
    lost = d.worker_died("w0")  # the source of the last one
    assert lost.copies == (to_w1,)
    assert d.end_lease(to_w1.lease_id) is False  # the late copy result finds the lease gone
    assert d.copies_in_flight() == []


# -- prefixes and placement ------------------------------------------------------------------------

def test_block_hashes_chain_full_pages_only():
    a = list(block_hashes(tokens(10), 4))
    assert len(a) == 2
    assert list(block_hashes(tokens(8), 4)) == a  # a partial page adds nothing
    assert list(block_hashes([0, 1, 2, 3, 9, 9, 9, 9], 4))[0] == a[0]  # first page equal, second not
    assert list(block_hashes([0, 1, 2, 3, 9, 9, 9, 9], 4))[1] != a[1]
    assert list(block_hashes(tokens(4, 4), 4))[0] != a[1]  # equal tokens under another parent differ
    assert list(block_hashes(tokens(8), 4, cache_key="other-model")) != a


def test_placement_picks_the_longest_prefix_then_the_least_loaded(d):
    for w in ("w0", "w1", "w2"):
        d.register(w, 64)
    d.add_owner("a", "h0", "w0")
    d.add_owner("b", "h0", "w1")
    system = tokens(12)  # three pages
    d.export("a", "short", [1, 2], tokens=system[:8])
    d.export("b", "long", [1, 2, 3], tokens=system)
    prompt = system + [100, 101, 102]
    assert d.prefix_match(prompt) == PrefixMatch(12, ("w1",), ("long",))
    assert d.place(prompt) == "w1"  # more loaded than w2, but it holds the longest prefix
    # w0 and w1 both hold 8 of these tokens and run one inferlet each: the id breaks the tie
    assert d.place(system[:8] + [55] * 8) == "w0"
    # a tie on prefix length goes to the less loaded holder
    d.add_owner("a2", "h0", "w0")
    assert d.place(system[:8] + [55] * 8) == "w1"
    # no prefix: the least loaded live worker, whatever is cached
    assert d.prefix_match([9] * 12).num_tokens == 0
    assert d.place([9] * 12) == "w2" and d.place() == "w2"
    # a prompt shorter than a page matches nothing
    assert d.place(system[:3]) == "w2"


def test_least_loaded_breaks_running_ties_by_free_pages(d):
    d.register("w0", 100)
    d.register("w1", 100)
    assert d.place() == "w0"  # all equal: the id decides, stably
    d.report_load("w0", 10, 5)
    d.report_load("w1", 90)
    assert [(w.free_pages, w.cached_pages) for w in d.workers()] == [(10, 5), (90, 0)]
    assert d.place() == "w1"
    d.add_owner("a", "h0", "w1")
    assert d.place() == "w0"  # fewer running inferlets comes first


def test_prefix_index_ignores_other_cache_keys_and_reads_sdk_meta():
    d = KvDirectory(page_size=PS, cache_key="model-a")
    d.register("w0", 8)
    d.register("w1", 8)
    d.add_owner("a", "h0", "w1")
    meta = '{"sdk": 1, "tokens": [1, 2, 3, 4, 5], "kv_len": 5, "next_position": 5}'
    d.export("a", "x", [0, 1], meta=meta, tokens=tokens_from_sdk_meta(meta))
    assert d.prefix_match([1, 2, 3, 4, 9]).worker_ids == ("w1",)
    other = KvDirectory(page_size=PS, cache_key="model-b")
    assert list(block_hashes([1, 2, 3, 4], PS, "model-a")) != list(block_hashes([1, 2, 3, 4], PS, other.cache_key))
    assert tokens_from_sdk_meta('{"sdk": 1, "tokens": [1, 2], "kv_len": 3}') == []  # pages dropped
    assert tokens_from_sdk_meta("not json") == [] and tokens_from_sdk_meta('{"tokens": [1]}') == []
    d.check_invariants()


def test_place_owner_spreads_concurrent_launches(d):
    two_workers(d)
    threads = [threading.Thread(target=d.place_owner, args=(f"i{n}", "h0")) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(w.running for w in d.workers()) == [20, 20]


# -- concurrency and invariants --------------------------------------------------------------------

def test_threads_exporting_distinct_names_leave_a_consistent_state(d):
    two_workers(d, pages=1000)
    d.add_owner("seed", "h0", "w0")
    d.export("seed", "seed", [0, 1], persistent=True)
    errors = []

    def work(n):
        try:
            owner = f"o{n}"
            d.add_owner(owner, f"h{n % 3}", f"w{n % 2}")
            for k in range(25):
                d.export(owner, f"n{n}/{k}", [2 * k, 2 * k + 1], persistent=k % 2 == 0,
                         tokens=tokens(PS * 2, start=n * 1000 + k))
                plan = d.import_(owner, "seed")  # a copy plan on w1, in place on w0
                if plan.copy is not None and k % 5:
                    assert d.end_lease(plan.copy.lease_id)  # one copy in five stays open
            d.unexport(owner, f"n{n}/1")
            if n % 4 == 1:
                d.owner_ended(owner)  # o1 and o5, on w1: cancels their open copies
        except Exception as e:  # noqa: BLE001 - reported below, with the thread's number
            errors.append((n, e))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    d.check_invariants()
    names = set(d.list_exports())
    for n in range(8):
        persistent = {f"n{n}/{k}" for k in range(0, 25, 2)}
        transient = {f"n{n}/{k}" for k in range(1, 25, 2)} - {f"n{n}/1"}
        assert persistent <= names
        assert (transient & names) == (set() if n % 4 == 1 else transient)
        assert d.prefix_match(tokens(PS * 2, start=n * 1000)).names == (f"n{n}/0",)
    # w1 still runs o3 and o7, with five open copies each
    open_copies = d.copies_in_flight()
    assert sorted({c.importer for c in open_copies}) == ["o3", "o7"] and len(open_copies) == 10
    assert d.lookup("seed").copies_in_flight == 10 and d.lookup("seed").num_imports == 8 * 25


def test_check_invariants_catches_broken_bookkeeping(d):
    two_workers(d)
    d.add_owner("a", "h0", "w0")
    d.export("a", "x", [1], tokens=tokens(4))
    d.check_invariants()
    d._workers["w0"].running = 5  # the test reaches in to break it on purpose
    with pytest.raises(DirectoryInvariantBroken, match="counts 5 running"):
        d.check_invariants()
    d._workers["w0"].running = 1
    d._blocks.clear()
    with pytest.raises(DirectoryInvariantBroken, match="missing from the prefix index"):
        d.check_invariants()
    d._blocks.update({h: {d._exports["x"].export_id} for h in d._exports["x"].hashes})
    d.check_invariants()
