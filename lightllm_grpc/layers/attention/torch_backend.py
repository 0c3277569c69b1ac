"""Reference attention backend in plain torch: runs on CPU, and on GPU as a correctness baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightllm_grpc.layers.attention.base import AttentionBackend, KVCache, quantize_kv
from lightllm_grpc.layers.forward_batch import ForwardBatch, ForwardMode


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write new K/V ``[T, Hkv, D]`` at pool rows ``slots`` (the Triton backend uses a kernel instead);
    with scales (an FP8 pool) as ``quantize_kv`` stores them."""
    if k_scale is None or v_scale is None:
        k_cache.index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.index_copy_(0, slots, v.to(v_cache.dtype))
        return
    # torch has no index_copy_ for e4m3: copy the bytes.
    k_cache.view(torch.uint8).index_copy_(0, slots, quantize_kv(k, k_scale).view(torch.uint8))
    v_cache.view(torch.uint8).index_copy_(0, slots, quantize_kv(v, v_scale).view(torch.uint8))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped-query attention in fp32.

    ``q [B, n, H, D]``, ``k``/``v [B, L, Hkv, D]``, boolean ``mask`` broadcastable to
    ``[B, H, n, L]`` (True = may attend). Returns ``[B, n, H, D]`` in ``q``'s dtype. Query head
    ``h`` reads kv head ``h // (H / Hkv)``, the same grouping as transformers' ``repeat_kv``.
    ``k_scale``/``v_scale`` (FP8 rows gathered from the pool) multiply k/v once in fp32.
    """
    group = q.shape[2] // k.shape[2]
    qf = q.transpose(1, 2).float()
    kf = _dequantized(k.transpose(1, 2), k_scale).repeat_interleave(group, dim=1)
    vf = _dequantized(v.transpose(1, 2), v_scale).repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).to(q.dtype)


def _dequantized(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return x.float() if scale is None else x.float() * scale


class TorchAttentionBackend(AttentionBackend):
    """Prefill loops over sequences on the host; decode is one batched, padded, sync-free call;
    a mixed batch runs its prefill part and its decode part each that way."""

    def store(
        self, k: torch.Tensor, v: torch.Tensor, layer: int, out_slots: torch.Tensor, kv: KVCache
    ) -> None:
        store_kv(kv.k[layer], kv.v[layer], k, v, out_slots, *kv.scales(layer))

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
        del new_kv  # the reference path reads every key from the pool
        scales = kv.scales(layer)  # (None, None) unless the pool is FP8
        if batch.mode is ForwardMode.DECODE:
            return _into(out, self._decode(q, kv.k[layer], kv.v[layer], batch, scale, *scales))
        if batch.mode is ForwardMode.MIXED:
            prefill, decode = batch.split()
            tp = batch.num_prefill_tokens
            out = torch.empty_like(q) if out is None else out
            out[:tp] = self._prefill(q[:tp], kv.k[layer], kv.v[layer], prefill, scale, *scales)
            out[tp:] = self._decode(q[tp:], kv.k[layer], kv.v[layer], decode, scale, *scales)
            return out
        return _into(out, self._prefill(q, kv.k[layer], kv.v[layer], batch, scale, *scales))

    @staticmethod
    def _prefill(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        per_seq = zip(
            batch.q_starts.tolist(),
            batch.q_lens.tolist(),
            batch.seq_lens.tolist(),
            batch.req_rows.tolist(),
            strict=True,
        )
        for start, q_len, seq_len, row in per_seq:
            slots = batch.req_to_token[row, :seq_len].long()
            # Query i sits at position (seq_len - q_len + i) and sees keys 0..that position.
            query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]
            seq_q, seq_k, seq_v = q[start : start + q_len][None], k_cache[slots][None], v_cache[slots][None]
            out[start : start + q_len] = attend(seq_q, seq_k, seq_v, mask, scale, k_scale, v_scale)[0]
        return out

    @staticmethod
    def _decode(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if batch.group_sizes is not None:
            _check_groups(batch)
        width = min(batch.max_seq_len, batch.req_to_token.shape[1])
        # Entries past a sequence's length may be stale or unset: clamp to a valid slot, then mask out.
        slots = batch.req_to_token[batch.req_rows.long(), :width].long().clamp(0, k_cache.shape[0] - 1)
        mask = torch.arange(width, device=q.device)[None, :] < batch.seq_lens[:, None]
        gathered = k_cache[slots], v_cache[slots]  # this batch's rows only, never the whole pool
        out = attend(q.unsqueeze(1), *gathered, mask[:, None, None, :], scale, k_scale, v_scale)
        return out.squeeze(1)


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    return result if out is None else out.copy_(result)


def _check_groups(batch: ForwardBatch) -> None:
    """Prefix groups are only a promise to a faster kernel; this backend attends to every key
    anyway, so it checks the promise (a wrong group would be silent corruption on GPU)."""
    assert batch.shared_lens is not None and batch.group_sizes is not None
    rows, shared, sizes = batch.req_rows.tolist(), batch.shared_lens.tolist(), batch.group_sizes.tolist()
    for b, size in enumerate(sizes):
        if size == 0:
            continue
        n = shared[b]
        lead = batch.req_to_token[rows[b], :n]
        for m in range(b, b + size):
            if shared[m] != n or not torch.equal(batch.req_to_token[rows[m], :n], lead):
                raise ValueError(f"decode row {m} does not share the {n}-token prefix of its group at {b}")
