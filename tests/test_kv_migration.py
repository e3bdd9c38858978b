"""Moving an export's KV pages from one worker to another (issue 22): the directory's two-phase move
(KvDirectory.begin_move / finish_move / abort_move, no Ray), then the move executor
(cluster.actors.kv_migration, through ClusterHost.move_export / drain_worker) on a real local Ray
cluster of two CPU workers with the real model (one cluster for the module: ~15 s to start)."""
import threading
import time

import numpy as np
import pytest

from cluster.actors.directory_records import EndExport, MovePlan
from cluster.actors.kv_directory import KvDirectory
from cluster.errors import (DirectoryInvariantBroken, ExportNotMovable, InferletError, InferletNotMovable,
                            InvalidDirectoryRequest, UnknownExport, UnknownMove, UnknownOwner, UnknownWorker,
                            WorkerDead)
from cluster.worker.prefix_hashes import tokens_from_sdk_meta
from helpers import wait_until
from workers.step_types import ForwardRequest, Sampler

PS = 4  # page size of the directory tests


@pytest.fixture
def d():
    directory = KvDirectory(page_size=PS, cache_key="smollm2")
    directory.register("w0", 64)
    directory.register("w1", 64)
    directory.add_owner("a", "h0", "w0")
    directory.add_owner("b", "h0", "w1")
    yield directory
    directory.check_invariants()


def tokens(n):
    return list(range(n))


# -- the directory's two phases ---------------------------------------------------------------------

def test_a_move_re_points_the_export_and_keeps_its_name_meta_and_prefix(d):
    before = d.export("a", "sys", [3, 4, 5], meta="m", persistent=True, tokens=tokens(10))
    plan = d.begin_move("sys", "w1")
    assert plan == MovePlan(plan.move_id, "sys", "w0", (3, 4, 5), "w1", "m")
    assert d.moves_in_flight() == [plan]
    assert d.lookup("sys").moving_to == "w1" and d.lookup("sys").worker_id == "w0"
    d.check_invariants()
    # before the commit everything reads the source: in place on w0, a copy from w0 to w1
    assert d.import_("a", "sys").copy is None
    early = d.import_("b", "sys").copy
    assert (early.src_worker, early.src_pages) == ("w0", (3, 4, 5))
    assert d.prefix_match(tokens(10)).worker_ids == ("w0",)

    done = d.finish_move(plan.move_id, [7, 8, 9])
    assert done.release == EndExport("w0", "sys", (3, 4, 5))
    assert done.open_leases == (early.lease_id,)  # the source's pages must outlive this copy
    after = d.lookup("sys")
    assert done.export == after
    assert (after.worker_id, after.pages, after.moving_to) == ("w1", (7, 8, 9), "")
    assert (after.name, after.meta, after.owner, after.persistent, after.num_indexed_tokens) == \
        (before.name, before.meta, before.owner, before.persistent, before.num_indexed_tokens)
    assert d.moves_in_flight() == []
    assert d.prefix_match(tokens(10)).worker_ids == ("w1",)  # placement follows the pages
    assert {w.worker_id: w.num_exports for w in d.workers()} == {"w0": 0, "w1": 1}
    d.check_invariants()
    # after the commit everything reads the destination
    late = d.import_("a", "sys").copy
    assert (late.src_worker, late.src_pages, late.dst_worker) == ("w1", (7, 8, 9), "w0")
    assert d.import_("b", "sys").copy is None
    assert d.end_lease(early.lease_id) and d.end_lease(late.lease_id)


def test_the_owner_of_a_moved_export_unexports_it_where_it_now_is(d):
    d.export("a", "sys", [3], persistent=True)
    plan = d.begin_move("sys", "w1")
    d.finish_move(plan.move_id, [9])
    assert d.unexport("a", "sys") == EndExport("w1", "sys", (9,))


