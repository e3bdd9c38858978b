"""Moving an export's KV pages from one worker to another (issue 22): the directory's two-phase move
(KvDirectory.begin_move / finish_move / abort_move, no Ray), then the move executor
(cluster.actors.kv_migration) on a real local Ray cluster of two CPU workers with the real model."""
import pytest

from cluster.actors.directory_records import EndExport, MovePlan
from cluster.actors.kv_directory import KvDirectory
from cluster.errors import (DirectoryInvariantBroken, ExportNotMovable, InvalidDirectoryRequest, UnknownExport,
                            UnknownMove, UnknownWorker, WorkerDead)

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
                                               r"inferlet 'a' on worker 'w0', and moving a running inferlet is "
                                               r"not supported"):
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
