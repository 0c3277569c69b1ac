"""Tensor-parallel group state: rank, world size and the collectives layers call in forward.

All-reduce has three implementations on GPU. NCCL serves every size. For the small messages
of decode (batch x hidden, a few hundred KB), ``CustomAllReduce`` sums over peer-to-peer
device memory instead: each rank copies its partial sum into a buffer every rank of the
host can read (``torch.distributed._symmetric_memory``), and one kernel reads the peers'
buffers and adds. From 2 rows up to ``LAMPORT_MAX_BYTES`` it pushes into the peers' buffers
without any barrier (``lightllm_grpc_kernels.lamport``), and the layers that read a sum (the
residual add + RMSNorm) do that all-reduce in their own kernel (``lamport_for``).
docs/multihost.md says why this wins at small sizes and why it never uses NVLink multicast.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from lightllm_grpc_kernels.lamport import LamportBuffers

log = logging.getLogger(__name__)

# Up to this many bytes one kernel reads every peer's whole buffer (one-shot); above it,
# up to the buffer's size, each rank reduces 1/N and gathers the rest (two-shot), which
# moves less data per rank; above the buffer, NCCL.
ONE_SHOT_MAX_BYTES = 512 * 1024
# The buffer holds the largest decode message (max rows x hidden), capped here: larger
# messages are prefill, where NCCL's bandwidth matters and its latency does not.
MAX_BUFFER_BYTES = 8 * 1024 * 1024
# The symmetric-memory kernels add these dtypes only; float16 models keep NCCL.
CUSTOM_DTYPES = (torch.bfloat16, torch.float32)
# Messages up to this size (per rank) go through the barrier-free buffers: decode up to 64 rows
# of a 4096-wide bf16 model. Each rank keeps 3 slots of this per peer.
LAMPORT_MAX_BYTES = 512 * 1024
# And from this many rows: at one row (batch-1 decode) the one-shot kernel measured as fast
# (2x H200, 8B shape: decode step 3.016 ms one-shot vs 3.076 ms folded into the norms), at
# 64 rows the folded path saves 8% (3.907 -> 3.599 ms). BENCHMARKS.md.
LAMPORT_MIN_ROWS = 2


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")


class CustomAllReduce:
    """Sum across the group over a rendezvoused symmetric-memory buffer.

    Contract: every rank builds it with a buffer of the same size and dtype, and calls it
    on the same shapes in the same order (as tensor parallelism does). Which kernel runs
    depends on the message's bytes alone, so every rank takes the same path, and a CUDA
    graph captured at one batch size holds one fixed path. The buffer is reused by every
    call: each kernel ends with a barrier across ranks, so no peer still reads it when the
    next call overwrites it.
    """

    def __init__(
        self,
        buffer: torch.Tensor,
        group_name: str,
        one_shot_max: int = ONE_SHOT_MAX_BYTES,
        lamport: LamportBuffers | None = None,
    ) -> None:
        self.buffer = buffer
        self.group_name = group_name
        self.one_shot_max = one_shot_max
        # The barrier-free path for the smallest messages (None: off, e.g. to compare without it).
        self.lamport = lamport
        self.max_bytes = buffer.numel() * buffer.element_size()
        # torch builds that have it fold the copy into the buffer into the one-shot kernel.
        self.fused_copy = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")

    def path(self, x: torch.Tensor) -> str:
        """``lamport``, ``one_shot``, ``two_shot`` or ``nccl`` for this message."""
        if self.lamport_for(x) is not None:
            return "lamport"
        nbytes = x.numel() * x.element_size()
        # The kernels need a contiguous input in whole 4-byte words, and they write 16-byte
        # vectors into it: a view must start 16 bytes into its (aligned) allocation.
        misaligned = nbytes % 4 or x.storage_offset() * x.element_size() % 16
        if x.dtype != self.buffer.dtype or nbytes > self.max_bytes or misaligned or not x.is_contiguous():
            return "nccl"
        return "one_shot" if nbytes <= self.one_shot_max else "two_shot"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` across ranks in place (as ``dist.all_reduce`` does) and return it."""
        path = self.path(x)
        if path == "lamport":
            from lightllm_grpc_kernels.lamport import lamport_all_reduce

            lamport_all_reduce(x.view(-1, x.shape[-1]), self.lamport)
            return x
        if path == "nccl":
            dist.all_reduce(x)
            return x
        flat = x.view(-1)
        buf = self.buffer[: flat.numel()]
        if path == "one_shot" and self.fused_copy:
            # One kernel: copy x into this rank's buffer, barrier, read every peer's, add into x.
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf, flat, "sum", self.group_name, flat)
            return x
        buf.copy_(flat)
        if path == "one_shot":
            torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", self.group_name, flat)
        else:
            torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", self.group_name)
            flat.copy_(buf)
        return x

    def lamport_for(self, x: torch.Tensor) -> LamportBuffers | None:
        """The barrier-free buffers if ``x`` (a partial sum of ``LAMPORT_MIN_ROWS`` rows or more)
        fits them."""
        lamport = self.lamport
        if lamport is None or not lamport.fits(x) or x.numel() < LAMPORT_MIN_ROWS * x.shape[-1]:
            return None
        return lamport


