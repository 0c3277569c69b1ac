from __future__ import annotations

import numpy as np
import pytest

from lightllm_grpc.scheduler.allocator import IdAllocator


def test_alloc_free_roundtrip_and_exhaustion() -> None:
    a = IdAllocator(10)
    x = a.alloc(4)
    y = a.alloc(6)
    assert x is not None and y is not None
    assert sorted(np.concatenate([x, y]).tolist()) == list(range(10))
    assert a.alloc(1) is None and a.num_free == 0
    a.free(x)
    assert a.num_free == 4 and a.num_used == 6
    z = a.alloc(4)
    assert sorted(z.tolist()) == sorted(x.tolist())


def test_failed_alloc_takes_nothing() -> None:
    a = IdAllocator(3)
    assert a.alloc(4) is None
    assert a.num_free == 3


def test_double_free_raises() -> None:
    a = IdAllocator(5)
    x = a.alloc(2)
    a.free(x)
    with pytest.raises(ValueError):
        a.free(x)
    with pytest.raises(ValueError):
        a.free([4])  # never allocated
    y = a.alloc(1)
    with pytest.raises(ValueError):
        a.free([int(y[0]), int(y[0])])
