"""The prefix cache used with --disable-radix-cache: it caches nothing, so every
request owns all of its slots and frees them when it ends."""
from __future__ import annotations

import torch

from droidspeak.kvcache.base import MatchResult, PrefixCache


class NoPrefixCache(PrefixCache):
    def match_prefix(self, key):
        return MatchResult(torch.empty(0, dtype=torch.int64), None)

    def insert(self, key, slots):
        self.allocator.free(slots)  # nothing is kept: give the slots back
        return 0

    def evict(self, num_tokens):
        return 0

    def lock(self, node):
        pass

    def unlock(self, node):
        pass

    @property
    def evictable_size(self):
        return 0

    @property
    def protected_size(self):
        return 0

    def reset(self):
        pass

    def cache_unfinished_req(self, req):
        pass  # the request keeps owning its slots