def build_custom_all_reduce(
    max_bytes: int, dtype: torch.dtype, device: torch.device, barrier_free: bool = True
) -> tuple[CustomAllReduce | None, str]:
    """Rendezvous a symmetric buffer across the group; every rank must call this.

    Returns the all-reduce (None: keep NCCL) and a line for the start-up log saying which
    path is in use and why. All ranks agree: if any rank cannot map its peers' memory
    (no P2P between the cards, ranks on several hosts), all keep NCCL. ``barrier_free``: also
    the barrier-free buffers for the smallest messages (``CustomAllReduce.lamport``), by vote too.
    """
    if dtype not in CUSTOM_DTYPES:
        return None, f"all-reduce: NCCL ({dtype} has no P2P all-reduce kernel)"
    group = dist.group.WORLD
    peers: list = [None] * dist.get_world_size()
    dist.all_gather_object(peers, (socket.gethostname(), device.index))
    if len({host for host, _ in peers}) > 1:
        return None, "all-reduce: NCCL (ranks on several hosts: no P2P memory between them)"
    # One size on every rank (shards started by hand may differ in --max-running-requests).
    size = torch.tensor([min(max_bytes, MAX_BUFFER_BYTES)], dtype=torch.int64, device=device)
    dist.all_reduce(size, op=dist.ReduceOp.MIN)
    import torch.distributed._symmetric_memory as symm_mem

    # Two steps, each followed by a vote, so no rank enters the collective rendezvous while
    # another has already given up (it would wait there for ever).
    buffer, why = _attempt(lambda: _allocate(int(size.item()), dtype, device, [d for _, d in peers]))
    if _all_agree(buffer is not None, device):
        _, why = _attempt(lambda: symm_mem.rendezvous(buffer, group.group_name))
        if _all_agree(not why, device):
            lamport, lamport_why = None, "--disable-fused-all-reduce"
            if barrier_free:
                lamport, lamport_why = _build_lamport(int(size.item()), dtype, device, group)
            custom = CustomAllReduce(buffer, group.group_name, lamport=lamport)
            small = (
                f"barrier-free <= {lamport.max_elems * dtype.itemsize >> 10} KiB (folded into the norms)"
                if lamport
                else f"barrier-free off: {lamport_why}"
            )
            return custom, (
                f"all-reduce: P2P over symmetric memory ({small}, one-shot <= {custom.one_shot_max >> 10} "
                f"KiB, two-shot <= {custom.max_bytes >> 10} KiB, NCCL above; no multicast)"
            )
    return None, f"all-reduce: NCCL (P2P symmetric memory unavailable on some rank: {why or 'a peer failed'})"


def _build_lamport(
    max_bytes: int, dtype: torch.dtype, device: torch.device, group
) -> tuple[LamportBuffers | None, str]:
    """The barrier-free buffers, or None and why. Collective, with a vote after each step (as
    for the one-shot buffer), so no rank enters the rendezvous that another gave up before."""
    import torch.distributed._symmetric_memory as symm_mem

    max_elems = min(max_bytes, LAMPORT_MAX_BYTES) // dtype.itemsize
    bits, why = _attempt(lambda: _lamport_alloc(dtype, max_elems, device))
    if not _all_agree(bits is not None, device):
        return None, why or "a peer failed"
    handle, why = _attempt(lambda: symm_mem.rendezvous(bits, group.group_name))
    if not _all_agree(handle is not None, device):
        return None, why or "a peer failed"
    return _lamport_from(bits, handle, max_elems, device), ""


