"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer;
``AddNormLinear``, a decoder norm and the projection that reads it as one step."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from lightllm_grpc.parallel import all_reduce, lamport_for, tp_size

if TYPE_CHECKING:
    from lightllm_grpc_kernels.lamport import LamportBuffers

    from lightllm_grpc.layers.linear import LinearBase
    from lightllm_grpc.layers.ops import Ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The native op (``Ops.native``) and the reference the Triton kernel is tested against.

    Mirrors transformers' LlamaRMSNorm op for op (fp32 statistics, cast back before the
    weight multiply) so fp32 results are bit-identical to HF.
    """
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(input_dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + x`` then RMSNorm; returns ``(normed, sum)``. The native op, like ``rms_norm``."""
    summed = residual + x
    return rms_norm(summed, weight, eps), summed


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops: Ops) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self._rms_norm = ops.rms_norm  # bound once: the forward pays no lookup
        self._add_rms_norm = ops.add_rms_norm

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(norm(x + residual), x + residual)``; without a residual, ``(norm(x), x)``."""
        if residual is None:
            return self._rms_norm(x, self.weight, self.eps), x
        return self._add_rms_norm(x, residual, self.weight, self.eps)


# (norm, linear, x, residual | None) -> (linear(norm(residual + x)), residual + x): how an
# ``AddNormLinear`` runs its pair.
NormLinearStep = Callable[
    ["RMSNorm", "LinearBase", torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]
]


def norm_then_linear(
    norm: RMSNorm, linear: LinearBase, x: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair as two ops: the norm's forward, then the linear layer's."""
    hidden, residual = norm(x, residual)
    return linear(hidden), residual


class AddNormLinear(nn.Module):
    """A decoder layer's residual add + RMSNorm and the projection that reads the norm's output
    (qkv after ``input_layernorm``, gate_up after ``post_attention_layernorm``), as one step:
    ``forward(x, residual)`` returns ``(linear(norm(residual + x)), residual + x)`` (without a
    residual, ``(linear(norm(x)), x)``). The residual passed in is the caller's to give up: it
    may be updated in place, or the sum may come back in a new tensor.

    The norm and the linear stay the decoder layer's modules (their weights load under their
    own names); this module only runs them, by ``step``: ``norm_then_linear`` unless warm-up
    bound one kernel for both at one token (``matmul_tuning.tune_norm_gemv``; only for a
    column-parallel linear, whose forward has no collective to keep).

    ``reduce_input``: with tensor parallelism, x is this rank's partial sum (the row-parallel
    layer before it leaves the all-reduce to its reader), and this step all-reduces it: where
    the barrier-free buffers take it (``parallel.lamport_for``), the norm kernel does, and the
    linear layer follows (whatever ``step`` is bound); else ``all_reduce`` first, then ``step``.
    One rank alone has nothing to reduce.
    """

    def __init__(self, norm: RMSNorm, linear: LinearBase, reduce_input: bool = False) -> None:
        super().__init__()
        self.pair = (norm, linear)  # a tuple, so they are not registered twice as submodules
        self.step: NormLinearStep = norm_then_linear
        self.reduce_input = reduce_input and tp_size() > 1

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reduce_input:
            lamport = lamport_for(x)
            if lamport is not None:
                return self._reduce_norm_then_linear(x, residual, lamport)
            x = all_reduce(x)
        return self.step(*self.pair, x, residual)

    def _reduce_norm_then_linear(
        self, x: torch.Tensor, residual: torch.Tensor | None, lamport: LamportBuffers
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from lightllm_grpc_kernels.lamport import lamport_add_rmsnorm

        norm, linear = self.pair
        hidden = lamport_add_rmsnorm(x, residual, norm.weight, norm.eps, lamport)
        return linear(hidden), x if residual is None else residual  # the new stream, in place
