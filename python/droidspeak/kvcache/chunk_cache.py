"""The prefix cache used with --disable-radix-cache: it caches nothing, so every
request owns all of its slots and frees them when it ends."""
from __future__ import annotations

import torch

from droidspeak.kvcache.base import MatchResult, PrefixCache


class NoPrefixCache(PrefixCache):
    keeps_entries = False

    def match_prefix(self, key, variant=0, senders=None):
        return MatchResult(torch.empty((self.allocator.num_spaces, 0), dtype=torch.int64), None)

    def insert(self, key, variant, slots, erows=None):
        pass  # nothing is kept: the caller's references are the last ones

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
