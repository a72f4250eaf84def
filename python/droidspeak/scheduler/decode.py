"""Decode batches: one new token per running request, and retraction when the
KV pool cannot hold the next token of every running request."""
from __future__ import annotations

import torch

from droidspeak.kvcache.base import PrefixCache
from droidspeak.kvcache.lease import grow_each
from droidspeak.kvcache.pool import SlotAllocator
from droidspeak.runner.batch import ForwardBatch, ForwardMode, stack_e_loc
from droidspeak.scheduler.request import Req


def retraction_order(running: list[Req]) -> list[Req]:
    """Victims first: the request with the fewest output tokens, then the longest
    prompt (it is cheapest to redo relative to what it frees)."""
    return sorted(running, key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)))


def make_room_for_decode(running: list[Req], cache: PrefixCache, allocator: SlotAllocator) -> list[Req]:
    """Evict cached entries, then retract requests, until every remaining running
    request can get one slot. Returns the retracted requests (their KV released;
    they keep their output tokens and are re-prefilled later)."""
    retracted = []
    victims = retraction_order(running)
    while running and not allocator.can_allocate(len(running)):
        cache.evict(len(running) - allocator.available_size)
        if allocator.can_allocate(len(running)):
            break
        victim = victims.pop(0)
        running.remove(victim)
        victim.release_kv()
        victim.num_retractions += 1
        retracted.append(victim)
    return retracted


def build_decode_batch(running: list[Req], allocator: SlotAllocator, runner,
                       is_sender=None) -> ForwardBatch:
    """`is_sender(variant)`: whether a variant keeps an E cache (cross-model senders)."""
    table = runner.req_to_token_pool.table
    slots = allocator.allocate(len(running))
    e_locs = [runner.e_allocator.allocate(1) if is_sender is not None and is_sender(r.cache_variant) else None
              for r in running]
    rows, kv_lens = grow_each([r.kv for r in running], slots, e_locs)  # positions = every kv_len
    batch = ForwardBatch(
        mode=ForwardMode.DECODE,
        input_ids=torch.tensor([r.output_ids[-1] for r in running], dtype=torch.int64),
        positions=kv_lens,
        out_cache_loc=slots,
        req_pool_indices=rows,
        seq_lens=kv_lens + 1,
        prefix_lens=kv_lens.tolist(),
        extend_lens=[1] * len(running),
        kv_pool=runner.kv_pool,
        req_to_token=table,
        model_ids=[r.model_id for r in running],
        lora_ids=[r.lora_id for r in running],
    )
    batch.e_pool, batch.e_loc = runner.e_pool, stack_e_loc(e_locs, [1] * len(running))
    return batch
