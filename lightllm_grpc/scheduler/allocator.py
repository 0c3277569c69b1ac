"""Free-list allocators for KV slots and req_to_token rows (coordinator side)."""

from __future__ import annotations

import numpy as np


class IdAllocator:
    """Hands out ids in ``[0, capacity)`` from a free stack.

    Contract: every id returned by ``alloc`` is owned by the caller until it is passed
    back to ``free`` exactly once. Freeing an id that is not allocated raises, so a
    double free shows up as an error instead of a silent leak or a shared slot.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        # Reversed so that ids come out ascending, which keeps K/V of a request contiguous
        # in a fresh pool (slightly better locality; not relied upon).
        self._free = np.arange(capacity - 1, -1, -1, dtype=np.int32)
        self._top = capacity
        self._allocated = np.zeros(capacity, dtype=bool)

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self.capacity - self._top

    def alloc(self, n: int) -> np.ndarray | None:
        """Return ``n`` ids, or None when fewer than ``n`` are free (nothing is taken then)."""
        if n > self._top:
            return None
        ids = self._free[self._top - n : self._top][::-1].copy()
        self._top -= n
        self._allocated[ids] = True
        return ids

    def alloc_one(self) -> int:
        ids = self.alloc(1)
        if ids is None:
            raise MemoryError("no free id")
        return int(ids[0])

    def free(self, ids: np.ndarray | list[int]) -> None:
        ids = np.asarray(ids, dtype=np.int32)
        if ids.size == 0:
            return
        if not self._allocated[ids].all() or np.unique(ids).size != ids.size:
            raise ValueError("freeing ids that are not allocated (double free)")
        self._allocated[ids] = False
        self._free[self._top : self._top + ids.size] = ids
        self._top += ids.size
