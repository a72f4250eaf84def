"""Radix tree over token ids, one per model family (SGLang's RadixCache, page
size 1, keyed by lineage instead of by model). A node's token span holds one
entry per variant that cached it. Evictable leaves are tracked as the tree
changes, so eviction never rescans the tree; a node is evicted with all its
entries.

Sizes (evictable, protected) count token slots that eviction would return in
every KV segment: a node's weight is, summed over its entries, the tokens whose
slots the entry shares with no entry stored on the node before it (a cross-model
entry shares the sender's slots outside its recomputed layers, so its recomputed
tokens add to the weight only when those layers are every segment, as a tail
recompute of all layers is)."""
from __future__ import annotations

import heapq
import itertools
from typing import NamedTuple

import torch

from droidspeak.kvcache.base import CrossHit, MatchResult, PrefixCache
from droidspeak.kvcache.pool import ReqToTokenPool, SlotAllocator


class Entry(NamedTuple):
    slots: torch.Tensor         # [G, n] one slot per KV segment per token
    erows: torch.Tensor | None  # [E, n] E-cache rows (0 = not kept), None if none at all
    # [n] bool: tokens whose slots (in every segment) no earlier entry of the node
    # shares, i.e. what evicting the node frees for this entry; None: all of them
    own: torch.Tensor | None = None

    @property
    def own_tokens(self) -> int:
        return self.slots.shape[1] if self.own is None else int(self.own.sum())

    def split(self, n: int) -> tuple["Entry", "Entry"]:
        e, o = self.erows, self.own
        return (Entry(self.slots[:, :n], None if e is None else e[:, :n], None if o is None else o[:n]),
                Entry(self.slots[:, n:], None if e is None else e[:, n:], None if o is None else o[n:]))

    def has_e(self, index: int | None) -> bool:
        """Holds the E cache of layer `index` for every token (None: none needed)."""
        return index is None or (self.erows is not None and bool((self.erows[index] > 0).all()))


