"""All-reduce over peer-to-peer memory without a barrier ("Lamport" flags), fusable into the
kernel that reads the sum.

Every rank owns a buffer that all ranks of the host map (symmetric memory). A call pushes
this rank's partial sum into every peer's buffer, then reads the peers' pushes from its own
buffer and adds them, in rank order, in fp32. No flag or barrier says "the data is there":
the buffer is kept filled with a sentinel (the bits of -0.0, which the pushes never carry: a
pushed -0.0 becomes +0.0, the same number for every use of a sum), and a reader spins on its
own memory until no element is the sentinel. So a call costs one write over NVLink and no
round trip, and it can live in the kernel that consumes the sum (here the residual add +
RMSNorm), which removes the all-reduce's launch from the decode step. (Folded into the
one-token qkv GEMV it did not pay: the wait for the peer's row moved into the GEMV, whose
weight reads cannot start before the normalised row exists; BENCHMARKS.md.)

Three slots take turns, by a call counter kept on the device (so CUDA graphs, replayed in
any order, stay in step; every rank makes the same calls in the same order, as with NCCL).
Call ``c`` uses slot ``c % 3`` and clears slot ``(c - 1) % 3`` back to the sentinel (only the
elements its last use wrote). Why this is safe with no fence: a peer writes slot
``(c - 1) % 3`` again only at call ``c + 2``, which it reaches only after reading this rank's
push of call ``c + 1``, made by a kernel that starts after this one (the clear) has finished;
and the data a call reads is never overwritten before it is read, since a peer's next push
into that slot (call ``c + 3``) waits on this rank's push of ``c + 2``.

The counter moves once per call: every program reads it first, takes a ticket, and the
program that takes the last ticket stores ``c + 1`` (so no program can see the new value).
Programs of one kernel never wait on each other: each program pushes and reads its own row.

A peer that never pushes leaves the reader spinning, as NCCL would hang: ``max_spins`` (tests)
bounds the wait and raises the error flag ``state[ERROR]`` instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lightllm_grpc_kernels._launch import block, check_rows, on_gpu, pdl, wait_for_predecessor
from lightllm_grpc_kernels.rmsnorm import add_rows, inv_rms, normed, squares

SLOTS = 3
# The widest row one program of the row kernel holds in registers.
MAX_COLS = 16384
# state[]: the call counter, the ticket, the elements written in each slot's last use, the error flag.
COUNTER, TICKET, USED, ERROR = 0, 1, 2, 2 + SLOTS
STATE_LEN = ERROR + 1
# The same numbers for the kernels (a jit function reads only constexpr globals).
_SLOTS, _COUNTER, _TICKET, _USED, _ERROR = (tl.constexpr(v) for v in (SLOTS, COUNTER, TICKET, USED, ERROR))
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


class LamportBuffers(NamedTuple):
    """One rank's view of the group's buffers.

    ``bits``: this rank's buffer, ``[SLOTS * world * max_elems]`` of the raw bits of the
    activation dtype (int16 for 16-bit dtypes, int32 for fp32), every element the sentinel at
    rest. ``table``: int64 ``[world]``, every rank's buffer address as this process maps it.
    ``state``: int32 ``[STATE_LEN]``, zeros to start. ``max_spins``: -1 waits for ever."""

    bits: torch.Tensor
    table: torch.Tensor
    state: torch.Tensor
    rank: int
    world: int
    max_elems: int
    max_spins: int = -1

    def fits(self, x: torch.Tensor) -> bool:
        """Whether ``x`` (the partial sum, contiguous) can go through these buffers."""
        return (
            x.numel() <= self.max_elems
            and x.dim() > 0
            and x.shape[-1] <= MAX_COLS
            and x.is_contiguous()
            and BITS.get(x.dtype) == self.bits.dtype
            and x.device == self.bits.device
        )


def sentinel(bits_dtype: torch.dtype) -> int:
    """The bits of -0.0 as a signed integer of ``bits_dtype``."""
    return -(1 << (8 * torch.empty((), dtype=bits_dtype).element_size() - 1))


def new_buffers(
    dtype: torch.dtype, world: int, max_elems: int, device: torch.device | str, alloc=torch.empty
) -> torch.Tensor:
    """A rank's buffer, filled with the sentinel; ``alloc`` (e.g. symmetric memory's) allocates it."""
    bits = alloc(SLOTS * world * max_elems, dtype=BITS[dtype], device=device)
    return bits.fill_(sentinel(BITS[dtype]))


@triton.jit
def _slot(base, slot, src, world, max_elems):
    return base + (slot * world + src).to(tl.int64) * max_elems


@triton.jit
def _open_call(
    state_ptr, bits_ptr, rank, max_elems, pid, nprog,
    WORLD: tl.constexpr, BLOCK: tl.constexpr, SENT: tl.constexpr,
):  # fmt: skip
    """Read the call counter (every program, first) and clear the previous call's slot; returns
    ``(counter, slot)``. The clear is spread over the programs in ``BLOCK``-element pieces."""
    c = tl.load(state_ptr + _COUNTER, volatile=True)
    old = (c + _SLOTS - 1) % _SLOTS
    used = tl.load(state_ptr + _USED + old, volatile=True)
    offs = tl.arange(0, BLOCK)
    fill = tl.full([BLOCK], SENT, bits_ptr.dtype.element_ty)
    for src in tl.static_range(WORLD):
        if src != rank:  # this rank never pushes into its own buffer
            base = _slot(bits_ptr, old, src, WORLD, max_elems)
            start = pid * BLOCK
            while start < used:
                tl.store(base + start + offs, fill, mask=start + offs < used)
                start += nprog * BLOCK
    return c, c % _SLOTS


@triton.jit
def _push_row(own, table_ptr, rank, max_elems, slot, offs, mask, WORLD: tl.constexpr):
    """Write this rank's values ``own`` at ``offs`` of slot ``slot`` in every peer's buffer."""
    bits_ty = tl.int16 if own.dtype.primitive_bitwidth == 16 else tl.int32
    # +0.0 for -0.0: the sentinel's bits never travel as data.
    bits = tl.where(own == 0, tl.zeros_like(own), own).to(bits_ty, bitcast=True)
    for r in tl.static_range(WORLD):
        if r != rank:
            peer = tl.load(table_ptr + r).to(tl.pointer_type(bits_ty))
            tl.store(_slot(peer, slot, rank, WORLD, max_elems) + offs, bits, mask=mask)


@triton.jit
def _spin(ptr, mask, state_ptr, max_spins, SENT: tl.constexpr):
    """Load ``ptr`` until no element under ``mask`` is the sentinel; returns the bits."""
    v = tl.load(ptr, mask=mask, other=0, volatile=True)
    spins = 0
    while (tl.sum(((v == SENT) & mask).to(tl.int32), axis=0) > 0) & (spins != max_spins):
        v = tl.load(ptr, mask=mask, other=0, volatile=True)
        spins += 1
    if spins == max_spins:
        tl.store(state_ptr + _ERROR, 1)
    return v


@triton.jit
def _sum_row(
    own, bits_ptr, state_ptr, rank, max_elems, slot, offs, mask, max_spins,
    WORLD: tl.constexpr, SENT: tl.constexpr,
):  # fmt: skip
    """The sum over ranks, in rank order in fp32, rounded to ``own``'s dtype: ``own`` for this
    rank, the peers' pushes from this rank's buffer once every element has arrived."""
    acc = tl.zeros_like(own).to(tl.float32)
    for r in tl.static_range(WORLD):
        if r == rank:
            acc += own.to(tl.float32)
        else:
            v = _spin(_slot(bits_ptr, slot, r, WORLD, max_elems) + offs, mask, state_ptr, max_spins, SENT)
            acc += v.to(own.dtype, bitcast=True).to(tl.float32)
    return acc.to(own.dtype)


@triton.jit
def _close_call(state_ptr, c, slot, used, pid, nprog):
    """Record the elements this call wrote in its slot (for the clear two calls on) and move
    the counter once every program has read it."""
    if pid == 0:
        tl.store(state_ptr + _USED + slot, used)
    ticket = tl.atomic_add(state_ptr + _TICKET, 1)
    if ticket == nprog - 1:
        tl.store(state_ptr + _TICKET, 0)
        tl.store(state_ptr + _COUNTER, c + 1)


@triton.jit
def _lamport_rows_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps,
    bits_ptr, table_ptr, state_ptr, rank, max_elems, max_spins,
    WORLD: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    SENT: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    wait_for_predecessor(PDL)
    # One program per row of a contiguous [rows, n_cols] partial sum.
    row = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    c, slot = _open_call(state_ptr, bits_ptr, rank, max_elems, row, nprog, WORLD, BLOCK, SENT)
    offs = row.to(tl.int64) * n_cols + cols
    own = tl.load(x_ptr + offs, mask=mask, other=0.0)
    _push_row(own, table_ptr, rank, max_elems, slot, offs, mask, WORLD)
    x = _sum_row(own, bits_ptr, state_ptr, rank, max_elems, slot, offs, mask, max_spins, WORLD, SENT)
    _close_call(state_ptr, c, slot, nprog * n_cols, row, nprog)
    if NORM:
        if HAS_RESIDUAL:
            x = add_rows(x, tl.load(res_ptr + offs, mask=mask, other=0.0))
        # The new stream: into the residual, or (none) the sum into x's place, as each program
        # has already read its own row of x.
        tl.store(res_ptr + offs, x, mask=mask)
        rstd = inv_rms(tl.sum(squares(x), axis=0), n_cols, eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        tl.store(out_ptr + offs, normed(x, rstd, w), mask=mask)
    else:
        tl.store(out_ptr + offs, x, mask=mask)


def _launch_rows(
    x: torch.Tensor,
    buffers: LamportBuffers,
    residual: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    eps: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    check_rows(x, "x", 2)
    assert buffers.fits(x), f"x {tuple(x.shape)} {x.dtype} does not fit the all-reduce buffers"
    n_rows, n_cols = x.shape
    norm = weight is not None
    if norm:
        assert weight.shape == (n_cols,) and weight.dtype == x.dtype and weight.is_contiguous()
    if residual is not None:
        check_rows(residual, "residual", 2, x.dtype)
        assert residual.shape == x.shape and residual.is_contiguous()
    out = x if out is None else out
    if n_rows == 0:
        return out
    width = block(n_cols)
    bits, table, state, rank, world, max_elems, max_spins = buffers
    _lamport_rows_kernel[(n_rows,)](
        x, x if residual is None else residual, x if weight is None else weight, out, n_cols, eps,
        bits, table, state, rank, max_elems, max_spins,
        WORLD=world, NORM=norm, HAS_RESIDUAL=residual is not None, BLOCK=width, SENT=sentinel(bits.dtype),
        num_warps=min(max(width // 512, 1), 16) if on_gpu(x) else 1,
        enable_fp_fusion=False,  # the norm keeps HF's roundings, as rmsnorm.py
        **pdl(x),
    )  # fmt: skip
    return out


def lamport_all_reduce(x: torch.Tensor, buffers: LamportBuffers) -> torch.Tensor:
    """Sum ``x`` [rows, cols] across the group in place and return it (every rank calls it)."""
    return _launch_rows(x, buffers)


def lamport_add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    buffers: LamportBuffers,
) -> torch.Tensor:
    """``fused_add_rmsnorm`` (``rmsnorm`` without a residual) of the group's sum of ``x``: returns
    the normalised rows; the new stream goes in place, into ``residual`` (``residual + sum``)
    or, without one, into ``x`` (the sum)."""
    return _launch_rows(x, buffers, residual, weight, eps, torch.empty_like(x))


def lamport_ref(partials: list[torch.Tensor]) -> torch.Tensor:
    """The sum the kernels produce: fp32 in rank order, rounded once."""
    acc = torch.zeros_like(partials[0], dtype=torch.float32)
    for p in partials:
        acc += p.float()
    return acc.to(partials[0].dtype)


__all__ = [
    "LamportBuffers",
    "lamport_add_rmsnorm",
    "lamport_all_reduce",
    "lamport_ref",
    "new_buffers",
    "sentinel",
]
