"""The radix prefix cache: longest-prefix match, splits, references and LRU eviction."""

from __future__ import annotations

import numpy as np

from lightllm_grpc.scheduler.allocator import IdAllocator
from lightllm_grpc.scheduler.radix_cache import RadixCache


def _cache(capacity: int = 100) -> tuple[RadixCache, IdAllocator]:
    pool = IdAllocator(capacity)
    return RadixCache(pool.free), pool


def _put(cache: RadixCache, pool: IdAllocator, tokens: list[int]):
    slots = pool.alloc(len(tokens))
    node, already = cache.insert(tokens, slots)
    pool.free(slots[:already])  # the caller frees its duplicates
    return node, slots


def test_match_returns_the_longest_prefix_and_splits_edges() -> None:
    cache, pool = _cache()
    _, slots = _put(cache, pool, [1, 2, 3, 4, 5])
    m = cache.match([1, 2, 3, 9])
    assert m.length == 3 and m.slots.tolist() == slots[:3].tolist()
    _, other = _put(cache, pool, [1, 2, 3, 9, 9])
    assert cache.total_tokens == 7 and pool.num_used == 7
    assert cache.match([1, 2, 3, 9, 9, 9]).slots.tolist() == [*slots[:3], *other[3:]]
    assert cache.match([7]).length == 0


def test_insert_keeps_the_cached_slots_and_reports_duplicates() -> None:
    cache, pool = _cache()
    _put(cache, pool, [1, 2, 3])
    slots = pool.alloc(4)
    _, already = cache.insert([1, 2, 3, 4], slots)
    assert already == 3 and cache.total_tokens == 4
    assert cache.match([1, 2, 3, 4]).slots[3] == slots[3]


def test_locked_nodes_survive_eviction_and_lru_goes_first() -> None:
    cache, pool = _cache()
    _put(cache, pool, [1, 2, 3])
    _put(cache, pool, [4, 5, 6])
    _put(cache, pool, [7, 8, 9])
    locked = cache.match([1, 2, 3]).node
    cache.lock(locked)
    cache.match([7, 8, 9])  # touched last: evicted last
    assert cache.locked_tokens == 3 and cache.evictable_tokens == 6 and cache.shared_tokens == 0
    cache.lock(locked)
    assert cache.shared_tokens == 3 and cache.locked_tokens == 3
    cache.unlock(locked)
    assert cache.shared_tokens == 0
    assert cache.evict(1) == 3
    assert cache.match([4, 5, 6]).length == 0 and cache.match([7, 8, 9]).length == 3
    assert cache.clear() == 3 and cache.match([1, 2, 3]).length == 3
    cache.unlock(locked)
    assert cache.clear() == 3 and pool.num_used == 0 and cache.total_tokens == 0


def test_eviction_climbs_to_parents_that_become_leaves() -> None:
    cache, pool = _cache()
    _put(cache, pool, [1, 2, 3, 4])
    _put(cache, pool, [1, 2, 5, 6])
    assert cache.evict(100) == 6 and pool.num_used == 0


def test_nodes_written_by_the_step_being_built_are_not_matched() -> None:
    cache, pool = _cache()
    slots = pool.alloc(4)
    cache.insert([1, 2, 3, 4], slots, step=7)
    m = cache.match([1, 2, 3, 4], before_step=7)
    assert m.length == 0 and m.blocked == 4
    assert cache.match([1, 2, 3, 4], before_step=8).length == 4
    assert np.array_equal(cache.match([1, 2, 3, 4]).slots, slots)