def test_a_move_is_refused_with_its_cause(d):
    d.export("a", "kept", [1], persistent=True)
    d.export("a", "own", [2])
    d.register("w2", 64)
    d.worker_died("w2")
    with pytest.raises(UnknownExport, match="nothing is exported under 'nope'"):
        d.begin_move("nope", "w1")
    with pytest.raises(UnknownWorker, match=r"cannot move 'kept' to 'w9': no such worker is registered"):
        d.begin_move("kept", "w9")
    with pytest.raises(WorkerDead, match=r"cannot move 'kept' to worker 'w2': it died .* pick a live worker"):
        d.begin_move("kept", "w2")
    with pytest.raises(InvalidDirectoryRequest, match=r"'kept' is already on worker 'w0'; nothing to move"):
        d.begin_move("kept", "w0")
    with pytest.raises(ExportNotMovable, match=r"'own' is not persistent: its pages live with the running "
                                               r"inferlet 'a' on worker 'w0' and end with it"):
        d.begin_move("own", "w1")
    plan = d.begin_move("kept", "w1")
    with pytest.raises(ExportNotMovable, match=rf"'kept' is already moving to worker 'w1' \(move {plan.move_id}\)"):
        d.begin_move("kept", "w1")
    assert d.moves_in_flight() == [plan]


def test_a_finish_with_the_wrong_pages_is_refused_and_the_move_stays_open(d):
    d.export("a", "sys", [3, 4], persistent=True)
    plan = d.begin_move("sys", "w1")
    with pytest.raises(InvalidDirectoryRequest, match="copies 2 pages of 'sys'; 1 pages were given"):
        d.finish_move(plan.move_id, [7])
    with pytest.raises(InvalidDirectoryRequest, match="page 64 is not a page of worker 'w1'"):
        d.finish_move(plan.move_id, [7, 64])
    assert d.moves_in_flight() == [plan] and d.lookup("sys").worker_id == "w0"
    assert d.finish_move(plan.move_id, [7, 8]).export.worker_id == "w1"


def test_an_aborted_move_leaves_the_export_where_it_was(d):
    d.export("a", "sys", [3], persistent=True)
    plan = d.begin_move("sys", "w1")
    assert d.abort_move(plan.move_id) and not d.abort_move(plan.move_id)
    info = d.lookup("sys")
    assert (info.worker_id, info.pages, info.moving_to) == ("w0", (3,), "")
    with pytest.raises(UnknownMove, match=f"no move {plan.move_id} is in flight"):
        d.finish_move(plan.move_id, [9])
    assert d.begin_move("sys", "w1").move_id != plan.move_id  # free to move again


def test_ending_the_export_or_losing_a_worker_cancels_its_move(d):
    d.export("a", "x", [1], persistent=True)
    d.export("a", "y", [2], persistent=True)
    d.export("a", "z", [3], persistent=True)
    unexported, dest_lost, src_lost = (d.begin_move(n, "w1").move_id for n in "xyz")
    d.unexport("b", "x")  # anyone may end a persistent export, mid-move too
    with pytest.raises(UnknownMove):
        d.finish_move(unexported, [9])
    d.check_invariants()
    d.register("w2", 64)
    d.abort_move(src_lost)
    src_lost = d.begin_move("z", "w2").move_id
    d.worker_died("w1")  # the destination of y's move
    with pytest.raises(UnknownMove):
        d.finish_move(dest_lost, [9])
    assert d.lookup("y").worker_id == "w0" and d.lookup("y").moving_to == ""
    d.worker_died("w0")  # the source of z's move: z is gone with it
    with pytest.raises(UnknownMove):
        d.finish_move(src_lost, [9])
    assert d.moves_in_flight() == [] and d.list_exports() == []


def test_a_persistent_export_moves_on_after_its_owner_ends(d):
    d.export("a", "sys", [3], persistent=True)
    plan = d.begin_move("sys", "w1")
    d.owner_ended("a")
    assert d.finish_move(plan.move_id, [5]).export.worker_id == "w1"


def test_a_running_inferlet_moves_to_another_worker_in_the_directory(d):
    d.export("a", "kept", [1], persistent=True)  # a persistent export stays where it is
    moved = d.move_owner("a", "w1")
    assert (moved.worker_id, d.owner("a").worker_id) == ("w1", "w1")
    assert {w.worker_id: w.running for w in d.workers()} == {"w0": 0, "w1": 2}
    assert d.import_("a", "kept").copy.src_worker == "w0"  # it now reads the export from across
    d.check_invariants()
    assert d.owner_ended("a").releases[-1].worker_id == "w1"  # its pages are dropped where they now are


