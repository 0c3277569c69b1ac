"""Scatter a layer's new K and V rows into their slots of the KV pool.

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
    quantize_kv_ref,
)


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
):
    # One program per new token: K and V of all its kv heads in one [BLOCK_H, BLOCK_D] tile.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t)
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < num_heads) & (offs_d < head_dim)
    dst = slot * stride_bs + offs_h * stride_bh + offs_d
    k = tl.load(k_ptr + t * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    if KV_FP8:
        # Correctly rounded division, as torch's, then a saturating round to nearest even.
        k = tl.clamp(tl.math.div_rn(k.to(tl.float32), tl.load(k_scale_ptr)), -FP8_MAX, FP8_MAX)
        v = tl.clamp(tl.math.div_rn(v.to(tl.float32), tl.load(v_scale_ptr)), -FP8_MAX, FP8_MAX)
    tl.store(k_buf_ptr + dst, k.to(k_buf_ptr.dtype.element_ty), mask=mask)
    tl.store(v_buf_ptr + dst, v.to(v_buf_ptr.dtype.element_ty), mask=mask)


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
    check_rows(k, "k", 3)
    check_rows(v, "v", 3, k.dtype)
    assert k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"
    num_tokens, num_heads, head_dim = k.shape
    fp8 = check_kv_cache(k_buf, v_buf, k.dtype, k_scale, v_scale)
    assert k_buf.shape[1:] == k.shape[1:], f"k_buf rows {tuple(k_buf.shape[1:])} != {tuple(k.shape[1:])}"
    check_index(slots, "slots", num_tokens, torch.int64)
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
    )


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
