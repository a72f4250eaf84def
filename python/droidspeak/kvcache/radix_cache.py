"""Radix tree over token ids whose nodes own pool slots (SGLang's RadixCache,
page size 1). Evictable leaves are tracked as the tree changes, so eviction never
rescans the tree."""
from __future__ import annotations

import heapq
import itertools

import torch

from droidspeak.kvcache.base import MatchResult, PrefixCache
from droidspeak.kvcache.pool import ReqToTokenPool, SlotAllocator


class TreeNode:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access")

    def __init__(self, key: list[int], value: torch.Tensor, parent: "TreeNode | None"):
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.key = key
        self.value = value
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
    def __init__(self, req_to_token_pool: ReqToTokenPool, allocator: SlotAllocator):
        super().__init__(req_to_token_pool, allocator)
        self._clock = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        self.root = TreeNode([], torch.empty(0, dtype=torch.int64), None)
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

    def _walk(self, key: list[int]) -> tuple[TreeNode, int, list[torch.Tensor]]:
        """Follow `key` down the tree, splitting the last node so that it ends
        exactly at the match; touches every node on the path. Returns the deepest
        matched node, the matched length and the matched nodes' slot tensors."""
        node, values, pos = self.root, [], 0
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
            values.append(child.value)
            node, pos = child, pos + n
        return node, pos, values

    def match_prefix(self, key: list[int]) -> MatchResult:
        node, _, values = self._walk(key)
        indices = torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
        return MatchResult(indices, node)

    def insert(self, key: list[int], slots: torch.Tensor) -> int:
        node, pos, _ = self._walk(key)
        if pos < len(key):
            leaf = TreeNode(list(key[pos:]), slots[pos:].clone(), node)
            leaf.last_access = node.last_access
            self._evictable_leaves.discard(node)
            node.children[key[pos]] = leaf
            self._evictable_size += len(leaf.key)
            self._evictable_leaves.add(leaf)
        return pos

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child` after its first n tokens; returns the new upper node."""
        upper = TreeNode(child.key[:n], child.value[:n], child.parent)
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.children[child.key[n]] = child
        child.parent.children[child.key[0]] = upper
        child.parent = upper
        child.key, child.value = child.key[n:], child.value[n:]
        return upper

    def evict(self, num_tokens: int) -> int:
        heap = list(self._evictable_leaves)
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            leaf = heapq.heappop(heap)
            if leaf not in self._evictable_leaves:
                continue
            self.allocator.free(leaf.value)
            freed += len(leaf.key)
            self._evictable_size -= len(leaf.key)
            self._evictable_leaves.discard(leaf)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            if parent is not self.root and parent.is_leaf and parent.lock_ref == 0:
                self._evictable_leaves.add(parent)
                heapq.heappush(heap, parent)
        return freed

    def lock(self, node: TreeNode | None) -> None:
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                self._evictable_size -= len(node.key)
                self._protected_size += len(node.key)
                self._evictable_leaves.discard(node)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode | None) -> None:
        while node is not None and node is not self.root:
            assert node.lock_ref > 0, "unlock without lock"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable_size += len(node.key)
                self._protected_size -= len(node.key)
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