def test_moving_a_running_inferlet_is_refused_with_its_cause(d):
    d.register("w2", 64)
    d.worker_died("w2")
    with pytest.raises(UnknownOwner, match="no running inferlet 'z'"):
        d.move_owner("z", "w1")
    with pytest.raises(UnknownWorker, match="cannot move inferlet 'a' to 'w9'"):
        d.move_owner("a", "w9")
    with pytest.raises(WorkerDead, match="cannot move inferlet 'a' to worker 'w2': it died"):
        d.move_owner("a", "w2")
    with pytest.raises(InvalidDirectoryRequest, match="'a' is already on worker 'w0'"):
        d.move_owner("a", "w0")
    d.export("a", "mine", [2])
    with pytest.raises(InferletNotMovable, match=r"'a' exports 'mine' \(not persistent\).*after it unexports them"):
        d.move_owner("a", "w1")
    d.unexport("a", "mine")
    d.export("b", "theirs", [2])
    plan = d.import_("a", "theirs")
    with pytest.raises(InferletNotMovable, match="'a' has an import's copy in flight to worker 'w0'"):
        d.move_owner("a", "w1")
    d.end_lease(plan.copy.lease_id)
    assert d.move_owner("a", "w1").worker_id == "w1"
    assert {w.worker_id: w.running for w in d.workers()} == {"w0": 0, "w1": 2, "w2": 0}


def test_exports_on_lists_a_workers_exports(d):
    d.export("a", "b-name", [1], persistent=True)
    d.export("a", "a-name", [2])
    d.export("b", "other", [2])
    assert [e.name for e in d.exports_on("w0")] == ["a-name", "b-name"]
    assert [e.name for e in d.exports_on("w1")] == ["other"]


def test_the_invariants_catch_a_move_and_export_that_disagree(d):
    d.export("a", "sys", [3], persistent=True)
    plan = d.begin_move("sys", "w1")
    d._exports["sys"].move = None  # a bug: the export forgot its move
    with pytest.raises(DirectoryInvariantBroken, match=f"move {plan.move_id} of 'sys' is open but its export"):
        d.check_invariants()
    d._exports["sys"].move = plan.move_id
    d._exports["sys"].pages = (4,)  # a bug: the export changed under its move
    with pytest.raises(DirectoryInvariantBroken, match="copies 'sys' from where the export no longer is"):
        d.check_invariants()
    d._exports["sys"].pages = (3,)


# -- the move executor on a real Ray cluster ----------------------------------------------------------

PREFIX = "inferlets/examples/prefix_cache.py"
NUM_PAGES = 96  # per worker
SYSTEM = "You are a terse geography tutor. Answer in one sentence."
OTHER_SYSTEM = "You are a patient history teacher. Answer in two sentences."
PROBE_TOP_K = 32


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from cluster.actors.cluster import ClusterSpec, init_local_ray, start_cluster

    init_local_ray(num_cpus=2, log_to_driver=False)
    try:
        spec = ClusterSpec(workers=2, hosts=1, num_pages=NUM_PAGES, torch_threads=1, bind_address="127.0.0.1",
                           dtype="fp32")  # fp32: greedy answers do not flip on near ties between batches
        yield start_cluster(spec, wait=False)  # local_host waits, once it has compiled its inferlet
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_host(cluster):
    """A ClusterHost in this process (same directory, same workers): it pins launches and moves exports."""
    from cluster.actors.cluster_host import ClusterHost

    with ClusterHost(cluster.directory) as host:
        host.component(PREFIX)  # built and compiled once, while the workers load the model
        cluster.wait_for_workers()
        yield host


def free_pages(cluster) -> list[int]:
    import ray

    return ray.get([w.free_pages.remote() for w in cluster.workers])


