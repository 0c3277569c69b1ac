"""A token-level radix tree over KV slots: the prefix cache (page size 1, as LightLLM).

Each edge holds a run of token ids and the KV slots that hold their K/V. A request that
starts with a cached prefix reuses those slots instead of recomputing them.

Contract:
- The tree owns the slots of every node. ``insert`` hands slots to the tree; slots the
  tree already had for the same tokens are not taken, and the caller keeps (and later
  frees) its duplicates.
- A node is *locked* while a live request reads it (``lock`` / ``unlock`` count
  references along the path to the root). Locked nodes are never evicted.
- ``evict`` frees unlocked leaves, least recently used first, through ``free_slots``;
  it runs only when the pool is short, so cached tokens stay until their room is needed.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

_clock = itertools.count()


@dataclass(eq=False)
class Node:
    tokens: np.ndarray  # int32 token ids on the edge into this node
    slots: np.ndarray  # int32 KV slots of those tokens
    parent: Node | None = None
    children: dict[int, Node] = field(default_factory=dict)
    refs: int = 0  # live requests whose prefix runs through this node
    last_use: int = 0
    step: int = -1  # the step whose prefill writes these slots (see RadixCache.match)
    depth: int = 0  # tokens from the root through this node's edge

    def shared_ancestor(self, within: int) -> Node | None:
        """The deepest node on the path to here, at most ``within`` tokens deep, that more
        than one live request has locked (None when there is none)."""
        node: Node | None = self
        while node is not None and node.parent is not None:
            if node.depth <= within and node.refs >= 2:
                return node
            node = node.parent
        return None

    def __len__(self) -> int:
        return int(self.tokens.size)


@dataclass
class Match:
    """The longest cached prefix of a sequence: ``slots`` of its first ``len(slots)`` tokens."""

    node: Node
    slots: np.ndarray
    # Tokens more that K/V written by the step being built would give: waiting a step for
    # them saves recomputing them.
    blocked: int = 0

    @property
    def length(self) -> int:
        return int(self.slots.size)


class RadixCache:
    def __init__(self, free_slots: Callable[[np.ndarray], None]) -> None:
        self.root = Node(np.empty(0, np.int32), np.empty(0, np.int32), refs=1)
        self._free = free_slots
        self.total_tokens = 0  # tokens held by the tree
        self.locked_tokens = 0  # of those, tokens on paths some live request has locked
        self.shared_tokens = 0  # of those, tokens more than one live request has locked

    @property
    def evictable_tokens(self) -> int:
        return self.total_tokens - self.locked_tokens

    # ---- lookup --------------------------------------------------------------------
    def match(self, tokens: Sequence[int] | np.ndarray, before_step: int | None = None) -> Match:
        """Longest cached prefix of ``tokens``.

        With ``before_step``, nodes whose slots are written by that step or a later one are
        not used: a prefill cannot read K/V that the same forward pass writes.
        """
        key = np.asarray(tokens, dtype=np.int32)
        node, pos, parts, blocked = self.root, 0, [], 0
        now = next(_clock)
        while pos < key.size:
            child = node.children.get(int(key[pos]))
            if child is not None and before_step is not None and child.step >= before_step:
                blocked = _common(child.tokens, key[pos:])
                break
            if child is None:
                break
            n = _common(child.tokens, key[pos:])
            if n < len(child):
                child = self._split(child, n)
            child.last_use = now
            parts.append(child.slots)
            node, pos = child, pos + n
        slots = np.concatenate(parts) if parts else np.empty(0, np.int32)
        return Match(node, slots, blocked)

    # ---- references ------------------------------------------------------------------
    def lock(self, node: Node) -> None:
        while node is not self.root:
            if node.refs == 0:
                self.locked_tokens += len(node)
            elif node.refs == 1:
                self.shared_tokens += len(node)
            node.refs += 1
            node = node.parent  # type: ignore[assignment]

    def unlocked_on_path(self, node: Node) -> int:
        """Tokens that locking ``node`` would newly lock."""
        n = 0
        while node is not self.root and node.refs == 0:
            n += len(node)
            node = node.parent  # type: ignore[assignment]
        return n

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            node.refs -= 1
            if node.refs == 0:
                self.locked_tokens -= len(node)
            elif node.refs == 1:
                self.shared_tokens -= len(node)
            node = node.parent  # type: ignore[assignment]

    # ---- insertion and eviction ----------------------------------------------------------
    def insert(
        self, tokens: Sequence[int] | np.ndarray, slots: np.ndarray, step: int = -1
    ) -> tuple[Node, int]:
        """Cache ``tokens`` with their ``slots``; return the last node and how many leading
        tokens were already cached (the caller's slots for those are duplicates it keeps)."""
        key = np.asarray(tokens, dtype=np.int32)
        node, pos = self.root, 0
        now = next(_clock)
        while pos < key.size:
            child = node.children.get(int(key[pos]))
            if child is None:
                leaf = Node(key[pos:].copy(), np.asarray(slots[pos:], np.int32).copy(), node, last_use=now)
                leaf.step, leaf.depth = step, node.depth + int(key.size - pos)
                node.children[int(key[pos])] = leaf
                self.total_tokens += len(leaf)
                return leaf, pos
            n = _common(child.tokens, key[pos:])
            if n < len(child):
                child = self._split(child, n)
            child.last_use = now
            node, pos = child, pos + n
        return node, pos

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` unlocked tokens if there are that many; return how many."""
        heap = [(leaf.last_use, id(leaf), leaf) for leaf in self._leaves() if leaf.refs == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_tokens:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[int(leaf.tokens[0])]
            self._free(leaf.slots)
            self.total_tokens -= len(leaf)
            freed += len(leaf)
            if parent is not self.root and not parent.children and parent.refs == 0:
                heapq.heappush(heap, (parent.last_use, id(parent), parent))
        return freed

    def clear(self) -> int:
        """Evict everything no live request holds; return the tokens freed."""
        return self.evict(self.evictable_tokens)

    # ---- helpers -----------------------------------------------------------------------
    def _split(self, child: Node, n: int) -> Node:
        """Cut ``child``'s edge after ``n`` tokens; return the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = Node(child.tokens[:n], child.slots[:n], parent, refs=child.refs, last_use=child.last_use)
        upper.step, upper.depth = child.step, parent.depth + n
        parent.children[int(upper.tokens[0])] = upper
        child.tokens, child.slots, child.parent = child.tokens[n:], child.slots[n:], upper
        upper.children[int(child.tokens[0])] = child
        return upper

    def _leaves(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                out.append(node)
        return out


def _common(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n
