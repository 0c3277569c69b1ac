"""The attention backend contract shared by the torch (CPU) and Triton (GPU) paths."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from lightllm_grpc.layers.forward_batch import ForwardBatch


class KVCache:
    """One preallocated K and V tensor per layer, indexed by slot id.

    ``k[layer]`` and ``v[layer]`` have shape ``[num_slots, num_kv_heads, head_dim]``.
    Slot ids are handed out by the coordinator; the cache itself never allocates.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_slots, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * itemsize


class AttentionBackend(ABC):
    """Stores a layer's new K/V into the pool, then computes causal attention.

    Contract: ``forward`` first writes ``k``/``v`` (shape ``[T, Hkv, D]``) at
    ``batch.out_slots`` of layer ``layer`` in ``kv``, then returns the attention output
    ``[T, H, D]`` for queries ``q`` (``[T, H, D]``), each query attending to its own
    sequence's keys at positions ``<=`` its own (read through ``batch.req_to_token``).
    ``H`` is a multiple of ``Hkv`` (grouped-query attention). The backend must not
    synchronise with the host in DECODE mode, so that decode can be captured in a CUDA graph.
    In MIXED mode it stores all T tokens' K/V first, then attends the prefill part
    (``batch.split()``) as in PREFILL mode and the decode rows as in DECODE mode, writing
    rows ``[0, num_prefill_tokens)`` and ``[num_prefill_tokens, T)`` of the one output.
    """

    @abstractmethod
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
