"""Swaps the layers' torch ops for the fused Triton kernels on GPU.

The layers call module-level functions (``norm.rms_norm``, ``rotary.apply_rotary``, ...)
so that one place can rebind them; the torch versions stay the CPU path and the
references the kernels are tested against.
"""

from __future__ import annotations

import torch

from lightllm_grpc.layers import activation, norm, rotary


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from lightllm_grpc_kernels.rmsnorm import rmsnorm

    rows = x.reshape(-1, x.shape[-1])  # q/k norms see [T, H, D]; the kernel wants [rows, D]
    return rmsnorm(rows, weight, eps).view(x.shape)


def _add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from lightllm_grpc_kernels.rmsnorm import fused_add_rmsnorm

    # The kernel adds into ``residual`` in place: every caller passes a residual it owns.
    return fused_add_rmsnorm(x, residual, weight, eps), residual


def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    from lightllm_grpc_kernels.activation import silu_and_mul

    return silu_and_mul(x)


def _apply_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    from lightllm_grpc_kernels.rotary import apply_rotary

    return apply_rotary(positions, q, k, cos_cache, sin_cache)  # in place


def install_triton_ops() -> None:
    """Route RMSNorm, residual-add + RMSNorm, SiLU-and-mul and rotary through Triton kernels."""
    norm.rms_norm = _rms_norm
    norm.add_rms_norm = _add_rms_norm
    activation.silu_and_mul = _silu_and_mul
    rotary.apply_rotary = _apply_rotary
