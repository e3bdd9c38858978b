"""The worker's prefix cache in the PageRegistry, on the real executor: exact pages handed out,
least-recently-used eviction, pages in use never evicted, the budget, read-only cached pages,
and every page back once the cache is dropped."""
import pytest

from cluster.worker.page_registry import PageRefused, PageRegistry
from cluster.worker.prefix_hashes import block_hashes

PAGE = 16


def hashes(tokens, key="model\0program/tenant"):
    return list(block_hashes(tokens, PAGE, key))


@pytest.fixture
def reg(ex32):
    registry = PageRegistry(ex32, max_cached_pages=4)
    yield registry
    for holder in ("a", "b"):
        registry.drop_holder(holder)
    registry.drop_cache()
    registry.check_idle()


def cache_as(reg, holder, tokens):
    """Allocate pages for `tokens` as `holder`, offer them, and end the holder: what the cache took."""
    pages = reg.allocate(holder, len(tokens) // PAGE, quota=64)
    taken = reg.cache_store(holder, hashes(tokens), pages)
    reg.drop_holder(holder)
    return pages, taken


def test_a_later_holder_gets_the_same_pages_for_the_same_prefix(reg, ex32):
    free = ex32.num_free_pages
    tokens = list(range(3 * PAGE))
    pages, taken = cache_as(reg, "a", tokens)
    assert taken == 3 and reg.num_cached() == 3
    assert ex32.num_free_pages == free - 3  # the cache holds them after their holder ended
    # a prompt that shares the first two pages and then differs
    other = tokens[:2 * PAGE] + [999] * PAGE + [5]
    assert reg.cache_lookup("b", hashes(other)) == pages[:2]
    assert reg.num_held("b") == 2
    with pytest.raises(PageRefused, match="read-only"):
        reg.require_writable("b", pages[:1])
    reg.drop_holder("b")
    assert ex32.num_free_pages == free - 3


def test_another_scope_never_sees_the_pages(reg):
    tokens = list(range(2 * PAGE))
    cache_as(reg, "a", tokens)
    assert reg.cache_lookup("b", hashes(tokens, key="model\0program/other-tenant")) == []
    assert reg.cache_lookup("b", hashes(tokens, key="model\0other-program/tenant")) == []
    assert reg.cache_lookup("b", hashes([7] + tokens[1:])) == []  # the first block differs: nothing matches


def test_the_budget_evicts_least_recently_used_first(reg, ex32):
    free = ex32.num_free_pages
    first, _ = cache_as(reg, "a", list(range(2 * PAGE)))  # 2 pages
    second, _ = cache_as(reg, "a", list(range(100, 100 + 2 * PAGE)))  # 2 more: the budget of 4 is full
    assert reg.cache_lookup("b", hashes(list(range(2 * PAGE)))) == first  # `first` is now the most recent
    reg.drop_holder("b")
    third, taken = cache_as(reg, "a", list(range(200, 200 + PAGE)))  # evicts the oldest: second[0]
    assert taken == 1 and reg.num_cached() == 4
    assert reg.cache_lookup("b", hashes(list(range(100, 100 + 2 * PAGE)))) == []
    assert reg.cache_lookup("b", hashes(list(range(2 * PAGE)))) == first
    reg.drop_holder("b")
    assert ex32.num_free_pages == free - 4


def test_pages_in_use_are_not_evicted(reg):
    cached, _ = cache_as(reg, "a", list(range(4 * PAGE)))  # the whole budget
    assert reg.cache_lookup("b", hashes(list(range(4 * PAGE)))) == cached  # b holds all four
    _, taken = cache_as(reg, "a", list(range(500, 500 + PAGE)))
    assert taken == 0 and reg.num_cached() == 4  # nothing could make room
    reg.drop_holder("b")
    _, taken = cache_as(reg, "a", list(range(500, 500 + PAGE)))
    assert taken == 1


def test_allocation_evicts_cached_pages_rather_than_fail(ex32):
    reg = PageRegistry(ex32, max_cached_pages=ex32.info.num_pages)
    try:
        free = ex32.num_free_pages
        cache_as(reg, "a", list(range(3 * PAGE)))
        assert ex32.num_free_pages == free - 3
        everything = reg.allocate("b", free, quota=10 * free)  # needs the cached pages back
        assert len(everything) == free and reg.num_cached() == 0
        reg.drop_holder("b")
        assert ex32.num_free_pages == free
    finally:
        reg.drop_holder("b")
        reg.drop_cache()
    reg.check_idle()


def test_store_checks_what_it_is_given(reg):
    pages = reg.allocate("a", 2, quota=8)
    with pytest.raises(PageRefused, match="2 block hashes for 1 pages"):
        reg.cache_store("a", hashes(list(range(2 * PAGE))), pages[:1])
    with pytest.raises(PageRefused, match="not held"):
        reg.cache_store("b", hashes(list(range(2 * PAGE))), pages)
    assert reg.num_cached() == 0
    # the same block offered twice keeps the first page
    assert reg.cache_store("a", hashes(list(range(PAGE))), pages[:1]) == 1
    assert reg.cache_store("a", hashes(list(range(PAGE))), pages[1:]) == 0
