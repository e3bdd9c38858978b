"""PageRegistry on the real executor: quotas, ownership, pins, exports and imports, and the
executor's free-page count after every operation (a page goes back only with its last reference)."""
import pytest

from cluster.worker.page_registry import MAX_EXPORT_NAME_BYTES, PageRefused, PageRegistry


@pytest.fixture
def reg(ex32):
    """A registry over the shared fp32 executor; the test must leave nothing held (ex32 checks)."""
    registry = PageRegistry(ex32)
    yield registry
    for holder in ("a", "b", "c"):
        registry.drop_holder(holder)
    for name in registry.list_exports():
        registry.unexport("a", name)


def test_allocate_within_quota_and_refuse_over_it(reg, ex32):
    free = ex32.num_free_pages
    pages = reg.allocate("a", 3, quota=4)
    assert len(set(pages)) == 3
    assert ex32.num_free_pages == free - 3
    assert reg.num_held("a") == 3
    with pytest.raises(PageRefused, match="quota of 4"):
        reg.allocate("a", 2, quota=4)
    assert ex32.num_free_pages == free - 3 and reg.num_held("a") == 3
    pages += reg.allocate("a", 1, quota=4)  # exactly at the quota
    assert ex32.num_free_pages == free - 4
    # the quota is per holder: another inferlet has its own
    other = reg.allocate("b", 2, quota=2)
    assert ex32.num_free_pages == free - 6
    reg.free("a", pages)
    reg.free("b", other)
    assert ex32.num_free_pages == free
    reg.check_idle()


def test_allocate_more_than_the_executor_has_is_refused(reg, ex32):
    free = ex32.num_free_pages
    with pytest.raises(PageRefused, match="fewer than"):
        reg.allocate("a", free + 1, quota=10 * free)
    assert ex32.num_free_pages == free and reg.num_held("a") == 0


def test_free_of_unheld_page_is_refused_all_or_nothing(reg, ex32):
    free = ex32.num_free_pages
    mine = reg.allocate("a", 2, quota=8)
    theirs = reg.allocate("b", 1, quota=8)
    with pytest.raises(PageRefused, match="not held"):
        reg.free("a", theirs)
    with pytest.raises(PageRefused, match="not held"):
        reg.free("a", [mine[0], theirs[0]])  # one good page, one foreign: nothing is freed
    with pytest.raises(PageRefused, match="listed more often"):
        reg.free("a", [mine[0], mine[0]])  # held once, listed twice
    with pytest.raises(PageRefused):
        reg.free("c", mine)  # a holder that never held anything
    assert reg.num_held("a") == 2 and reg.num_held("b") == 1
    assert ex32.num_free_pages == free - 3
    reg.free("a", mine)
    with pytest.raises(PageRefused):
        reg.free("a", mine[:1])  # already freed
    reg.free("b", theirs)
    assert ex32.num_free_pages == free


def test_pin_keeps_a_freed_page_allocated_until_unpin(reg, ex32):
    free = ex32.num_free_pages
    pages = reg.allocate("a", 2, quota=8)
    reg.pin(pages)  # a pass in flight reads them
    reg.free("a", pages)
    assert reg.num_held("a") == 0
    assert ex32.num_free_pages == free - 2  # still allocated in the executor
    with pytest.raises(PageRefused):
        reg.require_readable("a", pages)  # the inferlet gave them up
    with pytest.raises(PageRefused, match="without a holder"):
        reg.check_idle()
    reg.unpin(pages[:1])
    assert ex32.num_free_pages == free - 1
    reg.unpin(pages[1:])
    assert ex32.num_free_pages == free
    reg.check_idle()


def test_pins_count_like_references(reg, ex32):
    free = ex32.num_free_pages
    pages = reg.allocate("a", 1, quota=8)
    reg.pin(pages)
    reg.pin(pages)  # two operations in flight
    reg.free("a", pages)
    reg.unpin(pages)
    assert ex32.num_free_pages == free - 1
    reg.unpin(pages)
    assert ex32.num_free_pages == free


def test_export_makes_pages_read_only_for_exporter_and_importer(reg, ex32):
    pages = reg.allocate("a", 3, quota=8)
    reg.require_writable("a", pages)  # allocated and not shared
    reg.export("a", "sys-prompt", pages[:2], meta="tokens 0..31", persistent=False)
    with pytest.raises(PageRefused, match="read-only"):
        reg.require_writable("a", pages[:1])
    reg.require_writable("a", pages[2:])  # the page it kept to itself stays writable
    got, meta = reg.import_("b", "sys-prompt")
    assert got == pages[:2] and meta == "tokens 0..31"
    reg.require_readable("b", got)
    with pytest.raises(PageRefused, match="read-only"):
        reg.require_writable("b", got)
    with pytest.raises(PageRefused, match="not held"):
        reg.require_readable("b", pages[2:])  # not part of the export
    with pytest.raises(PageRefused, match="not held"):
        reg.require_readable("c", got)  # never imported
    reg.free("b", got)
    reg.unexport("a", "sys-prompt")
    reg.free("a", pages)


