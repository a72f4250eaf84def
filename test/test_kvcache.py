"""Radix cache, slot allocator and request-to-token pool."""
import pytest
import torch

from droidspeak.kvcache.chunk_cache import NoPrefixCache
from droidspeak.kvcache.lease import Leases
from droidspeak.kvcache.pool import KVPool, LayerSegments, ReqToTokenPool, SlotAllocator
from droidspeak.kvcache.radix_cache import RadixCache


def make_cache(size=100):
    alloc = SlotAllocator(size)
    return RadixCache(ReqToTokenPool(4, 64), alloc), alloc


def put(cache, alloc, key, variant=0):
    slots = alloc.allocate(len(key))
    cache.insert(key, variant, slots)
    alloc.free(slots)  # insert took its own references
    return slots[0]


def slots_of(match):
    return match.indices[0].tolist()


def test_allocator_free_list():
    alloc = SlotAllocator(10)
    a = alloc.allocate(4)
    assert a.tolist() == [[1, 2, 3, 4]] and alloc.available_size == 6
    assert not alloc.can_allocate(7) and alloc.can_allocate(6)
    alloc.free(a[:, :2])
    b = alloc.allocate(8)
    assert len(set(b[0].tolist())) == 8 and 0 not in b[0].tolist()
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
    assert slots_of(m) == s1[:3].tolist()
    # the match split the node: [1,2,3] -> [4,5]
    assert cache.node_count() == 2
    assert m.last_node.key == [1, 2, 3]
    s2 = put(cache, alloc, [1, 2, 3, 7, 8])
    assert slots_of(cache.match_prefix([1, 2, 3, 7, 8])) == s1[:3].tolist() + s2[3:].tolist()
    assert cache.match_prefix([9]).length == 0
    assert alloc.available_size == 100 - 7  # s2's duplicate first three slots were freed
    assert cache.total_size == 7


def test_eviction_is_lru_over_unlocked_leaves():
    cache, alloc = make_cache(20)
    a = put(cache, alloc, [1, 2, 3])
    b = put(cache, alloc, [4, 5, 6])
    c = put(cache, alloc, [7, 8, 9])
    cache.match_prefix([1, 2, 3])  # touch a: now b is the least recently used
    assert cache.evict(1) == 3
    assert cache.match_prefix([4, 5, 6]).length == 0
    assert slots_of(cache.match_prefix([1, 2, 3])) == a.tolist()
    assert cache.evict(1) == 3  # then c (a was touched after c was inserted)
    assert cache.match_prefix([7, 8, 9]).length == 0
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
    assert cache.match_prefix([1, 2, 3, 4]).length == 4
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
    assert cache.total_size == 0 and cache.match_prefix([1, 2, 3]).length == 0


def test_no_prefix_cache_keeps_nothing():
    alloc = SlotAllocator(10)
    cache = NoPrefixCache(ReqToTokenPool(2, 8), alloc)
    put(cache, alloc, [1, 2, 3, 4])
    assert alloc.available_size == 10 and alloc.num_referenced == 0
    assert cache.match_prefix([1, 2, 3]).length == 0


def test_allocator_reference_counts_per_space():
    alloc = SlotAllocator(6, num_spaces=3)
    a = alloc.allocate(2)                     # [3, 2]: one slot per space per token
    assert a.shape == (3, 2) and alloc.available_size == 4
    b = alloc.allocate(3, range(1, 2))        # space 1 only
    assert alloc.available_size == 1 and alloc._count == [4, 1, 4]
    alloc.share(a[:2], range(0, 2))           # a second holder of spaces 0 and 1
    alloc.free(a)
    assert alloc._count == [4, 1, 6]          # space 2 is free; spaces 0 and 1 keep the shared reference
    alloc.free(a[:2], range(0, 2))
    alloc.free(b, range(1, 2))
    assert alloc._count == [6, 6, 6] and alloc.num_referenced == 0
    alloc.free(torch.zeros((3, 4), dtype=torch.int64))  # padding slot 0 is ignored
    assert alloc.num_referenced == 0


def test_double_free_is_caught():
    alloc = SlotAllocator(4)
    a = alloc.allocate(2)
    alloc.free(a)
    try:
        alloc.free(a)
    except AssertionError:
        return
    raise AssertionError("a double free went unnoticed")


def test_layer_segments():
    seg = LayerSegments(6, (2, 4))
    assert seg.bounds == (0, 2, 4, 6) and seg.segment_of == [0, 0, 1, 1, 2, 2]
    assert seg.covering(2, 6) == range(1, 3) and seg.covering(0, 0) == range(0, 0)
    try:
        seg.covering(1, 4)
    except ValueError as e:
        assert "not aligned" in str(e)
    else:
        raise AssertionError("an unaligned group was accepted")


def make_family_cache(size=40, spaces=3, e_layers=1):
    alloc, e_alloc = SlotAllocator(size, spaces), SlotAllocator(size, e_layers)
    return RadixCache(ReqToTokenPool(4, 64, spaces), alloc, e_alloc), alloc, e_alloc


def put_variant(cache, alloc, e_alloc, key, variant, with_e=True):
    slots = alloc.allocate(len(key))
    erows = e_alloc.allocate(len(key)) if with_e else None
    cache.insert(key, variant, slots, erows)
    alloc.free(slots)
    if erows is not None:
        e_alloc.free(erows)
    return slots, erows


