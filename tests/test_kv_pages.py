"""The page allocator, the paged KV store and its sizing arithmetic."""
import numpy as np
import pytest
import torch

import workers
from helpers import build_tiny_model
from workers.errors import InvalidRequestError, PageStateError
from workers.kv_cache import PagedKVCache, page_bytes, pages_for_budget
from workers.model_config import ModelConfig
from workers.page_allocator import PageAllocator

TINY = ModelConfig(architecture="llama", num_layers=3, hidden_size=32, intermediate_size=64, num_heads=4,
                   num_kv_heads=2, head_dim=8, vocab_size=100, rope_theta=10000.0, rms_norm_eps=1e-5,
                   max_position=128, tie_word_embeddings=True)


# --- PageAllocator -----------------------------------------------------------------------------

def test_allocator_hands_out_lowest_ids_in_order():
    a = PageAllocator(6)
    assert a.allocate(3) == [0, 1, 2]
    assert a.allocate(2) == [3, 4]
    assert (a.num_free, a.num_allocated) == (1, 5)
    assert a.allocate(0) == []
    a.check_invariant()


def test_allocator_refuses_when_too_few_and_changes_nothing():
    a = PageAllocator(4)
    assert a.allocate(3) == [0, 1, 2]
    assert a.allocate(2) is None
    assert a.num_free == 1 and not a.can_allocate(2) and a.can_allocate(1)
    assert a.allocate(1) == [3]
    assert a.allocate(1) is None
    a.check_invariant()
    with pytest.raises(ValueError):
        a.allocate(-1)
    with pytest.raises(ValueError):
        PageAllocator(0)


def test_allocator_free_and_reuse():
    a = PageAllocator(5)
    pages = a.allocate(5)
    a.free([1, 3])
    assert a.num_free == 2 and not a.is_allocated(1) and a.is_allocated(2)
    assert sorted(a.allocate(2)) == [1, 3]  # freed pages are handed out again
    a.free(pages)
    assert a.num_free == 5
    a.check_invariant()


@pytest.mark.parametrize("bad", [[2], [7], [0, 0], [0, 9]])
def test_allocator_bad_free_raises_and_frees_nothing(bad):
    a = PageAllocator(5)
    a.allocate(2)  # 0 and 1
    if bad == [2]:
        a.allocate(1)
        a.free([2])  # now 2 is free again: freeing it twice is the error
    with pytest.raises(PageStateError):
        a.free(bad)
    assert a.is_allocated(0) and a.is_allocated(1)  # all or nothing
    a.check_invariant()


def test_allocator_invariant_over_random_operations():
    a = PageAllocator(20)
    rng = np.random.default_rng(0)
    owned: list[int] = []
    for _ in range(300):
        if owned and rng.random() < 0.5:
            k = int(rng.integers(1, len(owned) + 1))
            give = [owned.pop(int(rng.integers(len(owned)))) for _ in range(k)]
            a.free(give)
        else:
            got = a.allocate(int(rng.integers(0, 5)))
            if got is not None:
                assert not set(got) & set(owned)
                owned += got
        a.check_invariant()
        assert a.num_allocated == len(owned) and a.num_free == 20 - len(owned)


# --- PagedKVCache --------------------------------------------------------------------------------

def filled_cache(page_size: int = 6, num_pages: int = 5, dtype: torch.dtype = torch.float32) -> PagedKVCache:
    kv = PagedKVCache(TINY, num_pages, page_size, dtype, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for t in kv.layers:
        t.copy_(torch.randn(t.shape, generator=g))
    kv.set_slot_mask(1, [False, True, True, False, True, False])
    return kv


def mask_of(kv: PagedKVCache) -> np.ndarray:
    m = kv.slot_masked
    return (m.cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)).copy()


def test_kv_layout():
    kv = filled_cache()
    assert len(kv.layers) == TINY.num_layers
    assert kv.layers[0].shape == (5, 2, 6, TINY.num_kv_heads, TINY.head_dim)
    flat = kv.flat(2)
    # keys of page p start at row 2 * p * page_size, values at (2p + 1) * page_size
    assert torch.equal(flat[2 * 3 * 6 + 4], kv.layers[2][3, 0, 4])
    assert torch.equal(flat[(2 * 3 + 1) * 6 + 4], kv.layers[2][3, 1, 4])


def test_copy_slots_copies_keys_values_and_mask_bits_in_every_layer():
    kv = filled_cache()
    before = [t.clone() for t in kv.layers]
    mask_before = mask_of(kv)
    kv.copy_slots(1, 3, 1, 2, 3)  # slots 1..3 of page 1 -> slots 2..4 of page 3
    for t, old in zip(kv.layers, before):
        assert torch.equal(t[3, :, 2:5], old[1, :, 1:4])  # keys and values
        assert torch.equal(t[3, :, :2], old[3, :, :2]) and torch.equal(t[3, :, 5:], old[3, :, 5:])
        assert torch.equal(t[:3], old[:3]) and torch.equal(t[4], old[4])  # nothing else moved
    mask = mask_of(kv)
    assert mask[3].tolist() == [False, False, True, True, False, False]
    np.testing.assert_array_equal(np.delete(mask, 3, 0), np.delete(mask_before, 3, 0))


