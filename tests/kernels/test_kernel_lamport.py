"""The barrier-free all-reduce (``lamport.py``) on two ranks emulated in one process.

The interpreter runs one kernel at a time, so a rank's call would wait for ever on a peer
that has not pushed yet. Each call is therefore played as: rank 1's push, written here the
way the kernel writes it (``_push_as``); rank 0's kernel (it finds rank 1's data, pushes its
own); rank 1's kernel (it finds rank 0's push; its own push rewrites the same bits). What the
kernels decide alone (which slot, what they clear, the counter, the sum and what reads it)
is theirs. bf16 is left to the GPU test: the interpreter truncates fp32 -> bf16.
"""

from __future__ import annotations

import pytest
import torch
from lightllm_grpc_kernels.lamport import (
    BITS,
    COUNTER,
    ERROR,
    SLOTS,
    STATE_LEN,
    LamportBuffers,
    lamport_add_rmsnorm,
    lamport_all_reduce,
    lamport_ref,
    new_buffers,
    sentinel,
)
from lightllm_grpc_kernels.rmsnorm import fused_add_rmsnorm, rmsnorm

WORLD, COLS, MAX_ROWS = 2, 64, 4
EPS = 1e-5


class Group:
    """Two ranks' buffers in this process; the table holds real addresses, as on a GPU."""

    def __init__(self, dtype: torch.dtype, max_spins: int = 50) -> None:
        self.dtype = dtype
        self.max_elems = MAX_ROWS * COLS
        self.bits = [new_buffers(dtype, WORLD, self.max_elems, "cpu") for _ in range(WORLD)]
        table = torch.tensor([b.data_ptr() for b in self.bits], dtype=torch.int64)
        state = [torch.zeros(STATE_LEN, dtype=torch.int32) for _ in range(WORLD)]
        self.ranks = [
            LamportBuffers(self.bits[r], table, state[r], r, WORLD, self.max_elems, max_spins)
            for r in range(WORLD)
        ]

    def slots(self, rank: int) -> torch.Tensor:
        return self.bits[rank].view(SLOTS, WORLD, self.max_elems)

    def _push_as(self, src: int, x: torch.Tensor) -> None:
        slot = int(self.ranks[src].state[COUNTER]) % SLOTS
        bits = torch.where(x == 0, torch.zeros_like(x), x).reshape(-1).view(BITS[self.dtype])
        for r in range(WORLD):
            if r != src:
                self.slots(r)[slot, src, : bits.numel()] = bits

    def call(self, fn, partials: list[torch.Tensor]) -> list:
        """``fn(partial, rank buffers)`` on both ranks, rank 1's push played first."""
        self._push_as(1, partials[1])
        return [fn(partials[r], self.ranks[r]) for r in range(WORLD)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_all_reduce_sums_every_call_and_clears_the_slot_before(dtype: torch.dtype) -> None:
    group, sent = Group(dtype), sentinel(BITS[dtype])
    torch.manual_seed(0)
    for call, rows in enumerate([1, 4, 2, 1, 3, 4, 1, 2]):
        partials = [torch.randn(rows, COLS, dtype=dtype) for _ in range(WORLD)]
        partials[0][0, :3] = -0.0  # data the sentinel's bits must not be mistaken for
        partials[1][0, :3] = -0.0
        out = group.call(lambda x, b: lamport_all_reduce(x.clone(), b), partials)
        ref = lamport_ref(partials)
        assert torch.equal(out[0], ref) and torch.equal(out[1], ref)
        for r in range(WORLD):
            state = group.ranks[r].state.tolist()
            assert state[COUNTER] == call + 1 and state[ERROR] == 0, state
            # The previous call's slot is back to the sentinel (its last use had other sizes).
            assert (group.slots(r)[(call - 1) % SLOTS] == sent).all()


@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rmsnorm_reads_the_group_sum(with_residual: bool) -> None:
    group = Group(torch.float16)
    partials = [torch.randn(3, COLS, dtype=torch.float16) for _ in range(WORLD)]
    weight = torch.randn(COLS, dtype=torch.float16)
    residual = torch.randn(3, COLS, dtype=torch.float16) if with_residual else None
    total = lamport_ref(partials)
    if with_residual:
        want_stream = residual.clone()
        want = fused_add_rmsnorm(total.clone(), want_stream, weight, EPS)
    else:
        want_stream, want = total, rmsnorm(total, weight, EPS)
    streams = [None if residual is None else residual.clone() for _ in range(WORLD)]
    partials = [p.clone() for p in partials]
    outs = group.call(lambda x, b: lamport_add_rmsnorm(x, streams[b.rank], weight, EPS, b), partials)
    for r in range(WORLD):
        assert torch.equal(outs[r], want)
        # The new stream in place: the residual, or (none) x, which now holds the sum.
        assert torch.equal(streams[r] if with_residual else partials[r], want_stream)


def test_a_peer_that_never_pushes_raises_the_error_flag_instead_of_hanging() -> None:
    group = Group(torch.float16, max_spins=5)
    lamport_all_reduce(torch.randn(1, COLS, dtype=torch.float16), group.ranks[0])
    assert int(group.ranks[0].state[ERROR]) == 1


def test_fits_only_what_the_buffers_hold() -> None:
    b = Group(torch.float16).ranks[0]
    assert b.fits(torch.zeros(MAX_ROWS, COLS, dtype=torch.float16))
    assert not b.fits(torch.zeros(MAX_ROWS + 1, COLS, dtype=torch.float16))  # too many elements
    assert not b.fits(torch.zeros(2, COLS, dtype=torch.float32))  # other bits
    assert not b.fits(torch.zeros(COLS, 2, dtype=torch.float16).t())  # not contiguous