def pages_come_back(cluster, expected: list[int]) -> None:
    wait_until(lambda: free_pages(cluster) == expected, 30, f"the workers' free pages to be {expected}")


def settled(cluster) -> None:
    """Every worker has all its pages back (and its books agree), and the directory agrees with itself."""
    import ray

    pages_come_back(cluster, [NUM_PAGES] * 2)
    ray.get([w.check_idle.remote() for w in cluster.workers])
    cluster.directory.check_invariants()
    assert cluster.directory.moves_in_flight() == [] and cluster.directory.copies_in_flight() == []


def answer(host, worker_id: str, system: str = SYSTEM, *extra) -> tuple[str, str]:
    """(cache status, greedy answer) of prefix_cache.py on `worker_id`."""
    outcome = host.run(PREFIX, ["--system", system, "--max-tokens", "12", *extra], worker_id=worker_id)
    assert outcome.ok, outcome.error
    return outcome.messages[0], "".join(outcome.messages[1:])


def unexport(host, system: str = SYSTEM) -> None:
    outcome = host.run(PREFIX, ["--system", system, "--unexport"], worker_id="worker-0")
    assert outcome.ok, outcome.error


def probe(conn, name: str, holder: str) -> tuple[bytes, np.ndarray, np.ndarray]:
    """The export's KV bytes on the worker behind `conn`, and the model's next-token distribution
    (top PROBE_TOP_K ids and probabilities) after the export's tokens and one more, computed there over
    those pages: the partial last page copied into a page of the probe's own, as an importer does."""
    pages, meta = conn.import_(holder, name)
    try:
        kv = conn.wait(conn.read_pages(holder, pages))
        tokens = tokens_from_sdk_meta(meta)
        assert tokens, "the export's meta names no tokens"
        page_size, filled = conn.info.page_size, len(tokens) % conn.info.page_size
        [own] = conn.allocate(holder, 1, 1)
        if filled:
            conn.copy(holder, pages[-1], own, 0, 0, filled)
        request = ForwardRequest(token_ids=np.array([conn.tokenizer.encode("What")[0]]),
                                 position_ids=np.array([len(tokens)]),
                                 kv_page_indices=np.array((pages[:-1] if filled else pages) + [own]),
                                 kv_last_page_len=filled + 1, output_indices=np.array([0]),
                                 samplers=(Sampler("distribution", top_k=PROBE_TOP_K),))
        assert page_size * (len(request.kv_page_indices) - 1) + filled == len(tokens)
        [result] = conn.wait(conn.forward(holder, request))
        return kv, np.asarray(result.ids), np.asarray(result.probs)
    finally:
        conn.release(holder)


def test_a_moved_export_is_read_from_its_new_worker_with_the_same_kv_and_logits(cluster, local_host):
    status, first = answer(local_host, "worker-0")
    assert status == "cache miss"
    [name] = cluster.directory.list_exports("prefix-cache/")
    num_pages = len(cluster.directory.lookup(name).pages)
    kv, ids, probs = probe(local_host.connection("worker-0"), name, "probe-before")
    pages_come_back(cluster, [NUM_PAGES - num_pages, NUM_PAGES])
    with pytest.raises(InvalidDirectoryRequest, match="already on worker 'worker-0'"):
        local_host.move_export(name, "worker-0")  # the directory's refusals cross Ray as themselves
    with pytest.raises(UnknownWorker):
        local_host.move_export(name, "worker-7")

    moved = local_host.move_export(name, "worker-1")
    assert (moved.name, moved.src_worker, moved.dst_worker, moved.num_pages) == (name, "worker-0", "worker-1",
                                                                                 num_pages)
    info = cluster.directory.lookup(name)
    assert (info.worker_id, info.moving_to, info.persistent) == ("worker-1", "", True)
    pages_come_back(cluster, [NUM_PAGES, NUM_PAGES - num_pages])  # worker-0 got its pages back
    assert local_host.connection("worker-0").list_exports("prefix-cache/") == []
    assert local_host.connection("worker-1").list_exports("prefix-cache/") == [name]
    moved_kv, moved_ids, moved_probs = probe(local_host.connection("worker-1"), name, "probe-after")
    assert moved_kv == kv, "the moved pages hold other bytes than the originals"
    # the same bytes through the same model and the same single-threaded fp32 step: equal within 1e-6
    assert (moved_ids == ids).all() and np.abs(moved_probs - probs).max() <= 1e-6
    assert answer(local_host, "worker-1") == ("cache hit", first)  # in place on its new worker
    assert answer(local_host, "worker-0") == ("cache hit", first)  # copied back from worker-1
    assert cluster.directory.prefix_match(tokens_from_sdk_meta(info.meta)).worker_ids == ("worker-1",)
    unexport(local_host)
    settled(cluster)