def test_copy_slots_within_a_page_reads_before_writing():
    kv = filled_cache()
    before = [t.clone() for t in kv.layers]
    kv.copy_slots(2, 2, 0, 1, 4)  # overlapping: slots 0..3 -> 1..4
    for t, old in zip(kv.layers, before):
        assert torch.equal(t[2, :, 1:5], old[2, :, 0:4])


@pytest.mark.parametrize("args", [(5, 0, 0, 0, 1), (0, 5, 0, 0, 1), (-1, 0, 0, 0, 1), (0, 1, 4, 0, 3),
                                  (0, 1, 0, 5, 2), (0, 1, -1, 0, 1), (0, 1, 0, 0, -1), (0, 1, 0, 0, 7)])
def test_copy_slots_out_of_range_raises(args):
    kv = filled_cache()
    before = [t.clone() for t in kv.layers]
    with pytest.raises(InvalidRequestError):
        kv.copy_slots(*args)
    assert all(torch.equal(t, old) for t, old in zip(kv.layers, before))


def test_slot_masks_set_and_reset():
    kv = filled_cache()
    with pytest.raises(InvalidRequestError):
        kv.set_slot_mask(0, [True] * 5)
    with pytest.raises(InvalidRequestError):
        kv.set_slot_mask(5, [True] * 6)
    kv.set_slot_mask(4, [True] * 6)
    kv.reset_pages([1, 4])
    assert not mask_of(kv).any()


# --- sizing -------------------------------------------------------------------------------------

def test_pages_for_budget_arithmetic(smollm2):
    c = smollm2.config
    # SmolLM2: 30 layers x (K and V) x 16 slots x 3 KV heads x 64 dims, 2 bytes each in bf16
    assert page_bytes(c, 16, torch.bfloat16) == 30 * 2 * 16 * 3 * 64 * 2 == 368640
    assert page_bytes(c, 16, torch.float32) == 2 * page_bytes(c, 16, torch.bfloat16)
    assert pages_for_budget(c, 16, torch.bfloat16, 1 << 30) == (1 << 30) // 368640 == 2912
    assert pages_for_budget(c, 16, torch.float32, 1 << 30) == 1456
    assert pages_for_budget(c, 1, torch.bfloat16, 368640) == 16
    assert pages_for_budget(c, 16, torch.bfloat16, 368640 * 3 - 1) == 2
    with pytest.raises(ValueError):
        pages_for_budget(c, 16, torch.bfloat16, 368639)


def test_executor_sizes_its_cache_from_the_budget(tmp_path):
    build_tiny_model(str(tmp_path), "llama")
    loaded = workers.load_model(str(tmp_path), progress=lambda *a: None)
    per_page = page_bytes(loaded.config, 8, torch.float32)
    ex = workers.TorchExecutor(loaded, dtype="fp32", page_size=8, kv_budget_bytes=10 * per_page + per_page // 2)
    assert ex.info.num_pages == ex.num_free_pages == 10
    assert ex.allocate_pages(11) is None
    pages = ex.allocate_pages(10)
    assert sorted(pages) == list(range(10)) and ex.num_free_pages == 0
    ex.free_pages(pages)
    ex.check_idle_invariant()
    with pytest.raises(PageStateError):
        ex.free_pages(pages[:1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_pages_then_write_pages_moves_keys_values_and_masks_to_another_cache(dtype):
    src = filled_cache(dtype=dtype)
    src.set_slot_mask(3, [True, False, True, False, False, True])
    data = src.read_pages([3, 1])
    assert len(data) == 2 * src.page_record_bytes()
    dst = PagedKVCache(TINY, num_pages=5, page_size=6, dtype=dtype, device=torch.device("cpu"))
    dst.write_pages([0, 4], data)  # page 3 -> 0, page 1 -> 4
    for s, d in zip(src.layers, dst.layers):
        assert torch.equal(d[0], s[3]) and torch.equal(d[4], s[1])
        assert not d[1:4].any()  # nothing else written
    assert mask_of(dst)[0].tolist() == [True, False, True, False, False, True]
    assert mask_of(dst)[4].tolist() == mask_of(src)[1].tolist() == [False, True, True, False, True, False]


def test_write_pages_refuses_data_of_another_shape_and_changes_nothing():
    src = filled_cache()
    data = src.read_pages([1, 2])
    dst = PagedKVCache(TINY, num_pages=5, page_size=6, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(InvalidRequestError, match="different model or dtype"):
        dst.write_pages([0], data)  # two pages of data for one page
    with pytest.raises(InvalidRequestError):
        dst.write_pages([7, 0], data)  # out of range
    assert all(not t.any() for t in dst.layers)
