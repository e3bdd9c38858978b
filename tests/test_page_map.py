"""PageMap: the page ids a moved inferlet keeps using, translated to its new worker's (issue 22)."""
import pytest

from cluster.actors.page_map import FRESH_IDS_FROM, PageMap
from cluster.worker.page_registry import PageRefused


@pytest.fixture
def m():
    """An inferlet that held pages 3 (its own), 5 (imported twice) and 7 (imported once), copied to 10, 11, 12."""
    pages = PageMap()
    pages.bind_copy(3, 10, references=1, writable=True)
    pages.bind_copy(5, 11, references=2, writable=False)
    pages.bind_copy(7, 12, references=1, writable=False)
    return pages


def test_copied_pages_keep_their_ids_and_unknown_ids_are_refused(m):
    assert m.physical([3, 5, 7, 3]) == [10, 11, 12, 10]
    with pytest.raises(PageRefused, match="page 4 is not held by this inferlet"):
        m.physical([3, 4])
    assert m.virtual([12, 10]) == [7, 3]  # the worker's ids back as the inferlet's


def test_read_only_stays_read_only_after_the_copy(m):
    m.require_writable([3])
    for page in (5, 7):
        with pytest.raises(PageRefused, match=f"page {page} is shared .* read-only"):
            m.require_writable([3, page])


def test_new_pages_are_named_by_their_own_id_unless_a_copy_uses_it(m):
    assert m.virtual([20, 3, 21]) == [20, FRESH_IDS_FROM, 21]  # 3 is the inferlet's id of physical 10
    assert m.physical([20, FRESH_IDS_FROM, 21]) == [20, 3, 21]
    assert m.virtual([3]) == [FRESH_IDS_FROM]  # the same page, the same id
    m.require_writable([FRESH_IDS_FROM])


def test_extra_references_are_dropped_here_and_the_last_one_by_the_worker(m):
    assert m.to_free([5]) == []  # one of its two references to 5: the worker holds one for both
    assert m.to_free([5, 5]) == [11]
    assert m.to_free([5]) == []  # to_free changes nothing by itself
    m.freed([5])
    assert m.to_free([5]) == [11]
    m.freed([5])
    with pytest.raises(PageRefused, match="page 5 is not held"):
        m.to_free([5])
    # the worker may hand physical 11 out again: it is a new page, writable, under its own id
    assert m.virtual([11]) == [11]
    m.require_writable([11])


def test_a_freed_read_only_copy_does_not_make_its_next_page_read_only(m):
    assert m.to_free([7]) == [12]
    m.freed([7])
    assert m.virtual([12]) == [12]
    m.require_writable([12])
    assert m.virtual([7]) == [7]  # physical 7 on the new worker: its own id is free again


def test_carried_gives_the_next_move_what_the_inferlet_knows(m):
    assert m.carried(10, 1, True) == (3, 1, True)
    assert m.carried(11, 1, True) == (5, 2, False)  # the worker's one reference, plus the map's extra one
    assert m.carried(30, 2, False) == (30, 2, False)  # a page imported after the move: the worker's own count


def test_fresh_ids_skip_the_ids_a_moved_inferlet_already_uses():
    """A second move carries a page named by the first map's fresh id: the new map must not hand that id
    out again (found by python -m cluster.bench.moves: two pages under one id after three moves)."""
    pages = PageMap()
    pages.bind_copy(0, 7, references=1, writable=True)
    pages.bind_copy(FRESH_IDS_FROM, 8, references=1, writable=True)  # carried from the previous map
    assert pages.virtual([0]) == [FRESH_IDS_FROM + 1]  # physical 0: id 0 is taken, and so is the first fresh one
    assert pages.physical([0, FRESH_IDS_FROM, FRESH_IDS_FROM + 1]) == [7, 8, 0]
