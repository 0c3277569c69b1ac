"""The layers' ops as Triton kernels (``Ops.triton``), and the warm-up choice of one-token matmuls.

The kernels whose signature matches the native op's are used as they are; ``rms_norm`` and
``add_rms_norm`` adapt shapes and return values. ``tune_gemv`` picks, per weight shape, the
GEMV kernel or cuBLAS for one-token inputs by timing both, and binds the winner into each
layer of that shape.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from lightllm_grpc_kernels.activation import silu_and_mul
from lightllm_grpc_kernels.gemv import GEMV_CONFIGS, GemvConfig, gemv
from lightllm_grpc_kernels.rmsnorm import fused_add_rmsnorm, rmsnorm
from lightllm_grpc_kernels.rotary import apply_rotary
from torch import nn

from lightllm_grpc.layers.attention.base import AttentionBackend
from lightllm_grpc.layers.attention.triton_backend import TritonAttentionBackend
from lightllm_grpc.layers.embedding import ParallelLMHead
from lightllm_grpc.layers.linear import LinearBase, Matmul

__all__ = [
    "add_rms_norm",
    "apply_rotary",
    "attention_backend",
    "gemv_matmul",
    "rms_norm",
    "silu_and_mul",
    "tune_gemv",
    "use_gemv",
]
log = logging.getLogger(__name__)


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


@functools.cache
def gemv_matmul(config: GemvConfig) -> Matmul:
    """A layer's matmul that runs one-token inputs through the GEMV kernel with ``config``, the
    rest through cuBLAS. One function per config, shared by the layers that chose it."""

    def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] != 1:
            return F.linear(x, weight, bias)
        y = gemv(x, weight, config)
        return y if bias is None else y + bias

    return matmul


def _cublas_layers(model: nn.Module) -> list[LinearBase | ParallelLMHead]:
    """Layers that multiply with cuBLAS (not quantized ones); a head tied to the embedding is left
    out, as the embedding's weight is never tuned."""
    params = dict(model.named_parameters())  # a tied head's weight appears once, as the embedding
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, (LinearBase, ParallelLMHead)) and m.matmul is F.linear and f"{name}.weight" in params
    ]


def tune_gemv(model: nn.Module, min_gain: float = 0.03) -> dict[tuple[int, int], GemvConfig]:
    """For each weight shape of ``model``'s cuBLAS layers, time cuBLAS and the GEMV kernel at one
    token (inside CUDA graphs, as decode runs); where the kernel is faster by ``min_gain``, bind
    it into every layer of that shape (``use_gemv``). Returns the chosen configs by shape."""
    weights = {tuple(m.weight.shape): m.weight for m in _cublas_layers(model)}
    chosen: dict[tuple[int, int], GemvConfig] = {}
    for shape, w in sorted(weights.items()):
        cublas_ms, best_ms, best = _time_gemv(w)
        nbytes = w.numel() * w.element_size()
        if best_ms < cublas_ms * (1 - min_gain):
            chosen[shape] = best
        log.info(
            "weight %s at one token: cuBLAS %.1f us (%.2f TB/s), GEMV kernel %.1f us (%.2f TB/s) -> %s",
            shape, cublas_ms * 1e3, nbytes / cublas_ms / 1e9, best_ms * 1e3, nbytes / best_ms / 1e9,
            f"kernel {best}" if shape in chosen else "cuBLAS",
        )  # fmt: skip
    use_gemv(model, chosen)
    torch.cuda.empty_cache()  # the weight copies must not stay cached outside the graphs' pool
    return chosen


def use_gemv(model: nn.Module, configs: dict[tuple[int, int], GemvConfig]) -> int:
    """Bind ``gemv_matmul(configs[shape])`` into each cuBLAS layer of ``model`` whose weight has a
    shape in ``configs``; returns how many layers changed. Touches no other model."""
    changed = 0
    for layer in _cublas_layers(model):
        config = configs.get(tuple(layer.weight.shape))
        if config is not None:
            layer.matmul = gemv_matmul(config)
            changed += 1
    return changed


def _time_gemv(w: torch.Tensor) -> tuple[float, float, GemvConfig]:
    import triton.testing

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
