"""The layers' ops as Triton kernels (``Ops.triton``), and the matmuls warm-up may bind.

The kernels whose signature matches the native op's are used as they are; ``rms_norm`` and
``add_rms_norm`` adapt shapes and return values. ``GemvMatmul``, ``SiluGemvMatmul`` and
``NormGemvStep`` are what ``matmul_tuning`` binds into a layer where its timing chose a GEMV
kernel (one object per configuration, shared by the layers that chose it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightllm_grpc_kernels.activation import silu_and_mul
from lightllm_grpc_kernels.gemv import GemvConfig, add_rmsnorm_gemv, gemv, silu_gemv
from lightllm_grpc_kernels.gemv_rows import RowsConfigs, gemv_rows, rows_config
from lightllm_grpc_kernels.rmsnorm import fused_add_rmsnorm, rmsnorm
from lightllm_grpc_kernels.rotary import apply_rotary

from lightllm_grpc.layers.attention.base import AttentionBackend
from lightllm_grpc.layers.attention.triton_backend import TritonAttentionBackend
from lightllm_grpc.layers.linear import LinearBase, Matmul
from lightllm_grpc.layers.norm import RMSNorm, norm_then_linear

__all__ = [
    "GemvMatmul",
    "NormGemvStep",
    "SiluGemvMatmul",
    "add_rms_norm",
    "apply_rotary",
    "attention_backend",
    "gemv_matmul",
    "norm_gemv_step",
    "rms_norm",
    "silu_and_mul",
    "silu_gemv_matmul",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])  # q/k norms see [T, H, D]; the kernel wants [rows, D]
    return rmsnorm(rows, weight, eps).view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # The kernel adds into ``residual`` in place: every caller passes a residual it owns.
    return fused_add_rmsnorm(x, residual, weight, eps), residual


def attention_backend(
    max_batch_size: int, num_heads: int, head_dim: int, device: torch.device | str, dtype: torch.dtype
) -> AttentionBackend:
    return TritonAttentionBackend(max_batch_size, num_heads, head_dim, device, dtype)


@dataclass(frozen=True)
class GemvMatmul:
    """A layer's matmul that runs one-token inputs through the GEMV kernel with ``config`` (None:
    cuBLAS), the token counts ``rows`` binds through the few-token GEMV (``gemv_rows``), the rest
    through cuBLAS."""

    config: GemvConfig | None
    rows: RowsConfigs = ()

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        m = x.shape[0]
        if m == 1 and self.config is not None:
            y = gemv(x, weight, self.config)
        elif (config := rows_config(self.rows, m)) is not None:
            y = gemv_rows(x, weight, config)
        else:
            return F.linear(x, weight, bias)
        return y if bias is None else y + bias


@dataclass(frozen=True, eq=False)
class SiluGemvMatmul:
    """A down projection's matmul that takes the gate_up output ``[T, 2I]`` and applies
    SiLU-and-mul itself: one token through the GEMV with it folded into the loads
    (``silu_gemv``), more through the activation kernel, then ``fallback`` (the layer's matmul
    before the fusion). ``scale``: an FP8 layer's weight scale (its weight is e4m3; the kernel
    applies the scale and the bias)."""

    config: GemvConfig
    scale: torch.Tensor | None = None
    fallback: Matmul = F.linear

    def __call__(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if h.shape[0] != 1:
            return self.fallback(silu_and_mul(h), weight, bias)
        if self.scale is not None:
            return silu_gemv(h, weight, self.config, self.scale, bias)
        y = silu_gemv(h, weight, self.config)
        return y if bias is None else y + bias


@dataclass(frozen=True)
class NormGemvStep:
    """An ``AddNormLinear`` step that runs one token's residual add, RMSNorm and projection as one
    kernel (``add_rmsnorm_gemv``: the norm's output is never written; the new residual stream
    comes back in a new tensor, so no program overwrites the residual the others read); more
    tokens run the norm, then the linear layer, as before. For a column-parallel linear only
    (its forward is the matmul alone: nothing, such as a collective, is skipped). ``fp8``: the
    linear is an FP8 one (e4m3 weight; the kernel applies its ``weight_scale`` and bias)."""

    config: GemvConfig
    fp8: bool = False

    def __call__(
        self, norm: RMSNorm, linear: LinearBase, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] != 1:
            return norm_then_linear(norm, linear, x, residual)
        args = (x, residual, norm.weight, norm.eps, linear.weight, self.config)
        if self.fp8:
            return add_rmsnorm_gemv(*args, linear.weight_scale, linear.bias)
        y, residual = add_rmsnorm_gemv(*args)
        return (y if linear.bias is None else y + linear.bias), residual


def gemv_matmul(config: GemvConfig | None, rows: RowsConfigs = ()) -> Matmul:
    """The ``GemvMatmul`` of ``config`` and ``rows``: one object per pair, shared by the layers
    that chose it."""
    return _gemv_matmul(config, rows)


@functools.cache
def _gemv_matmul(config: GemvConfig | None, rows: RowsConfigs) -> Matmul:
    return GemvMatmul(config, rows)


def silu_gemv_matmul(config: GemvConfig, fallback: Matmul = F.linear) -> Matmul:
    """The ``SiluGemvMatmul`` of ``config`` with ``fallback`` for more tokens, one per pair."""
    return _silu_gemv_matmul(config, fallback)


@functools.cache
def _silu_gemv_matmul(config: GemvConfig, fallback: Matmul) -> Matmul:
    return SiluGemvMatmul(config, fallback=fallback)


def norm_gemv_step(config: GemvConfig, fp8: bool = False) -> NormGemvStep:
    """The ``NormGemvStep`` of ``config`` (and kind of weight), one per pair."""
    return _norm_gemv_step(config, fp8)


@functools.cache
def _norm_gemv_step(config: GemvConfig, fp8: bool) -> NormGemvStep:
    return NormGemvStep(config, fp8)