def test_lineage_tree_exact_and_cross_hits():
    cache, alloc, e_alloc = make_family_cache()
    a_slots, a_e = put_variant(cache, alloc, e_alloc, [1, 2, 3, 4, 5], variant=1)
    # variant 2 has no entry: no exact hit, but a cross hit on variant 1's entry
    m = cache.match_prefix([1, 2, 3, 4, 9], variant=2, senders={1: 0})
    assert m.length == 0 and m.cross.sender == 1 and m.cross.start == 0
    assert m.cross.indices.tolist() == a_slots[:, :4].tolist() and m.cross.erows.tolist() == a_e[:, :4].tolist()
    assert m.last_node.key == [1, 2, 3, 4]
    # without a profile for the pair (no senders) it is a miss
    assert cache.match_prefix([1, 2, 3, 4], variant=2).cross is None
    # a sender without the E cache the receiver needs is not a hit
    put_variant(cache, alloc, e_alloc, [7, 8, 9], variant=3, with_e=False)
    assert cache.match_prefix([7, 8, 9], variant=2, senders={3: 0}).cross is None
    # variant 2 caches [1, 2, 3] itself: exact for 3 tokens, cross for the 4th
    put_variant(cache, alloc, e_alloc, [1, 2, 3], variant=2, with_e=False)
    m = cache.match_prefix([1, 2, 3, 4, 5], variant=2, senders={1: 0})
    assert m.length == 3 and m.cross.start == 3 and m.cross.length == 2


def test_shared_slots_are_freed_once_with_their_node():
    cache, alloc, e_alloc = make_family_cache(size=10)
    a_slots, _ = put_variant(cache, alloc, e_alloc, [1, 2, 3, 4], variant=1)
    # variant 2 reuses variant 1's slots in segments 0 and 2, recomputed segment 1
    own = alloc.allocate(4, range(1, 2))
    mixed = a_slots.clone()
    mixed[1] = own[0]
    cache.insert([1, 2, 3, 4], 2, mixed)
    alloc.free(own, range(1, 2))
    assert alloc._count == [6, 2, 6]              # only the recomputed segment took memory
    assert int(alloc.refs[0, a_slots[0]].min()) == 2  # shared slots have two holders
    assert cache.evict(100) == 4
    assert alloc._count == [10, 10, 10] and alloc.num_referenced == 0
    assert e_alloc.available_size == 10 and e_alloc.num_referenced == 0


def lease_on(cache, leases, key, variant=0, senders=None):
    """A lease as admission opens one: the matched prefix locked and pointed at."""
    m = cache.match_prefix(key, variant, senders)
    lease = leases.open(object(), variant)
    lease.node = m.last_node
    cache.lock(m.last_node)
    lease.point(0, m.indices)
    lease.prefix_len = lease.kv_len = lease.end = m.length
    return lease


def test_a_released_lease_gives_back_everything_it_took():
    cache, alloc, e_alloc = make_family_cache()
    leases = Leases(cache, cache.req_to_token_pool)
    put_variant(cache, alloc, e_alloc, [1, 2, 3, 4], 0)
    free, e_free, rows = alloc._count.copy(), e_alloc.available_size, cache.req_to_token_pool.available_size
    lease = lease_on(cache, leases, [1, 2, 3, 4, 5], 1, senders={0: 0})  # variant 1 reuses 0's [0, 4)
    m = cache.match_prefix([1, 2, 3, 4, 5], 1, senders={0: 0})
    assert m.length == 0 and m.cross.length == 4 and cache.protected_size == 4
    lease.point(0, m.cross.indices)
    lease.prefix_len = lease.kv_len = lease.end = 4
    lease.hold_cross(range(1, 2), 1, 2)  # segment 1 recomputed over [2, 4) and the sink [0, 1)
    lease.grow(3, with_e=True)  # the extend's slots, still pending
    assert len(leases) == 1 and alloc._count != free
    lease.release()
    assert alloc._count == free and e_alloc.available_size == e_free
    assert cache.req_to_token_pool.available_size == rows and len(leases) == 0
    assert cache.protected_size == 0 and cache.evictable_size == 4
    with pytest.raises(RuntimeError, match="closed twice"):
        lease.release()


def test_a_committed_lease_leaves_its_kv_to_the_cache():
    cache, alloc = make_cache(20)
    leases = Leases(cache, cache.req_to_token_pool)
    put(cache, alloc, [1, 2])
    lease = lease_on(cache, leases, [1, 2, 3, 4])
    assert lease.kv_len == 2 and cache.protected_size == 2  # the prefix is locked while leased
    lease.grow(2, with_e=False)
    lease.computed()
    lease.checkpoint([1, 2, 3, 4])
    assert lease.prefix_len == 4 and cache.protected_size == 4
    lease.grow(1, with_e=False)
    lease.computed()
    assert lease.commit([1, 2, 3, 4, 5]) == []
    assert cache.match_prefix([1, 2, 3, 4, 5]).length == 5 and cache.protected_size == 0
    assert alloc.available_size == 20 - 5 and len(leases) == 0
