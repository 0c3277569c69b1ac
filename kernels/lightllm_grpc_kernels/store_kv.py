"""Scatter a layer's new K and V rows into their slots of the KV pool; optionally rotate first.

``rotary_store_kv`` is ``apply_rotary`` then ``store_kv`` in one launch: it rotates q and k in
place and stores the rotated k, with the rotary kernel's roundings. (Prefill attention reads a
chunk's own keys from k, not the pool; decode reads only the pool.)

An FP8 pool (``torch.float8_e4m3fn``) stores ``clamp(x / scale, -448, 448)`` rounded to
e4m3, with one fp32 scale per layer for K and one for V (read from device memory, so a CUDA
graph captures the tensors, not their values).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightllm_grpc_kernels._launch import (
    FP8_KV_MAX,
    block,
    check_index,
    check_kv_cache,
    check_rows,
    on_gpu,
    pdl,
    quantize_kv_ref,
    wait_for_predecessor,
)
from lightllm_grpc_kernels.rotary import _rotate_heads, apply_rotary_ref, check_rotary


@triton.jit
def _to_pool(x, scale_ptr, pool_dtype, KV_FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    """``x`` as the pool stores it: as is, or divided by the layer's scale and clamped (FP8)."""
    if KV_FP8:
        # Correctly rounded division, as torch's, then a saturating round to nearest even.
        x = tl.clamp(tl.math.div_rn(x.to(tl.float32), tl.load(scale_ptr)), -FP8_MAX, FP8_MAX)
    return x.to(pool_dtype)


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_buf_ptr,
    v_buf_ptr,
    slots_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_bs,
    stride_bh,
    num_heads,
    head_dim,
    KV_FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    # One program per new token: K and V of all its kv heads in one [BLOCK_H, BLOCK_D] tile.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t)
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < num_heads) & (offs_d < head_dim)
    dst = slot * stride_bs + offs_h * stride_bh + offs_d
    k = tl.load(k_ptr + t * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    pool_dtype = k_buf_ptr.dtype.element_ty
    tl.store(k_buf_ptr + dst, _to_pool(k, k_scale_ptr, pool_dtype, KV_FP8, FP8_MAX), mask=mask)
    tl.store(v_buf_ptr + dst, _to_pool(v, v_scale_ptr, pool_dtype, KV_FP8, FP8_MAX), mask=mask)


def store_kv(
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Writes ``k_buf[slots[t]] = k[t]`` and ``v_buf[slots[t]] = v[t]`` for every token t.

    Same argument order as the torch backend's ``store_kv``, so either can stand for the other.

    k, v: [T, Hkv, D] (last dim contiguous; token/head strides are free, so views of a fused
    qkv output work). k_buf, v_buf: contiguous [S, Hkv, D] of k's dtype, or e4m3 with
    ``k_scale``/``v_scale`` (one fp32 element each): then ``clamp(k / k_scale, ±448)`` is stored.
    slots: [T] int64.
    """
    num_tokens, num_heads, head_dim = k.shape
    fp8 = _check_store(k_buf, v_buf, k, v, slots, k_scale, v_scale)
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_buf,
        v_buf,
        slots,
        k_scale,
        v_scale,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_buf.stride(0),
        k_buf.stride(1),
        num_heads,
        head_dim,
        KV_FP8=fp8,
        FP8_MAX=FP8_KV_MAX,
        BLOCK_H=block(num_heads),
        BLOCK_D=block(head_dim),
        **pdl(k),
    )


def _check_store(
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> bool:
    check_rows(k, "k", 3)
    check_rows(v, "v", 3, k.dtype)
    assert k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"
    fp8 = check_kv_cache(k_buf, v_buf, k.dtype, k_scale, v_scale)
    assert k_buf.shape[1:] == k.shape[1:], f"k_buf rows {tuple(k_buf.shape[1:])} != {tuple(k.shape[1:])}"
    check_index(slots, "slots", k.shape[0], torch.int64)
    return fp8


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, k_buf_ptr, v_buf_ptr, slots_ptr, pos_ptr, cos_ptr, sin_ptr, k_scale_ptr, v_scale_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bs, stride_bh,
    stride_cos, stride_sin, num_q_heads, num_kv_heads, head_dim,
    KV_FP8: tl.constexpr, FP8_MAX: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    wait_for_predecessor(PDL)
    # One program per token: the token's cos/sin row is loaded once for q and k, as in
    # _rotary_kernel, and the rotated k goes to the pool and back to k from registers.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slots_ptr + t)
    half = head_dim // 2
    offs_half = tl.arange(0, BLOCK_HALF)[None, :]
    dtype = q_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + pos * stride_cos + offs_half, mask=offs_half < half, other=0.0).to(dtype)
    sin = tl.load(sin_ptr + pos * stride_sin + offs_half, mask=offs_half < half, other=0.0).to(dtype)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, num_q_heads, half, cos, sin, BLOCK_HQ, BLOCK_HALF)

    pool_dtype = k_buf_ptr.dtype.element_ty
    offs_h = tl.arange(0, BLOCK_HK)[:, None]
    mask = (offs_h < num_kv_heads) & (offs_half < half)
    k_lo = k_ptr + t * stride_kt + offs_h * stride_kh + offs_half
    k1 = tl.load(k_lo, mask=mask, other=0.0)
    k2 = tl.load(k_lo + half, mask=mask, other=0.0)
    dst = k_buf_ptr + slot * stride_bs + offs_h * stride_bh + offs_half
    # The same expressions as _rotate_heads, so k and the pool hold what rotary-then-store writes.
    r1, r2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
    tl.store(k_lo, r1.to(dtype), mask=mask)
    tl.store(k_lo + half, r2.to(dtype), mask=mask)
    tl.store(dst, _to_pool(r1, k_scale_ptr, pool_dtype, KV_FP8, FP8_MAX), mask=mask)
    tl.store(dst + half, _to_pool(r2, k_scale_ptr, pool_dtype, KV_FP8, FP8_MAX), mask=mask)

    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < num_kv_heads) & (offs_d < head_dim)
    v = tl.load(v_ptr + t * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    dst = v_buf_ptr + slot * stride_bs + offs_h * stride_bh + offs_d
    tl.store(dst, _to_pool(v, v_scale_ptr, pool_dtype, KV_FP8, FP8_MAX), mask=mask)


def rotary_store_kv(
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``apply_rotary(positions, q, k, cos, sin)`` then ``store_kv(k_buf, v_buf, k, v, slots, ...)``
    in one launch, with the same results bit for bit (q and k rotated in place); returns q.

    Arguments as the two launchers take them (q [T, H, D], k and v [T, Hkv, D]; strides free
    but the last).
    """
    check_rotary(positions, q, k, cos, sin)
    num_tokens, num_kv_heads, head_dim = k.shape
    fp8 = _check_store(k_buf, v_buf, k, v, slots, k_scale, v_scale)
    if num_tokens == 0:
        return q
    _rotary_store_kv_kernel[(num_tokens,)](
        q, k, v, k_buf, v_buf, slots, positions, cos, sin, k_scale, v_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buf.stride(0), k_buf.stride(1), cos.stride(0), sin.stride(0),
        q.shape[1], num_kv_heads, head_dim,
        KV_FP8=fp8, FP8_MAX=FP8_KV_MAX,
        BLOCK_HQ=block(q.shape[1]), BLOCK_HK=block(num_kv_heads), BLOCK_HALF=block(head_dim // 2),
        BLOCK_D=block(head_dim),
        num_warps=4 if on_gpu(q) else 1,
        enable_fp_fusion=False,  # the rotary kernel's roundings: no FMA across them
        **pdl(q),
    )  # fmt: skip
    return q


def rotary_store_kv_ref(
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of :func:`rotary_store_kv` (rotates q and k in place)."""
    apply_rotary_ref(positions, q, k, cos, sin)
    store_kv_ref(k_buf, v_buf, k, v, slots, k_scale, v_scale)
    return q


def store_kv_ref(
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Torch reference of :func:`store_kv`."""
    k_buf[slots] = k if k_scale is None else quantize_kv_ref(k, k_scale)
    v_buf[slots] = v if v_scale is None else quantize_kv_ref(v, v_scale)