def test_an_import_racing_a_move_reads_the_source_until_its_copy_is_done(cluster, local_host, monkeypatch):
    """A move's write to its destination is held back 2 s and an importer's first call to the source
    4 s (faults injected on purpose): the importer's copy plan predates the commit, so the source must
    keep the export until that copy has taken its pages, or the import fails and the answer changes."""
    status, first = answer(local_host, "worker-0")
    assert status == "cache miss"
    [name] = cluster.directory.list_exports("prefix-cache/")
    source, dest = local_host.connection("worker-0"), local_host.connection("worker-1")
    source_import, dest_write = source.import_, dest.write_pages

    def slow_lease_import(holder, export_name):  # only the importer's copy (its holder is its lease)
        if holder.startswith("lease-"):
            time.sleep(4.0)
        return source_import(holder, export_name)

    def slow_move_write(holder, pages, data):  # only the move's copy
        if holder.startswith("move-"):
            time.sleep(2.0)
        return dest_write(holder, pages, data)

    commits, finish_move = [], local_host.directory.finish_move

    def recorded_finish_move(*args):
        commits.append(finish_move(*args))
        return commits[-1]

    monkeypatch.setattr(source, "import_", slow_lease_import)
    monkeypatch.setattr(dest, "write_pages", slow_move_write)
    monkeypatch.setattr(local_host.directory, "finish_move", recorded_finish_move, raising=False)
    mover = threading.Thread(target=lambda: commits.append(local_host.move_export(name, "worker-1")))
    mover.start()
    wait_until(lambda: cluster.directory.moves_in_flight(), 30, "the move to start")
    copier = local_host.launch(PREFIX, ["--system", SYSTEM, "--max-tokens", "12"], worker_id="worker-1")
    sharer = local_host.launch(PREFIX, ["--system", SYSTEM, "--max-tokens", "12"], worker_id="worker-0")
    mover.join(60)
    assert not mover.is_alive()
    for importer in (copier, sharer):
        assert importer.wait(120).ok, importer.outcome.error
        assert (importer.outcome.messages[0], "".join(importer.outcome.messages[1:])) == ("cache hit", first)
    done, moved = commits
    assert done.open_leases, "the importer's copy had not begun before the commit: the race was not run"
    assert moved.dst_worker == cluster.directory.lookup(name).worker_id == "worker-1"
    monkeypatch.undo()
    unexport(local_host)
    settled(cluster)


def test_a_move_that_fails_leaves_the_export_where_it_was_and_no_pages_behind(cluster, local_host, monkeypatch):
    assert answer(local_host, "worker-0")[0] == "cache miss"
    [name] = cluster.directory.list_exports("prefix-cache/")
    dest = local_host.connection("worker-1")
    monkeypatch.setattr(dest, "export", lambda *a: (_ for _ in ()).throw(RuntimeError("export refused (injected)")))
    with pytest.raises(RuntimeError, match="injected"):
        local_host.move_export(name, "worker-1")
    monkeypatch.undo()
    info = cluster.directory.lookup(name)
    assert (info.worker_id, info.moving_to) == ("worker-0", "")
    assert cluster.directory.moves_in_flight() == []
    pages_come_back(cluster, [NUM_PAGES - len(info.pages), NUM_PAGES])  # the copy on worker-1 was given back
    assert local_host.move_export(name, "worker-1").dst_worker == "worker-1"  # and it can move after all
    unexport(local_host)
    settled(cluster)


