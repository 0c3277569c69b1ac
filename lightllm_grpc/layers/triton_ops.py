"""Swaps the layers' torch ops for the fused Triton kernels on GPU.

The layers call module-level functions (``norm.rms_norm``, ``rotary.apply_rotary``, ...)
so that one place can rebind them; the torch versions stay the CPU path and the
references the kernels are tested against.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from lightllm_grpc.layers import activation, linear, norm, rotary

log = logging.getLogger(__name__)
# Weight shape -> the GEMV config that beat cuBLAS for one-token inputs (see tune_gemv).
_GEMV: dict[tuple[int, int], object] = {}


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


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    config = _GEMV.get(tuple(weight.shape)) if x.shape[0] == 1 else None
    if config is None:
        return F.linear(x, weight, bias)
    from lightllm_grpc_kernels.gemv import gemv

    y = gemv(x, weight, config)
    return y if bias is None else y + bias


def tune_gemv(model: nn.Module, min_gain: float = 0.03) -> dict[tuple[int, int], object]:
    """For each weight shape of ``model``, time cuBLAS and the GEMV kernel at one token
    (inside CUDA graphs, as decode runs) and keep the kernel where it is faster by ``min_gain``."""
    weights = {  # FP8 weights go through their own matmul (layers/fp8.py), never the GEMV
        tuple(p.shape): p
        for name, p in model.named_parameters()
        if p.dim() == 2 and "embed" not in name and p.element_size() > 1
    }
    for shape, w in sorted(weights.items()):
        cublas_ms, best_ms, best = _time_gemv(w)
        nbytes = w.numel() * w.element_size()
        chosen = best_ms < cublas_ms * (1 - min_gain)
        if chosen:
            _GEMV[shape] = best
        log.info(
            "weight %s at one token: cuBLAS %.1f us (%.2f TB/s), GEMV kernel %.1f us (%.2f TB/s) -> %s",
            shape, cublas_ms * 1e3, nbytes / cublas_ms / 1e9, best_ms * 1e3, nbytes / best_ms / 1e9,
            f"kernel {best}" if chosen else "cuBLAS",
        )  # fmt: skip
    torch.cuda.empty_cache()  # the weight copies must not stay cached outside the graphs' pool
    return dict(_GEMV)


def _time_gemv(w: torch.Tensor) -> tuple[float, float, object]:
    import triton.testing
    from lightllm_grpc_kernels.gemv import GEMV_CONFIGS, gemv

    # In decode each weight is read once per step, from HBM: rotate among enough copies that
    # the timed calls cannot be served from L2 (a weight smaller than L2 would look faster).
    nbytes = w.numel() * w.element_size()
    copies = [w] + [w.clone() for _ in range(min(7, (256 << 20) // nbytes))]
    x = torch.randn(1, w.shape[1], device=w.device, dtype=w.dtype)
    turn = iter(range(1 << 30))

    def rotating(fn):
        return lambda: fn(copies[next(turn) % len(copies)])

    cublas = triton.testing.do_bench_cudagraph(rotating(lambda m: F.linear(x, m)))
    timed = [
        (triton.testing.do_bench_cudagraph(rotating(lambda m, c=c: gemv(x, m, c))), c) for c in GEMV_CONFIGS
    ]
    best_ms, best = min(timed, key=lambda t: t[0])
    return cublas, best_ms, best


def install_triton_ops() -> None:
    """Route RMSNorm, residual-add + RMSNorm, SiLU-and-mul, rotary and (where tuned) one-token
    matmuls through Triton kernels."""
    norm.rms_norm = _rms_norm
    norm.add_rms_norm = _add_rms_norm
    activation.silu_and_mul = _silu_and_mul
    rotary.apply_rotary = _apply_rotary
    linear.linear = _linear
