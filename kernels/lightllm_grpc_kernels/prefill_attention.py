"""Causal attention for packed variable-length prefill chunks that may follow a cached prefix.

An FP8 (e4m3) pool is read as stored: tiles are converted to the queries' dtype (exact), the K
scale folds into the softmax scale and the V scale multiplies the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightllm_grpc_kernels._launch import (
    block,
    check_index,
    check_kv_cache,
    check_rows,
    dequantize_kv_ref,
    dot_precision,
    on_gpu,
    pdl,
    wait_for_predecessor,
)

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    n_start,
    kv_end,
    slot_row,
    k_buf_ptr,
    v_buf_ptr,
    kv_offset,
    stride_bs,
    offs_d,
    d_mask,
    qk_scale,
    BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One online-softmax step over keys [n_start, n_start + BLOCK_N), scores in log2 units.
    # K/V tiles in q's dtype: a no-op but for an FP8 pool (whose scales the caller applies).
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < kv_end
    slots = tl.load(slot_row + offs_n, mask=n_mask, other=0).to(tl.int64)
    kv_offs = slots[:, None] * stride_bs + kv_offset + offs_d[None, :]
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_buf_ptr + kv_offs, mask=kv_mask, other=0.0).to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if CAUSAL_MASK:
        qk = tl.where((offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :], qk, float("-inf"))
    # Finite: every row sees key 0, which is in the first tile it visits.
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_buf_ptr + kv_offs, mask=kv_mask, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_attention_kernel(
    q_ptr,
    k_buf_ptr,
    v_buf_ptr,
    out_ptr,
    req_to_token_ptr,
    req_rows_ptr,
    seq_lens_ptr,
    q_starts_ptr,
    q_lens_ptr,
    k_scale_ptr,
    v_scale_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bs,
    stride_bh,
    stride_rt,
    head_dim,
    GROUP: tl.constexpr,
    KV_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    # Program (b, h, m): query rows [m*BLOCK_M, (m+1)*BLOCK_M) of sequence b's new tokens, head h.
    b = tl.program_id(0)
    h = tl.program_id(1)
    m_start = tl.program_id(2) * BLOCK_M
    q_len = tl.load(q_lens_ptr + b)
    if m_start >= q_len:
        return  # the grid is sized by the longest chunk of the batch
    seq_len = tl.load(seq_lens_ptr + b)
    prefix_len = seq_len - q_len
    q_start = tl.load(q_starts_ptr + b).to(tl.int64)
    slot_row = req_to_token_ptr + tl.load(req_rows_ptr + b).to(tl.int64) * stride_rt
    kv_offset = (h // GROUP) * stride_bh

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < head_dim
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    # Absolute position of each query row: it sees keys 0..pos.
    q_pos = prefix_len + offs_m
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Tiles wholly before the block's first query position are visible to every row: no causal
    # mask there. Keys past its last query position are hidden from every row: stop there.
    unmasked_end = (prefix_len + m_start + 1) // BLOCK_N * BLOCK_N
    kv_end = prefix_len + tl.minimum(m_start + BLOCK_M, q_len)
    for n_start in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, n_start, kv_end, slot_row, k_buf_ptr, v_buf_ptr, kv_offset,
            stride_bs, offs_d, d_mask, qk_scale, BLOCK_N, False, DOT_PRECISION,
        )  # fmt: skip
    for n_start in range(unmasked_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, n_start, kv_end, slot_row, k_buf_ptr, v_buf_ptr, kv_offset,
            stride_bs, offs_d, d_mask, qk_scale, BLOCK_N, True, DOT_PRECISION,
        )  # fmt: skip
    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr)

    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def _blocks(q: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); small tiles in the interpreter, which pays per element."""
    if not on_gpu(q):
        return 16, 16, 1, 1
    if q.shape[-1] > 128:
        return 64, 32, 4, 2
    if q.element_size() > 2:
        return 64, 64, 4, 2  # fp32 tiles of the 16-bit shape would overflow shared memory
    # Best of seven configs on an H200 (H=32, Hkv=8, D=128, bf16): 268-357 TFLOP/s for chunks
    # of 512 and more tokens.
    return 128, 128, 8, 2