def test_drain_moves_every_persistent_export_off_a_worker_and_says_what_stays(cluster, local_host):
    firsts = {system: answer(local_host, "worker-1", system) for system in (SYSTEM, OTHER_SYSTEM)}
    assert {status for status, _ in firsts.values()} == {"cache miss"}
    names = cluster.directory.list_exports("prefix-cache/")
    # a non-persistent export of a running inferlet (made by hand: its pages are that inferlet's own)
    conn, owner = local_host.connection("worker-1"), "inferlet-held-by-this-test"
    cluster.directory.add_owner(owner, local_host.host_id, "worker-1")
    pages = conn.allocate(owner, 2, 2)
    cluster.directory.export(owner, "scratch", pages)
    conn.export(owner, "scratch", pages, "", False)

    drained = local_host.drain_worker("worker-1")
    assert sorted(m.name for m in drained.moved) == names
    assert {(m.src_worker, m.dst_worker) for m in drained.moved} == {("worker-1", "worker-0")}
    [stayed] = drained.not_moved
    assert stayed.name == "scratch" and "live with the running inferlet" in stayed.reason
    assert [e.name for e in cluster.directory.exports_on("worker-1")] == ["scratch"]
    moved_pages = sum(m.num_pages for m in drained.moved)
    pages_come_back(cluster, [NUM_PAGES - moved_pages, NUM_PAGES - 2])  # only the running inferlet's pages stay
    for system, first in firsts.items():
        assert answer(local_host, "worker-0", system) == ("cache hit", first[1])
    cluster.directory.owner_ended(owner)
    conn.release(owner)
    for system in firsts:
        unexport(local_host, system)
    settled(cluster)


# -- moving a running inferlet between its steps (cluster.actors.inferlet_move) ------------------------

TEXT = "inferlets/examples/text_completion.py"
STORY = ["--prompt", "Tell me a long story about a lighthouse keeper.", "--max-tokens", "48", "--ignore-eos"]


@pytest.fixture(scope="module")
def story(local_host):
    """The unmoved run's text (greedy, fp32, alone on its worker: the same text every time)."""
    outcome = local_host.run(TEXT, STORY, worker_id="worker-0")
    assert outcome.ok, outcome.error
    return "".join(outcome.messages)


def launch_until(host, program, arguments, worker_id, messages):
    """Launch, and return once the inferlet has sent `messages` messages (it is mid-generation then)."""
    running = host.launch(program, arguments, worker_id=worker_id)
    wait_until(lambda: len(running.outcome.messages) >= messages or running.done, 60,
               f"{messages} messages from the inferlet")
    assert not running.done, "it ended before it could be moved"
    return running


def test_a_running_inferlet_moves_between_steps_and_writes_the_same_text(cluster, local_host, story):
    running = launch_until(local_host, TEXT, STORY, "worker-0", 6)
    with pytest.raises(InvalidDirectoryRequest, match="already on worker 'worker-0'"):
        local_host.move_inferlet(running.instance_id, "worker-0")
    moved = local_host.move_inferlet(running.instance_id, "worker-1")
    assert (moved.instance_id, moved.src_worker, moved.dst_worker) == (running.instance_id, "worker-0", "worker-1")
    assert moved.num_pages >= 1
    assert local_host.where(running.instance_id) == "worker-1"
    assert cluster.directory.owner(running.instance_id).worker_id == "worker-1"
    assert free_pages(cluster)[0] == NUM_PAGES  # the old worker gave back everything it held
    assert running.wait(120).ok, running.outcome.error
    assert "".join(running.outcome.messages) == story  # the same KV, so the same greedy text
    with pytest.raises(UnknownOwner, match="no running inferlet"):
        local_host.move_inferlet(running.instance_id, "worker-0")
    settled(cluster)


