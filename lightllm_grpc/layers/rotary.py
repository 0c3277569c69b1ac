"""Neox-style rotary position embedding with a precomputed cos/sin cache.

The inverse frequencies follow transformers' ``modeling_rope_utils`` formula for formula
(default, linear, dynamic NTK, llama3, yarn) so that logits match HF. The cache covers the
model's context length; dynamic NTK only rescales positions beyond
``max_position_embeddings``, which are never served, so there it equals HF's init-time
frequencies exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lightllm_grpc.layers.ops import Ops


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))


def _linear(base: float, dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(base, dim) / params["factor"], 1.0


def _dynamic(base: float, dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    # HF evaluates this at seq_len == max_position_embeddings, where the factor cancels out.
    factor, max_pos = params["factor"], params["max_position_embeddings"]
    base = base * ((factor * max_pos / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim), 1.0


def _llama3(base: float, dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    inv_freq = _base_inv_freq(base, dim)
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_range(params: dict[str, Any], dim: int, base: float) -> tuple[float, float]:
    original = params["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = correction_dim(params.get("beta_fast") or 32)
    high = correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn(base: float, dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    factor = params["factor"]
    if factor is None:
        factor = params["max_position_embeddings"] / params["original_max_position_embeddings"]
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float) / dim)
    low, high = _yarn_correction_range(params, dim, base)
    if low == high:
        high += 0.001  # avoid a zero-width ramp, as HF does
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (
        1.0 / pos_freqs
    ) * extrapolation_factor
    return inv_freq, attention_factor


_SCALED_INV_FREQ = {"linear": _linear, "dynamic": _dynamic, "llama3": _llama3, "yarn": _yarn}


def compute_inv_freq(
    head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None
) -> tuple[torch.Tensor, float]:
    """Return ``(inv_freq [head_dim/2] fp32 on CPU, attention scaling of cos/sin)``."""
    if rope_scaling is None:
        return 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    rope_type = rope_scaling["rope_type"]
    if rope_type not in _SCALED_INV_FREQ:
        supported = ", ".join(("default", *_SCALED_INV_FREQ))
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {supported}")
    return _SCALED_INV_FREQ[rope_type](rope_theta, head_dim, rope_scaling)


def apply_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [T, H, D]`` and ``k [T, Hkv, D]`` at ``positions`` using ``[max_pos, D/2]`` caches.

    The native op; the Triton one (``Ops.triton``) rotates in place and returns its inputs.
    """
    cos = cos_cache[positions].unsqueeze(1).to(q.dtype)
    sin = sin_cache[positions].unsqueeze(1).to(q.dtype)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Same products as HF's ``x * cos + rotate_half(x) * sin`` on each half, so fp32 results match.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEmbedding(nn.Module):
    """``cos``/``sin`` caches ``[max_position, head_dim/2]`` in fp32; indexing them needs no host sync."""

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        rope_theta: float,
        rope_scaling: dict[str, Any] | None,
        ops: Ops,
    ) -> None:
        super().__init__()
        self._apply_rotary = ops.apply_rotary
        device = torch.get_default_device()  # the model is built under a target-device context
        with torch.device("cpu"):  # HF computes the frequencies on the CPU; do the same for exactness
            inv_freq, attention_scaling = compute_inv_freq(head_dim, rope_theta, rope_scaling)
            freqs = torch.arange(max_position, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
            cos, sin = freqs.cos() * attention_scaling, freqs.sin() * attention_scaling
        self.register_buffer("cos_cache", cos.to(device), persistent=False)
        self.register_buffer("sin_cache", sin.to(device), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._apply_rotary(positions, q, k, self.cos_cache, self.sin_cache)
