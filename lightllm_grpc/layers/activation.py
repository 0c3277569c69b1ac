"""SwiGLU activation over the merged gate/up projection."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from lightllm_grpc.layers.linear import LinearBase, Matmul
    from lightllm_grpc.layers.ops import Ops


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]``: the native op; ``Ops.triton`` uses a fused kernel."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    def __init__(self, ops: Ops) -> None:
        super().__init__()
        self._silu_and_mul = ops.silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._silu_and_mul(x)


class ActIntoDown(ABC):
    """A gated MLP (``down_proj(silu_and_mul(gate_up_proj(x)))``) whose activation can move into
    its down projection's matmul.

    Contract: the class has a ``down_proj`` linear layer; ``fuse_act_into_down(matmul)`` binds
    ``matmul`` (which takes the gate_up output ``[T, 2I]`` and applies SiLU-and-mul itself, e.g.
    ``triton_ops.silu_gemv_matmul``) as ``down_proj``'s and drops the separate activation, so
    the MLP computes the same values with one launch less; the down projection's forward, and
    so its TP all-reduce, is kept. Warm-up calls it (``matmul_tuning.tune_silu_gemv``), per layer.
    """

    down_proj: LinearBase
    act_in_down: bool = False  # True once fuse_act_into_down ran: down's matmul takes [T, 2I]

    @abstractmethod
    def fuse_act_into_down(self, matmul: Matmul) -> None:
        """Multiply ``down_proj`` with ``matmul`` and skip the separate SiLU-and-mul; sets
        ``act_in_down``."""
