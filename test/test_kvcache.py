"""Radix cache, slot allocator and request-to-token pool."""
import torch

from droidspeak.kvcache.chunk_cache import NoPrefixCache
from droidspeak.kvcache.pool import KVPool, ReqToTokenPool, SlotAllocator
from droidspeak.kvcache.radix_cache import RadixCache


def make_cache(size=100):
    alloc = SlotAllocator(size)
    return RadixCache(ReqToTokenPool(4, 64), alloc), alloc


def put(cache, alloc, key):
    slots = alloc.allocate(len(key))
    already = cache.insert(key, slots)
    alloc.free(slots[:already])  # the caller keeps ownership of duplicates
    return slots


def test_allocator_free_list():
    alloc = SlotAllocator(10)
    a = alloc.allocate(4)
    assert a.tolist() == [1, 2, 3, 4] and alloc.available_size == 6
    assert not alloc.can_allocate(7) and alloc.can_allocate(6)
    alloc.free(a[:2])
    b = alloc.allocate(8)
    assert len(set(b.tolist())) == 8 and 0 not in b.tolist()
    assert alloc.available_size == 0
    alloc.reset()
    assert alloc.available_size == 10


def test_req_to_token_pool_rows():
    pool = ReqToTokenPool(2, 8)
    r1, r2 = pool.allocate(), pool.allocate()
    assert {r1, r2} == {0, 1} and not pool.can_allocate()
    pool.free(r1)
    assert pool.available_size == 1


def test_kv_pool_padding_slot_and_size():
    pool = KVPool(16, num_layers=2, num_kv_heads=3, head_dim=4, dtype=torch.bfloat16)
    assert pool.k.shape == (2, 17, 3, 4)
    assert not pool.k[:, 0].any() and not pool.v[:, 0].any()
    assert KVPool.bytes_per_token(30, 3, 64, torch.bfloat16) == 23040


def test_match_insert_and_split():
    cache, alloc = make_cache()
    s1 = put(cache, alloc, [1, 2, 3, 4, 5])
    m = cache.match_prefix([1, 2, 3, 9])
    assert m.indices.tolist() == s1[:3].tolist()
    # the match split the node: [1,2,3] -> [4,5]
    assert cache.node_count() == 2
    assert m.last_node.key == [1, 2, 3]
    already = cache.insert([1, 2, 3, 7, 8], torch.tensor([50, 51, 52, 53, 54]))
    assert already == 3
    assert cache.match_prefix([1, 2, 3, 7, 8]).indices.tolist() == s1[:3].tolist() + [53, 54]
    assert cache.match_prefix([9]).indices.numel() == 0
    assert cache.total_size == 7


def test_eviction_is_lru_over_unlocked_leaves():
    cache, alloc = make_cache(20)
    a = put(cache, alloc, [1, 2, 3])
    b = put(cache, alloc, [4, 5, 6])
    c = put(cache, alloc, [7, 8, 9])
    cache.match_prefix([1, 2, 3])  # touch a: now b is the least recently used
    assert cache.evict(1) == 3
    assert cache.match_prefix([4, 5, 6]).indices.numel() == 0
    assert cache.match_prefix([1, 2, 3]).indices.tolist() == a.tolist()
    assert cache.evict(1) == 3  # then c (a was touched after c was inserted)
    assert cache.match_prefix([7, 8, 9]).indices.numel() == 0
    assert alloc.available_size == 20 - 3
    del b, c


def test_locked_nodes_and_ancestors_are_not_evicted():
    cache, alloc = make_cache(20)
    put(cache, alloc, [1, 2, 3, 4])
    put(cache, alloc, [1, 2, 9, 9])  # splits into [1,2] -> {[3,4], [9,9]}
    m = cache.match_prefix([1, 2, 3, 4])
    cache.lock(m.last_node)
    assert cache.protected_size == 4 and cache.evictable_size == 2
    assert cache.evict(100) == 2  # only [9,9] may go
    assert cache.match_prefix([1, 2, 3, 4]).indices.numel() == 4
    cache.unlock(m.last_node)
    assert cache.protected_size == 0 and cache.evictable_size == 4
    assert cache.evict(100) == 4  # leaf [3,4], then its parent [1,2] becomes a leaf
    assert cache.total_size == 0 and alloc.available_size == 20


def test_evictable_set_tracks_parents_that_become_leaves():
    cache, alloc = make_cache(30)
    put(cache, alloc, [1, 2])
    put(cache, alloc, [1, 2, 3, 4])  # [1,2] is no longer a leaf
    assert cache._evictable_leaves == {cache.match_prefix([1, 2, 3, 4]).last_node}
    assert cache.evict(1) == 2
    assert cache.match_prefix([1, 2]).last_node in cache._evictable_leaves


def test_reset_forgets_everything():
    cache, alloc = make_cache()
    put(cache, alloc, [1, 2, 3])
    cache.reset()
    assert cache.total_size == 0 and cache.match_prefix([1, 2, 3]).indices.numel() == 0


def test_no_prefix_cache_frees_on_insert():
    alloc = SlotAllocator(10)
    cache = NoPrefixCache(ReqToTokenPool(2, 8), alloc)
    slots = alloc.allocate(4)
    assert cache.insert([1, 2, 3, 4], slots) == 0
    assert alloc.available_size == 10
    assert cache.match_prefix([1, 2, 3]).indices.numel() == 0
