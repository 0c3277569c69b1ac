"""Attention on the GPU through the Triton kernels of ``lightllm_grpc_kernels``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from lightllm_grpc_kernels.decode_attention import (
    cascade_decode_attention,
    decode_attention,
    decode_num_splits,
    decode_workspace_rows,
)
from lightllm_grpc_kernels.prefill_attention import prefill_attention
from lightllm_grpc_kernels.store_kv import rotary_store_kv, store_kv

from lightllm_grpc.layers.attention.base import AttentionBackend, KVCache
from lightllm_grpc.layers.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from lightllm_grpc.layers.rotary import RotaryEmbedding


class TritonAttentionBackend(AttentionBackend):
    """Stores K/V with one scatter kernel (which also applies rotary in ``rotate_and_store``),
    then runs prefill or flash-decoding attention; a mixed batch runs both, each writing its
    part of one output. Prefill reads a chunk's own K/V from ``new_kv`` when given (contiguous:
    TMA on Hopper), and only the cached prefix through the pool's slots.

    The decode workspace (partial outputs and log-sum-exps of every split) is allocated once
    here for ``max_batch_size`` and shared by all layers, which run one after another; decode
    therefore allocates nothing but its output and never syncs with the host, so it can be
    captured in a CUDA graph. ``num_splits`` fixes the split count; by default it follows
    the batch size (``decode_num_splits``). ``merge_splits`` merges the splits inside the
    decode kernel (the last program of each sequence and kv head, through counters kept here)
    instead of a second launch; it is off until a GPU measurement says it wins
    (``python -m lightllm_grpc_kernels.bench --only decode_stages --graph``).
    """

    def __init__(
        self,
        max_batch_size: int,
        num_heads: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
        num_splits: int | None = None,
        merge_splits: bool = False,
    ) -> None:
        assert max_batch_size > 0 and num_heads > 0 and head_dim > 0, "sizes must be positive"
        assert num_splits is None or num_splits > 0, f"num_splits must be positive, got {num_splits}"
        self.max_batch_size = max_batch_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.num_splits = num_splits
        rows = decode_workspace_rows(max_batch_size) if num_splits is None else max_batch_size * num_splits
        rows += max_batch_size  # cascade attention keeps one more partial per row (the shared prefix)
        self._mid_o = torch.empty(rows * num_heads * head_dim, dtype=torch.float32, device=device)
        self._mid_lse = torch.empty(rows * num_heads, dtype=torch.float32, device=device)
        # One per (sequence, kv head) (num_heads bounds the kv heads); every call leaves them zero.
        self._counters = (
            torch.zeros(max_batch_size * num_heads, dtype=torch.int32, device=device)
            if merge_splits
            else None
        )

    def store(
        self, k: torch.Tensor, v: torch.Tensor, layer: int, out_slots: torch.Tensor, kv: KVCache
    ) -> None:
        store_kv(kv.k[layer], kv.v[layer], k, v, out_slots, *kv.scales(layer))

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
        """One kernel: q and k rotated in place, the rotated k and v into the pool."""
        rotary_store_kv(kv.k[layer], kv.v[layer], q, k, v, out_slots, positions,
                        rope.cos_cache, rope.sin_cache, *kv.scales(layer))  # fmt: skip
        return q, k

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
        assert q.dtype == self.dtype, f"q is {q.dtype}, backend built for {self.dtype}"
        assert q.shape[1:] == (self.num_heads, self.head_dim), f"q {tuple(q.shape)} vs backend heads"
        k_buf, v_buf = kv.k[layer], kv.v[layer]
        k_scale, v_scale = kv.scales(layer)  # None unless the pool is FP8
        if batch.mode is ForwardMode.DECODE:
            return self._decode(q, k_buf, v_buf, batch, scale, k_scale, v_scale, out=out)
        if batch.mode is ForwardMode.PREFILL:
            return self._prefill(q, k_buf, v_buf, batch, scale, k_scale, v_scale, out, new_kv)
        prefill, decode = batch.split()
        tp = batch.num_prefill_tokens
        out = torch.empty_like(q) if out is None else out
        chunk_kv = None if new_kv is None else (new_kv[0][:tp], new_kv[1][:tp])
        self._prefill(q[:tp], k_buf, v_buf, prefill, scale, k_scale, v_scale, out[:tp], chunk_kv)
        self._decode(q[tp:], k_buf, v_buf, decode, scale, k_scale, v_scale, out=out[tp:])
        return out

    @staticmethod
    def _prefill(
        q: torch.Tensor,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        k, v = (None, None) if new_kv is None else new_kv
        return prefill_attention(
            q,
            k_buf,
            v_buf,
            batch.req_to_token,
            batch.req_rows,
            batch.seq_lens,
            batch.q_starts,
            batch.q_lens,
            batch.max_q_len,
            scale,
            k_scale=k_scale,
            v_scale=v_scale,
            out=out,
            k=k,
            v=v,
            max_seq_len=batch.max_seq_len,
        )

    def _decode(
        self,
        q: torch.Tensor,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        size = batch.batch_size
        assert size <= self.max_batch_size, f"decode batch {size} > max_batch_size {self.max_batch_size}"
        assert q.shape[0] == size, f"decode needs one query per sequence: {q.shape[0]} vs {size}"
        splits = decode_num_splits(size) if self.num_splits is None else self.num_splits
        if batch.shared_lens is not None and batch.group_sizes is not None:
            # Rows sharing a prefix read its K/V once per group; one more partial per row.
            rows = size * self.num_heads * (splits + 1)
            mid_o = self._mid_o[: rows * self.head_dim].view(size, self.num_heads, splits + 1, self.head_dim)
            mid_lse = self._mid_lse[:rows].view(size, self.num_heads, splits + 1)
            return cascade_decode_attention(
                q, k_buf, v_buf, batch.req_to_token, batch.req_rows, batch.seq_lens,
                batch.shared_lens, batch.group_sizes, scale, num_splits=splits, mid_o=mid_o, mid_lse=mid_lse,
                k_scale=k_scale, v_scale=v_scale, out=out,
            )  # fmt: skip
        rows = size * self.num_heads * splits
        # Views of the preallocated buffers: same addresses on every call of a given size.
        mid_o = self._mid_o[: rows * self.head_dim].view(size, self.num_heads, splits, self.head_dim)
        mid_lse = self._mid_lse[:rows].view(size, self.num_heads, splits)
        return decode_attention(
            q,
            k_buf,
            v_buf,
            batch.req_to_token,
            batch.req_rows,
            batch.seq_lens,
            scale,
            num_splits=splits,
            mid_o=mid_o,
            mid_lse=mid_lse,
            k_scale=k_scale,
            v_scale=v_scale,
            out=out,
            counters=self._counters,
        )