class TreeNode:
    __slots__ = ("children", "parent", "key", "entries", "weight", "lock_ref", "last_access")

    def __init__(self, key: list[int], parent: "TreeNode | None"):
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.key = key
        self.entries: dict[int, Entry] = {}
        self.weight = 0  # slots eviction returns in every segment (see the module docstring)
        self.lock_ref = 0
        self.last_access = 0

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __lt__(self, other: "TreeNode") -> bool:
        return self.last_access < other.last_access


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixCache(PrefixCache):
    def __init__(self, req_to_token_pool: ReqToTokenPool, allocator: SlotAllocator,
                 e_allocator: SlotAllocator | None = None):
        super().__init__(req_to_token_pool, allocator, e_allocator)
        self._clock = itertools.count(1)
        # kvstore.offload.KVOffloader: evicted chunks move down to the KV store instead
        # of vanishing; with write_through, finished requests' chunks are stored at once.
        self.offloader = None
        self.write_through = False
        self.reset()

    def reset(self) -> None:
        self.root = TreeNode([], None)
        self.root.lock_ref = 1  # the root is never evicted
        self._evictable_leaves: set[TreeNode] = set()
        self._evictable_size = 0
        self._protected_size = 0

    @property
    def evictable_size(self) -> int:
        return self._evictable_size

    @property
    def protected_size(self) -> int:
        return self._protected_size

    def _walk(self, key: list[int]) -> tuple[list[TreeNode], int]:
        """Follow `key` down the tree, splitting the last node so that it ends
        exactly at the match; touches every node on the path. Returns the matched
        nodes (root excluded) and the matched length."""
        node, path, pos = self.root, [], 0
        now = next(self._clock)
        node.last_access = now
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = _common_prefix_len(child.key, key[pos:pos + len(child.key)])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            path.append(child)
            node, pos = child, pos + n
        return path, pos

    def match_prefix(self, key: list[int], variant: int = 0,
                     senders: dict[int, int] | None = None) -> MatchResult:
        path, _ = self._walk(key)
        # A variant's entries are prefix-closed (insert covers the path from the
        # root), so its exact hit is the run of nodes from the root that hold one.
        exact = 0
        while exact < len(path) and variant in path[exact].entries:
            exact += 1
        own = [n.entries[variant].slots for n in path[:exact]]
        indices = torch.cat(own, dim=1) if own else torch.empty((self.allocator.num_spaces, 0), dtype=torch.int64)
        last = path[exact - 1] if exact else self.root
        best, best_end = None, exact
        for sender, e_index in (senders or {}).items():
            end = exact
            while end < len(path) and (entry := path[end].entries.get(sender)) is not None \
                    and entry.has_e(e_index):
                end += 1
            if end > best_end:
                best, best_end = sender, end
        if best is None:
            others = tuple(v for v in path[exact].entries if v != variant) if exact < len(path) else ()
            return MatchResult(indices, last, None, others)
        nodes = path[exact:best_end]
        erows = None
        if senders[best] is not None:
            erows = torch.cat([n.entries[best].erows for n in nodes], dim=1)
        cross = CrossHit(best, indices.shape[1], torch.cat([n.entries[best].slots for n in nodes], dim=1), erows)
        return MatchResult(indices, nodes[-1], cross)

    def insert(self, key: list[int], variant: int, slots: torch.Tensor,
               erows: torch.Tensor | None = None) -> TreeNode:
        path, pos = self._walk(key)
        start = 0
        for node in path:
            n = len(node.key)
            if variant not in node.entries:
                self._add_entry(node, variant, slots[:, start:start + n],
                                None if erows is None else erows[:, start:start + n])
            start += n
        if pos < len(key):
            parent = path[-1] if path else self.root
            leaf = TreeNode(list(key[pos:]), parent)
            leaf.last_access = parent.last_access
            self._evictable_leaves.discard(parent)
            parent.children[key[pos]] = leaf
            self._evictable_leaves.add(leaf)
            self._add_entry(leaf, variant, slots[:, pos:], None if erows is None else erows[:, pos:])
            return leaf
        return path[-1] if path else self.root

    def _add_entry(self, node: TreeNode, variant: int, slots: torch.Tensor, erows: torch.Tensor | None) -> None:
        """Store an entry on `node`, taking references to its slots and E rows."""
        slots = slots.clone()
        self.allocator.share(slots)
        if erows is not None and bool((erows > 0).any()):
            erows = erows.clone()
            self.e_allocator.share(erows)
        else:
            erows = None
        # Entries of one node cover the same tokens, so a shared slot sits at the same
        # position in both (a cross-model entry owns its recomputed tokens, the tail
        # and the attention sink, and shares the sender's between them).
        own = None
        for other in node.entries.values():
            shared = (slots == other.slots).any(dim=0)
            own = ~shared if own is None else own & ~shared
        if own is not None and bool(own.all()):
            own = None
        entry = node.entries[variant] = Entry(slots, erows, own)
        node.weight += entry.own_tokens
        if node.lock_ref:
            self._protected_size += entry.own_tokens
        else:
            self._evictable_size += entry.own_tokens

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child` after its first n tokens; returns the new upper node."""
        upper = TreeNode(child.key[:n], child.parent)
        for variant, entry in child.entries.items():
            upper.entries[variant], child.entries[variant] = entry.split(n)
        upper.weight = sum(e.own_tokens for e in upper.entries.values())
        child.weight -= upper.weight
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.children[child.key[n]] = child
        child.parent.children[child.key[0]] = upper
        child.parent = upper
        child.key = child.key[n:]
        return upper

    def evict(self, num_tokens: int) -> int:
        heap = list(self._evictable_leaves)
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            leaf = heapq.heappop(heap)
            if leaf not in self._evictable_leaves:
                continue
            if self.offloader is not None:
                self._offer(leaf, leaf.entries, from_start=False)
            for entry in leaf.entries.values():
                self.allocator.free(entry.slots)
                if entry.erows is not None:
                    self.e_allocator.free(entry.erows)
            freed += leaf.weight
            self._evictable_size -= leaf.weight
            self._evictable_leaves.discard(leaf)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            if parent is not self.root and parent.is_leaf and parent.lock_ref == 0:
                self._evictable_leaves.add(parent)
                heapq.heappush(heap, parent)
        return freed

    def _offer(self, node: TreeNode, variants, from_start: bool) -> list:
        """Hand `variants`' KV along the path to `node` to the offloader: the chunks
        that end inside `node` (or, `from_start`, every chunk of the path). Returns
        the futures of their writes in flight."""
        pending = []
        path = []
        while node is not self.root:
            path.append(node)
            node = node.parent
        path.reverse()
        tokens = [t for n in path for t in n.key]
        start = 0 if from_start else len(tokens) - len(path[-1].key)
        for variant in variants:
            entries = [n.entries.get(variant) for n in path]
            if any(e is None for e in entries):
                continue
            erows = None
            if any(e.erows is not None for e in entries):
                erows = torch.cat([e.erows if e.erows is not None else
                                   torch.zeros((self.num_e_layers, e.slots.shape[1]), dtype=torch.int64)
                                   for e in entries], dim=1)
            pending.extend(self.offloader.offer(tokens, start, variant, torch.cat([e.slots for e in entries], dim=1),
                                                erows))
        return pending

    def _stored(self, variant: int, node: TreeNode) -> list:
        if self.offloader is not None and self.write_through and node is not self.root:
            return self._offer(node, (variant,), from_start=True)
        return []

    def lock(self, node: TreeNode | None) -> None:
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                self._evictable_size -= node.weight
                self._protected_size += node.weight
                self._evictable_leaves.discard(node)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode | None) -> None:
        while node is not None and node is not self.root:
            assert node.lock_ref > 0, "unlock without lock"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable_size += node.weight
                self._protected_size -= node.weight
                if node.is_leaf:
                    self._evictable_leaves.add(node)
            node = node.parent

    def node_count(self) -> int:
        count, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(node.children.values())
        return count - 1