def test_an_inferlet_holding_imported_pages_moves_there_and_back(cluster, local_host):
    """prefix_cache.py's second run imports the system prompt's export (shared, read-only pages) and
    decodes past it: its copies on the new worker must read the same, twice over."""
    status, first = answer(local_host, "worker-0", SYSTEM, "--max-tokens", "40")
    assert status == "cache miss"
    [name] = cluster.directory.list_exports("prefix-cache/")
    running = launch_until(local_host, PREFIX, ["--system", SYSTEM, "--max-tokens", "40"], "worker-0", 3)
    there = local_host.move_inferlet(running.instance_id, "worker-1")
    back = local_host.move_inferlet(running.instance_id, "worker-0")
    assert (there.dst_worker, back.dst_worker) == ("worker-1", "worker-0")
    assert back.num_pages == there.num_pages
    assert running.wait(120).ok, running.outcome.error
    assert (running.outcome.messages[0], "".join(running.outcome.messages[1:])) == ("cache hit", first)
    assert cluster.directory.lookup(name).worker_id == "worker-0"  # the export itself did not move
    unexport(local_host)
    settled(cluster)


def test_drain_moves_the_hosts_running_inferlets_off_the_worker_too(cluster, local_host, story):
    running = launch_until(local_host, TEXT, STORY, "worker-1", 4)
    drained = local_host.drain_worker("worker-1")
    [moved] = drained.inferlets
    assert (moved.instance_id, moved.src_worker, moved.dst_worker) == (running.instance_id, "worker-1", "worker-0")
    assert free_pages(cluster)[1] == NUM_PAGES
    assert running.wait(120).ok, running.outcome.error
    assert "".join(running.outcome.messages) == story
    settled(cluster)


def test_the_moves_benchmark_moves_a_generating_inferlet_and_checks_its_text(cluster, local_host, capsys):
    from cluster.bench import moves

    # 3 moves with pages allocated between them: the third map must not reuse an id the first one made up
    results = moves.measure(local_host, tokens=72, moves=3, prompt_words=60)
    made = results["moved"]["moves"]
    assert len(made) == 3 and all(m["pages"] >= 2 and m["ms"] > 0 for m in made)
    assert made[0]["pages"] < made[2]["pages"]  # it allocated pages between the moves
    assert results["moved"]["text"] == results["unmoved"]["text"]  # measure() raises otherwise; not vacuous
    assert results["moved"]["messages"] == results["unmoved"]["messages"] >= 50
    moves.print_table(results)
    assert "moved / unmoved total" in capsys.readouterr().out
    assert [local_host.connection(w).list_exports() for w in ("worker-0", "worker-1")] == [[], []]
    settled(cluster)


def test_an_inferlet_moved_off_a_worker_survives_losing_it(cluster, local_host):
    """The point of draining: once moved, the inferlet no longer needs its first worker (it still runs on
    that worker's scheduler in its host). One left there fails, naming the lost worker. Runs last: it
    restarts worker-0."""
    import ray

    long = ["--prompt", "Tell me a long story about a lighthouse keeper.", "--max-tokens", "160", "--ignore-eos"]
    reference = local_host.run(TEXT, long, worker_id="worker-1")
    assert reference.ok, reference.error
    moving = launch_until(local_host, TEXT, long, "worker-0", 4)
    staying = launch_until(local_host, TEXT, long, "worker-0", 1)
    assert local_host.move_inferlet(moving.instance_id, "worker-1").dst_worker == "worker-1"
    target = cluster.directory.target("worker-0")
    ray.kill(cluster.workers[0], no_restart=False)  # Ray restarts it
    failed = staying.wait(60)  # its next pass failed with the connection
    assert not failed.ok and "worker-0" in failed.error, failed.error
    assert not moving.done, "it ended before the old worker's host was retired: the case was not run"
    try:
        local_host.host_for("worker-0")  # as the next launch there does: the old host is retired
    except InferletError:
        pass  # WorkerDead until the new worker-0 joins
    survived = moving.wait(120)
    assert survived.ok, survived.error
    assert "".join(survived.messages) == "".join(reference.messages)
    wait_until(lambda: all(w.live for w in cluster.directory.workers()) and cluster.directory.target("worker-0")
               != target, 180, "worker-0 to restart and rejoin")
    assert local_host.run(TEXT, ["--max-tokens", "4"], worker_id="worker-0").ok  # a new host for the new worker
    settled(cluster)