def test_import_of_unknown_name_and_bad_exports_are_refused(reg, ex32):
    free = ex32.num_free_pages
    pages = reg.allocate("a", 2, quota=8)
    with pytest.raises(PageRefused, match="nothing is exported"):
        reg.import_("b", "missing")
    with pytest.raises(PageRefused, match="nothing is exported"):
        reg.unexport("a", "missing")
    reg.export("a", "x", pages[:1], meta="", persistent=False)
    with pytest.raises(PageRefused, match="already exported"):
        reg.export("a", "x", pages[1:], meta="", persistent=False)
    with pytest.raises(PageRefused, match="already exported"):
        reg.export("a", "x", pages[1:], meta="", persistent=True)
    for name in ("", "n" * (MAX_EXPORT_NAME_BYTES + 1), "é" * (MAX_EXPORT_NAME_BYTES // 2 + 1)):
        with pytest.raises(PageRefused, match="export name"):
            reg.export("a", name, pages[1:], meta="", persistent=False)
    reg.export("a", "n" * MAX_EXPORT_NAME_BYTES, pages[1:], meta="", persistent=False)  # at the limit
    theirs = reg.allocate("b", 1, quota=8)
    with pytest.raises(PageRefused, match="not held"):
        reg.export("a", "stolen", theirs, meta="", persistent=False)  # only pages it holds
    assert reg.list_exports() == sorted(["x", "n" * MAX_EXPORT_NAME_BYTES])
    reg.drop_holder("a")
    reg.drop_holder("b")
    assert reg.list_exports() == []
    assert ex32.num_free_pages == free


def test_non_persistent_export_ends_with_its_owner_but_importers_keep_the_pages(reg, ex32):
    free = ex32.num_free_pages
    pages = reg.allocate("a", 2, quota=8)
    reg.export("a", "ctx", pages, meta="m", persistent=False)
    got, _ = reg.import_("b", "ctx")
    reg.drop_holder("a")
    assert reg.list_exports() == []
    with pytest.raises(PageRefused, match="nothing is exported"):
        reg.import_("c", "ctx")
    assert ex32.num_free_pages == free - 2  # b still reads them
    reg.require_readable("b", got)
    reg.free("b", got[:1])
    assert ex32.num_free_pages == free - 1
    reg.free("b", got[1:])
    assert ex32.num_free_pages == free
    reg.check_idle()


def test_persistent_export_survives_its_owner_until_unexported(reg, ex32):
    free = ex32.num_free_pages
    pages = reg.allocate("a", 2, quota=8)
    reg.export("a", "cache/sys", pages, meta="m", persistent=True)
    reg.drop_holder("a")
    assert reg.list_exports() == ["cache/sys"]
    assert ex32.num_free_pages == free - 2
    reg.check_idle()  # only a persistent export holds pages: that is idle
    got, meta = reg.import_("c", "cache/sys")
    assert got == pages and meta == "m"
    reg.free("c", got)
    assert ex32.num_free_pages == free - 2  # the export's own reference
    reg.unexport("b", "cache/sys")  # any inferlet may end a persistent export
    assert reg.list_exports() == []
    assert ex32.num_free_pages == free
    reg.check_idle()


def test_unexport_of_persistent_export_while_imported_waits_for_the_importer(reg, ex32):
    free = ex32.num_free_pages
    pages = reg.allocate("a", 1, quota=8)
    reg.export("a", "p", pages, meta="", persistent=True)
    reg.drop_holder("a")
    got, _ = reg.import_("b", "p")
    reg.unexport("b", "p")
    assert ex32.num_free_pages == free - 1  # b still holds its imported reference
    reg.drop_holder("b")
    assert ex32.num_free_pages == free


def test_only_the_owner_may_unexport_a_non_persistent_export(reg, ex32):
    free = ex32.num_free_pages
    pages = reg.allocate("a", 2, quota=8)
    reg.export("a", "mine", pages, meta="", persistent=False)
    got, _ = reg.import_("b", "mine")
    with pytest.raises(PageRefused, match="another inferlet"):
        reg.unexport("b", "mine")
    assert reg.list_exports() == ["mine"]
    reg.unexport("a", "mine")
    assert reg.list_exports() == []
    assert ex32.num_free_pages == free - 2  # a and b still hold them
    reg.free("a", pages)
    assert ex32.num_free_pages == free - 2
    reg.free("b", got)
    assert ex32.num_free_pages == free


def test_max_persistent_pages(ex32):
    assert PageRegistry(ex32).max_persistent_pages == ex32.info.num_pages // 2
    reg = PageRegistry(ex32, max_persistent_pages=3)
    free = ex32.num_free_pages
    pages = reg.allocate("a", 6, quota=8)
    reg.export("a", "p1", pages[:2], meta="", persistent=True)
    with pytest.raises(PageRefused, match="allows 3"):
        reg.export("a", "p2", pages[2:4], meta="", persistent=True)
    reg.export("a", "p2", pages[2:3], meta="", persistent=True)  # exactly 3
    reg.export("a", "t", pages[3:6], meta="", persistent=False)  # non-persistent exports do not count
    reg.unexport("a", "p1")
    reg.export("a", "p3", pages[3:5], meta="", persistent=True)  # room again
    assert reg.list_exports() == ["p2", "p3", "t"]
    reg.drop_holder("a")
    assert reg.list_exports() == ["p2", "p3"]
    assert ex32.num_free_pages == free - 3
    reg.unexport("b", "p2")
    reg.unexport("b", "p3")
    assert ex32.num_free_pages == free
    reg.check_idle()


def test_list_exports_filters_by_prefix_and_sorts(reg):
    pages = reg.allocate("a", 1, quota=8)
    for name in ("sys/b", "user/1", "sys/a", "sys", "system"):
        reg.export("a", name, pages, meta="", persistent=False)
    assert reg.list_exports() == ["sys", "sys/a", "sys/b", "system", "user/1"]
    assert reg.list_exports("sys/") == ["sys/a", "sys/b"]
    assert reg.list_exports("sys") == ["sys", "sys/a", "sys/b", "system"]
    assert reg.list_exports("nope") == []
    reg.drop_holder("a")
    assert reg.list_exports() == []


def test_drop_holder_releases_everything_it_held(reg, ex32):
    free = ex32.num_free_pages
    shared = reg.allocate("b", 2, quota=8)
    reg.export("b", "b-ctx", shared, meta="", persistent=False)
    pages = reg.allocate("a", 3, quota=8)
    reg.export("a", "a-ctx", pages[:1], meta="", persistent=False)
    reg.import_("a", "b-ctx")
    reg.import_("a", "b-ctx")  # twice: two references
    assert ex32.num_free_pages == free - 5
    reg.drop_holder("a")
    assert reg.num_held("a") == 0
    assert reg.list_exports() == ["b-ctx"]
    assert ex32.num_free_pages == free - 2  # b's pages stay with b
    reg.drop_holder("a")  # dropping again is harmless
    reg.drop_holder("b")
    assert ex32.num_free_pages == free
    reg.check_idle()


def test_a_freed_exported_page_is_writable_again_once_reallocated(reg, ex32):
    pages = reg.allocate("a", 1, quota=8)
    reg.export("a", "x", pages, meta="", persistent=False)
    reg.drop_holder("a")
    again = reg.allocate("b", ex32.num_free_pages, quota=10**6)  # every free page, so surely the old one
    assert pages[0] in again
    reg.require_writable("b", again)
    reg.free("b", again)


def test_check_idle(reg, ex32):
    reg.check_idle()
    pages = reg.allocate("a", 2, quota=8)
    with pytest.raises(PageRefused, match="still held"):
        reg.check_idle()
    reg.export("a", "x", pages, meta="", persistent=False)
    reg.free("a", pages)
    # the owner gave its pages up but never ended: its export still holds them
    with pytest.raises(PageRefused, match="without a holder"):
        reg.check_idle()
    reg.unexport("a", "x")
    reg.check_idle()


def test_drop_exports_ends_every_export_and_importers_keep_their_pages(reg, ex32):
    free = ex32.num_free_pages
    kept = reg.allocate("a", 2, quota=8)
    shared = reg.allocate("a", 1, quota=8)
    reg.export("a", "persistent", kept, "", persistent=True)
    reg.export("a", "owned", shared, "", persistent=False)
    reg.free("a", kept)  # only the persistent export holds these now
    imported, _ = reg.import_("b", "owned")
    assert sorted(reg.drop_exports()) == ["owned", "persistent"]
    assert reg.list_exports() == []
    assert ex32.num_free_pages == free - 1  # the persistent pages came back; "b" still holds the other
    with pytest.raises(PageRefused, match="nothing is exported"):
        reg.import_("c", "persistent")
    reg.drop_holder("a")
    reg.drop_holder("b")
    assert ex32.num_free_pages == free
    reg.check_idle()