def _lamport_alloc(dtype: torch.dtype, max_elems: int, device: torch.device) -> torch.Tensor:
    """This rank's barrier-free buffer in symmetric memory, filled with the sentinel."""
    import torch.distributed._symmetric_memory as symm_mem
    from lightllm_grpc_kernels.lamport import new_buffers

    return new_buffers(dtype, dist.get_world_size(), max_elems, device, alloc=symm_mem.empty)


def _lamport_from(bits: torch.Tensor, handle, max_elems: int, device: torch.device) -> LamportBuffers:
    from lightllm_grpc_kernels.lamport import STATE_LEN, LamportBuffers

    world, rank = dist.get_world_size(), dist.get_rank()
    # The buffer may sit at an offset in its symmetric allocation: the same on every rank.
    offset = bits.data_ptr() - handle.buffer_ptrs[rank]
    table = torch.tensor([p + offset for p in handle.buffer_ptrs], dtype=torch.int64, device=device)
    state = torch.zeros(STATE_LEN, dtype=torch.int32, device=device)
    torch.cuda.synchronize(device)  # every rank's sentinel fill is done before any peer pushes
    dist.barrier()
    # Debugging a hang: a wait that spins this many times gives up and raises the error flag.
    max_spins = int(os.environ.get("LIGHTLLM_GRPC_LAMPORT_MAX_SPINS", "-1"))
    return LamportBuffers(bits, table, state, rank, world, max_elems, max_spins)


def _attempt(fn):
    """``(fn(), "")``, or ``(None, why)`` if it raised: a failed mapping must not stop the
    shard, since NCCL still works."""
    try:
        return fn(), ""
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]


def _all_agree(ok: bool, device: torch.device) -> bool:
    return bool(min_over_ranks(int(ok), device))


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest ``value`` of all ranks (collective: every rank calls it); ``value`` alone
    without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    vote = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MIN)
    return int(vote.item())


def _allocate(nbytes: int, dtype: torch.dtype, device: torch.device, devices: list[int]) -> torch.Tensor:
    """This rank's symmetric buffer, after checking it can reach the other ranks' cards."""
    import torch.distributed._symmetric_memory as symm_mem

    me = device.index
    for d in devices:  # indices of this host's devices, as every rank sees all of them
        if d != me and not torch.cuda.can_device_access_peer(me, d):
            raise RuntimeError(f"cuda:{me} cannot access cuda:{d} peer to peer")
    if hasattr(symm_mem, "enable_symm_mem_for_group"):
        # Older torch needs it before a rendezvous; newer torch calls it itself (idempotent).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(dist.group.WORLD.group_name)
    return symm_mem.empty(nbytes // dtype.itemsize, dtype=dtype, device=device)


_state = ParallelState()
_custom: CustomAllReduce | None = None


def set_parallel_state(state: ParallelState) -> None:
    """Record this process's rank; torch.distributed must already be initialised when world_size > 1."""
    global _state
    _state = state


def set_custom_all_reduce(custom: CustomAllReduce | None) -> None:
    """Route small all-reduces through ``custom`` (None: NCCL or gloo for every size)."""
    global _custom
    _custom = custom


def custom_all_reduce() -> CustomAllReduce | None:
    """The P2P all-reduce in use, if any (benchmarks swap it for NCCL and back)."""
    return _custom


def lamport_for(x: torch.Tensor) -> LamportBuffers | None:
    """The barrier-free all-reduce buffers, when ``x`` (a partial sum) can use them: a kernel that
    reads the sum may then do the all-reduce itself (``lightllm_grpc_kernels.lamport``)."""
    return None if _custom is None else _custom.lamport_for(x)


def tp_rank() -> int:
    return _state.rank


def tp_size() -> int:
    return _state.world_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` across ranks in place and return it; a no-op on one rank."""
    if _state.world_size > 1:
        if _custom is not None:
            return _custom(x)
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's ``x`` along the last dimension; identity on one rank."""
    if _state.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
