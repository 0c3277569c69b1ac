"""Tensor-parallel group state: rank, world size and the collectives layers call in forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")


_state = ParallelState()


def set_parallel_state(state: ParallelState) -> None:
    """Record this process's rank; torch.distributed must already be initialised when world_size > 1."""
    global _state
    _state = state


def tp_rank() -> int:
    return _state.rank


def tp_size() -> int:
    return _state.world_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` across ranks in place; a no-op on one rank."""
    if _state.world_size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's ``x`` along the last dimension; identity on one rank."""
    if _state.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
