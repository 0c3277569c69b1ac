"""The attention backend contract shared by the torch (CPU) and Triton (GPU) paths."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lightllm_grpc.layers.forward_batch import ForwardBatch
from lightllm_grpc.layers.fp8 import FP8, FP8_MAX

if TYPE_CHECKING:
    from lightllm_grpc.layers.rotary import RotaryEmbedding

__all__ = ["FP8", "AttentionBackend", "KVCache", "quantize_kv"]

# --kv-cache-dtype: "auto" stores K/V in the model dtype; "fp8_e4m3" in e4m3 with per-layer scales.


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What an FP8 pool stores for ``x``: ``x / scale`` in fp32, clamped to ±448, rounded to e4m3.
    (The store kernel's ``quantize_kv_ref`` is the same rule; importing it here would load the
    kernels on every CPU path, and the backends' test compares the bytes both store.)"""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


class KVCache:
    """One preallocated K and V tensor per layer, indexed by slot id.

    ``k[layer]`` and ``v[layer]`` have shape ``[num_slots, num_kv_heads, head_dim]``.
    Slot ids are handed out by the coordinator; the cache itself never allocates.

    With ``dtype`` ``torch.float8_e4m3fn`` (``--kv-cache-dtype fp8_e4m3``) the pool holds
    ``clamp(K / k_scale[layer], ±448)`` and ``clamp(V / v_scale[layer], ±448)`` in e4m3, and
    attention reads it as stored times the scale. ``k_scale`` and ``v_scale`` are fp32
    ``[num_layers]`` device tensors (1.0 unless given, e.g. from the checkpoint); kernels read
    them from memory, so CUDA graphs capture the tensors, and they exist (unused) for any dtype.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        k_scales: Sequence[float] | None = None,
        v_scales: Sequence[float] | None = None,
    ) -> None:
        shape = (num_slots, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.dtype = dtype
        self.k_scale = _scales(k_scales, num_layers, device)
        self.v_scale = _scales(v_scales, num_layers, device)
        # Each layer's pair as views made once (the pool is read every layer of every step).
        self._scales = [(self.k_scale[i], self.v_scale[i]) for i in range(num_layers)]

    @property
    def fp8(self) -> bool:
        return self.dtype == FP8

    def scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """``(k_scale, v_scale)`` of ``layer`` (0-dim fp32 views) for an FP8 pool; None otherwise."""
        return self._scales[layer] if self.fp8 else (None, None)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V of every layer in the storage ``dtype`` (1 byte an element for FP8, 2 for bf16)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * itemsize


# fp32 elements from one layer's scale to the next: 16 bytes, so every layer's scale pointer is
# 16-byte aligned. Triton compiles a kernel per pointer alignment; packed, only every fourth
# layer's would be, and each attention kernel would compile twice.
_SCALE_STRIDE = 4


def _scales(values: Sequence[float] | None, num_layers: int, device: torch.device | str) -> torch.Tensor:
    """The layers' scales as a ``[num_layers]`` view, one element every 16 bytes."""
    store = torch.ones((num_layers, _SCALE_STRIDE), dtype=torch.float32, device=device)
    if values is not None:
        if len(values) != num_layers or not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"KV scales must be {num_layers} finite positive numbers, got {list(values)}")
        store[:, 0] = torch.tensor(list(values), dtype=torch.float32)
    return store[:, 0]


class AttentionBackend(ABC):
    """Stores a layer's new K/V into the pool, then computes causal attention.

    Contract: ``forward`` first writes ``k``/``v`` (shape ``[T, Hkv, D]``) at
    ``batch.out_slots`` of layer ``layer`` in ``kv``, then returns the attention output
    ``[T, H, D]`` for queries ``q`` (``[T, H, D]``), each query attending to its own
    sequence's keys at positions ``<=`` its own (read through ``batch.req_to_token``).
    ``H`` is a multiple of ``Hkv`` (grouped-query attention). An FP8 pool (``kv.fp8``) stores
    ``quantize_kv`` of k/v with the layer's scales (``kv.scales(layer)``) and attention reads the
    stored values times them, without a dequantized copy of the pool. The backend must not
    synchronise with the host in DECODE mode, so that decode can be captured in a CUDA graph.
    In MIXED mode it stores all T tokens' K/V first, then attends the prefill part
    (``batch.split()``) as in PREFILL mode and the decode rows as in DECODE mode, writing
    rows ``[0, num_prefill_tokens)`` and ``[num_prefill_tokens, T)`` of the one output.

    ``forward`` is ``store`` then ``attend``, which piecewise CUDA graphs
    (shard/piecewise_graph.py) call apart: ``store`` (device-side only, never syncs, so it can
    be captured at any token count) inside a graph, ``attend`` eagerly between graphs.
    ``rotate_and_store`` is rotary then ``store``, which a backend may do in one kernel (the
    Triton one does; the model calls it when ``Ops.rotary_in_kv_store``).
    """

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: int,
        batch: ForwardBatch,
        kv: KVCache,
        scale: float,
    ) -> torch.Tensor:
        """Store k/v, then attend; see the class docstring."""
        self.store(k, v, layer, batch.out_slots, kv)
        return self.attend(q, layer, batch, kv, scale, new_kv=(k, v))

    @abstractmethod
    def store(
        self, k: torch.Tensor, v: torch.Tensor, layer: int, out_slots: torch.Tensor, kv: KVCache
    ) -> None:
        """Write ``k``/``v`` ``[T, Hkv, D]`` at pool slots ``out_slots`` ``[T]`` (int64) of ``layer``."""

    def rotate_and_store(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: int,
        positions: torch.Tensor,
        out_slots: torch.Tensor,
        kv: KVCache,
        rope: RotaryEmbedding,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``rope(positions, q, k)``, then ``store`` of the rotated k with v; returns the rotated
        ``(q, k)`` (``attend``'s ``new_kv`` takes that k). Either may be rotated in place.
        Device-side only, like ``store``. This default is the two ops; a backend may fuse them,
        bit for bit."""
        q, k = rope(positions, q, k)
        self.store(k, v, layer, out_slots, kv)
        return q, k

    @abstractmethod
    def attend(
        self,
        q: torch.Tensor,
        layer: int,
        batch: ForwardBatch,
        kv: KVCache,
        scale: float,
        out: torch.Tensor | None = None,
        new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attention of ``q`` over the pool, whose new K/V are already stored; written into
        ``out`` (``[T, H, D]``, contiguous) when given, and returned. ``new_kv``: the new
        tokens' ``(k, v)`` ``[T, Hkv, D]`` as stored (k rotated), rows aligned with q's; a
        backend may read a prefill chunk's own keys from them rather than from the pool."""
