"""Checks and block-size choices shared by the launchers."""

from __future__ import annotations

import torch
import triton


def on_gpu(t: torch.Tensor) -> bool:
    """True when kernels run compiled; on CPU they run in Triton's (slow) interpreter."""
    return t.is_cuda


def check_rows(t: torch.Tensor, name: str, ndim: int, dtype: torch.dtype | None = None) -> None:
    """Asserts rank, dtype and a unit stride on the last dim (kernels pass the other strides)."""
    assert t.dim() == ndim, f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}"
    assert t.stride(-1) == 1, f"{name}: last dim must be contiguous, strides {t.stride()}"
    if dtype is not None:
        assert t.dtype == dtype, f"{name}: expected {dtype}, got {t.dtype}"


def check_index(t: torch.Tensor, name: str, length: int, dtype: torch.dtype) -> None:
    """Asserts a contiguous 1-D index tensor of the given length and dtype."""
    assert t.shape == (length,), f"{name}: expected shape ({length},), got {tuple(t.shape)}"
    assert t.dtype == dtype, f"{name}: expected {dtype}, got {t.dtype}"
    assert t.is_contiguous(), f"{name} must be contiguous"


def block(n: int) -> int:
    """The power-of-two block that covers ``n`` elements (tl.arange needs a power of two)."""
    return triton.next_power_of_2(n)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact IEEE for fp32 inputs; the TF32 setting is moot for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"
