"""Neox-style rotary embedding applied in place to q and k from a precomputed cos/sin cache.

Rounds like HF (and ``lightllm_grpc.layers.rotary``): cos/sin are cast to the activation
dtype and the products and sums are computed in it, one rounding per operation, so 16-bit
results match the torch path bit for bit. That needs FMA contraction off
(``enable_fp_fusion=False``): a fused multiply-add rounds once where torch rounds twice, and
with it on 16-bit outputs differed from torch in most elements on an H100.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightllm_grpc_kernels._launch import block, check_index, check_rows, on_gpu, pdl, wait_for_predecessor


@triton.jit
def _rotate_heads(
    x_ptr, stride_h, num_heads, half, cos, sin, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr
):
    # Rotates the pairs (x[i], x[i + D/2]) of every head of one token, in x's dtype.
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (offs_h < num_heads) & (offs_d < half)
    lo_ptr = x_ptr + offs_h * stride_h + offs_d
    x1 = tl.load(lo_ptr, mask=mask, other=0.0)
    x2 = tl.load(lo_ptr + half, mask=mask, other=0.0)
    tl.store(lo_ptr, x1 * cos - x2 * sin, mask=mask)
    tl.store(lo_ptr + half, x2 * cos + x1 * sin, mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_sin,
    num_q_heads,
    num_kv_heads,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    # One program per token: q and k share the token's cos/sin row, loaded once.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    dtype = q_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=offs_d < half, other=0.0).to(dtype)
    sin = tl.load(sin_ptr + pos * stride_sin + offs_d, mask=offs_d < half, other=0.0).to(dtype)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, num_q_heads, half, cos, sin, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, num_kv_heads, half, cos, sin, BLOCK_HK, BLOCK_HALF)


def apply_rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, H, D] and k [T, Hkv, D] in place (neox style: pairs i and i + D/2); returns them.

    positions: [T] int64. cos, sin: [max_pos, D/2] (any float dtype, last dim contiguous),
    from the model's rope implementation, which owns frequency scaling. Same signature as
    ``lightllm_grpc.layers.rotary.apply_rotary``.
    """
    check_rotary(positions, q, k, cos, sin)
    num_tokens, num_q_heads, head_dim = q.shape
    half = head_dim // 2
    if num_tokens == 0:
        return q, k
    _rotary_kernel[(num_tokens,)](
        q,
        k,
        positions,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        num_q_heads,
        k.shape[1],
        half,
        BLOCK_HQ=block(num_q_heads),
        BLOCK_HK=block(k.shape[1]),
        BLOCK_HALF=block(half),
        num_warps=4 if on_gpu(q) else 1,
        enable_fp_fusion=False,
        **pdl(q),
    )
    return q, k


def check_rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Asserts the shapes, dtypes and strides ``apply_rotary`` (and ``rotary_store_kv``) take."""
    check_rows(q, "q", 3)
    check_rows(k, "k", 3, q.dtype)
    num_tokens, _, head_dim = q.shape
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim, f"k {tuple(k.shape)} vs q {tuple(q.shape)}"
    assert head_dim % 2 == 0, f"head_dim {head_dim} must be even"
    check_index(positions, "positions", num_tokens, torch.int64)
    half = head_dim // 2
    for name, table in (("cos", cos), ("sin", sin)):
        check_rows(table, name, 2)
        assert table.shape[1] == half, f"{name} must be [max_pos, {half}], got {tuple(table.shape)}"


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rotary_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`apply_rotary` (also in place), in q's dtype as HF computes it."""
    c = cos[positions][:, None, :].to(q.dtype)
    s = sin[positions][:, None, :].to(q.dtype)
    q.copy_(_rotate_ref(q, c, s))
    k.copy_(_rotate_ref(k, c, s))
    return q, k