def prefill_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    max_q_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal GQA attention of the packed new tokens q [T, H, D] over their sequences' K/V.

    Sequence b's queries are q[q_starts[b] : q_starts[b] + q_lens[b]]; its keys and values
    (cached prefix and the new tokens, already stored) are k_buf/v_buf [S, Hkv, D] at the
    slots req_to_token[req_rows[b], :seq_lens[b]]. Query i sits at position
    seq_lens[b] - q_lens[b] + i and attends to positions 0..that. max_q_len is a host-side
    upper bound of q_lens (it sizes the grid without a device sync). An e4m3 pool needs
    ``k_scale`` and ``v_scale`` (one fp32 element each): it holds K / k_scale and V / v_scale.
    Returns out [T, H, D].
    """
    check_rows(q, "q", 3)
    num_tokens, num_heads, head_dim = q.shape
    fp8 = check_kv_cache(k_buf, v_buf, q.dtype, k_scale, v_scale)
    assert k_buf.shape[2] == head_dim, f"k_buf head_dim {k_buf.shape[2]} != {head_dim}"
    num_kv_heads = k_buf.shape[1]
    assert num_heads % num_kv_heads == 0, f"{num_heads} heads not a multiple of {num_kv_heads} kv heads"
    check_rows(req_to_token, "req_to_token", 2, torch.int32)
    batch = req_rows.shape[0]
    for name, t in (
        ("req_rows", req_rows),
        ("seq_lens", seq_lens),
        ("q_starts", q_starts),
        ("q_lens", q_lens),
    ):
        check_index(t, name, batch, torch.int32)
    out = torch.empty_like(q) if out is None else out
    check_rows(out, "out", 3, q.dtype)
    assert out.shape == q.shape, f"out {tuple(out.shape)} != q {tuple(q.shape)}"
    if num_tokens == 0 or batch == 0 or max_q_len == 0:
        return out
    block_m, block_n, num_warps, num_stages = _blocks(q)
    grid = (batch, num_heads, triton.cdiv(max_q_len, block_m))
    _prefill_attention_kernel[grid](
        q,
        k_buf,
        v_buf,
        out,
        req_to_token,
        req_rows,
        seq_lens,
        q_starts,
        q_lens,
        k_scale,
        v_scale,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_buf.stride(0),
        k_buf.stride(1),
        req_to_token.stride(0),
        head_dim,
        GROUP=num_heads // num_kv_heads,
        KV_FP8=fp8,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block(head_dim),
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl(q),
    )
    return out


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: int,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of one sequence in fp32: q [L, H, D], k/v [prefix_len + L, Hkv, D]
    (FP8 rows times ``k_scale``/``v_scale``)."""
    group = q.shape[1] // k.shape[1]
    kf = dequantize_kv_ref(k, k_scale).repeat_interleave(group, dim=1)
    vf = dequantize_kv_ref(v, v_scale).repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    q_pos = prefix_len + torch.arange(q.shape[0], device=q.device)
    hidden = torch.arange(k.shape[0], device=q.device)[None, :] > q_pos[:, None]
    probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, vf).to(q.dtype)


def prefill_attention_ref(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of :func:`prefill_attention` (loops over sequences on the host)."""
    out = torch.empty_like(q)
    for row, seq_len, start, q_len in zip(
        req_rows.tolist(), seq_lens.tolist(), q_starts.tolist(), q_lens.tolist(), strict=True
    ):
        slots = req_to_token[row, :seq_len].long()
        rows = slice(start, start + q_len)
        out[rows] = attention_ref(
            q[rows], k_buf[slots], v_buf[slots], seq_len - q_len, scale, k_scale, v_scale
        )
    return out
