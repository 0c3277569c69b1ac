"""Causal attention for packed variable-length prefill chunks that may follow a cached prefix.

Each program owns BLOCK_M query rows of one sequence's chunk and one head, and walks the keys in
three runs: the cached prefix (read from the pool through ``req_to_token``, visible to every
row), the chunk's keys before its block (visible to every row: no mask) and the diagonal block
(causal mask). Given the chunk's own K/V as the layer computed them (``k``/``v``, rotated, rows
aligned with q), the last two runs read them from there, contiguous: on Hopper through TMA
tensor descriptors (whole tiles into shared memory, no address arithmetic per element), which
measured 1.1-1.6x the pool-only kernel's GPU time on an H100 (BENCHMARKS.md, "Session of 2026-11-28, fourth");
the prefix still needs the pool's per-token slots. Without them (or with an FP8 pool, whose rows
differ from the layer's bf16 ones) every key is read from the pool. Blocks are visited longest
first, so the heavy diagonal programs of long chunks do not start last.

An FP8 (e4m3) pool is read as stored: tiles are converted to the queries' dtype (exact), the K
scale folds into the softmax scale and the V scale multiplies the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from lightllm_grpc_kernels._launch import (
    block,
    check_index,
    check_kv_cache,
    check_rows,
    dequantize_kv_ref,
    dot_precision,
    hopper_or_newer,
    on_gpu,
    pdl,
    wait_for_predecessor,
)

_LOG2E = 1.4426950408889634


@triton.jit
def _softmax_step(
    acc, m_i, l_i, q, k, v, qk_scale, visible, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr
):
    # One online-softmax step over a key tile, scores in log2 units. K/V arrive in q's dtype.
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        qk = tl.where(visible, qk, float("-inf"))
    # Finite: every row sees key 0, which is in the first tile it visits.
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _pool_tile(k_buf_ptr, v_buf_ptr, slot_row, n_start, end, kv_offset, stride_bs, offs_d, d_mask, dtype,
               BLOCK_N: tl.constexpr):  # fmt: skip
    # Keys [n_start, n_start + BLOCK_N) of a sequence, those before ``end``, through its slots.
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < end
    slots = tl.load(slot_row + offs_n, mask=n_mask, other=0).to(tl.int64)
    offs = slots[:, None] * stride_bs + kv_offset + offs_d[None, :]
    mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_buf_ptr + offs, mask=mask, other=0.0).to(dtype)
    v = tl.load(v_buf_ptr + offs, mask=mask, other=0.0).to(dtype)
    return k, v, offs_n, n_mask


@triton.jit
def _chunk_tile(
    k_ptr, v_ptr, k_desc, v_desc, q_start, n_start, end, kv_head, stride_kt, stride_kh, stride_vt, stride_vh,
    offs_d, d_mask, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    # The chunk's own keys [n_start, n_start + BLOCK_N), those before ``end``, from the layer's k/v.
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < end
    if TMA:  # rows past the chunk belong to the next sequence or lie past T (zeros): masked by the caller
        k = k_desc.load([q_start + n_start, kv_head * BLOCK_D])
        v = v_desc.load([q_start + n_start, kv_head * BLOCK_D])
    else:
        rows = (q_start + offs_n).to(tl.int64)[:, None]
        mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + rows * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=mask, other=0.0)
        v = tl.load(v_ptr + rows * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=mask, other=0.0)
    return k, v, offs_n, n_mask


@triton.jit
def _prefill_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
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
    q_desc,
    k_desc,
    v_desc,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bs,
    stride_bh,
    stride_rt,
    head_dim,
    GROUP: tl.constexpr,
    KV_FP8: tl.constexpr,
    CHUNK_KV: tl.constexpr,
    TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    # Program (b, h, m): query rows [m*BLOCK_M, (m+1)*BLOCK_M) of sequence b's new tokens, head h;
    # m counts down, so the blocks with the most keys are scheduled first.
    b = tl.program_id(0)
    h = tl.program_id(1)
    m_start = (tl.num_programs(2) - 1 - tl.program_id(2)) * BLOCK_M
    q_len = tl.load(q_lens_ptr + b)
    # No early return: the Hopper pipeliner wants structured control flow.
    if m_start < q_len:
        _attend_block(
            q_ptr, k_ptr, v_ptr, k_buf_ptr, v_buf_ptr, out_ptr, req_to_token_ptr, req_rows_ptr, seq_lens_ptr,
            q_starts_ptr, k_scale_ptr, v_scale_ptr, q_desc, k_desc, v_desc, qk_scale, stride_qt, stride_qh,
            stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_bs, stride_bh, stride_rt,
            head_dim, b, h, m_start, q_len, GROUP, KV_FP8, CHUNK_KV, TMA, BLOCK_M, BLOCK_N, BLOCK_D,
            DOT_PRECISION,
        )  # fmt: skip


@triton.jit
def _attend_block(
    q_ptr, k_ptr, v_ptr, k_buf_ptr, v_buf_ptr, out_ptr, req_to_token_ptr, req_rows_ptr, seq_lens_ptr,
    q_starts_ptr, k_scale_ptr, v_scale_ptr, q_desc, k_desc, v_desc, qk_scale, stride_qt, stride_qh,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_bs, stride_bh, stride_rt,
    head_dim, b, h, m_start, q_len,
    GROUP: tl.constexpr, KV_FP8: tl.constexpr, CHUNK_KV: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    prefix_len = tl.load(seq_lens_ptr + b) - q_len
    q_start = tl.load(q_starts_ptr + b)
    slot_row = req_to_token_ptr + tl.load(req_rows_ptr + b).to(tl.int64) * stride_rt
    kv_head = h // GROUP
    kv_offset = kv_head * stride_bh

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < head_dim
    q_rows = (q_start + offs_m).to(tl.int64)
    if TMA:
        q = q_desc.load([q_start + m_start, h * BLOCK_D])
    else:
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_end = tl.minimum(m_start + BLOCK_M, q_len)
    # Positions every row of the block sees: the prefix, and the chunk's keys before the block.
    shared_end = prefix_len if CHUNK_KV else prefix_len + m_start
    for n_start in range(0, shared_end, BLOCK_N):
        k, v, offs_n, n_mask = _pool_tile(k_buf_ptr, v_buf_ptr, slot_row, n_start, shared_end, kv_offset,
                                          stride_bs, offs_d, d_mask, q.dtype, BLOCK_N)  # fmt: skip
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, qk_scale, n_mask[None, :], True, DOT_PRECISION)
    if CHUNK_KV:
        # m_start is a multiple of BLOCK_N (BLOCK_M is), so these tiles need no mask.
        for n_start in range(0, m_start, BLOCK_N):
            k, v, offs_n, n_mask = _chunk_tile(k_ptr, v_ptr, k_desc, v_desc, q_start, n_start, m_end, kv_head,
                                               stride_kt, stride_kh, stride_vt, stride_vh, offs_d, d_mask,
                                               BLOCK_N, BLOCK_D, TMA)  # fmt: skip
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, qk_scale, None, False, DOT_PRECISION)
        for n_start in range(m_start, m_end, BLOCK_N):
            k, v, offs_n, n_mask = _chunk_tile(k_ptr, v_ptr, k_desc, v_desc, q_start, n_start, m_end, kv_head,
                                               stride_kt, stride_kh, stride_vt, stride_vh, offs_d, d_mask,
                                               BLOCK_N, BLOCK_D, TMA)  # fmt: skip
            visible = (offs_n[None, :] <= offs_m[:, None]) & n_mask[None, :]
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, qk_scale, visible, True, DOT_PRECISION)
    else:
        # The diagonal from the pool, by absolute position: query i sits at prefix_len + i.
        for n_start in range(shared_end, prefix_len + m_end, BLOCK_N):
            k, v, offs_n, n_mask = _pool_tile(
                k_buf_ptr, v_buf_ptr, slot_row, n_start, prefix_len + m_end, kv_offset, stride_bs, offs_d,
                d_mask, q.dtype, BLOCK_N,
            )  # fmt: skip
            visible = (offs_n[None, :] <= prefix_len + offs_m[:, None]) & n_mask[None, :]
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, qk_scale, visible, True, DOT_PRECISION)
    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr)
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def _tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors can address these [T, heads, D] views: D a power of two and rows of
    whole heads, base and row stride 16-byte aligned (the copy engine's rule)."""
    for t in tensors:
        size = t.element_size()
        head_dim = t.shape[-1]
        if head_dim & (head_dim - 1) or head_dim * size < 16 or t.stride(1) != head_dim:
            return False
        if t.data_ptr() % 16 or (t.stride(0) * size) % 16:
            return False
    return True


# Least attention work (tokens x max sequence length x heads x head_dim) for which TMA is chosen.
# A launch with three host-side descriptors costs 40-130 µs more host time than one with pointers
# (Triton 3.6, H100), while on the GPU TMA wins at every size (BENCHMARKS.md, "Session of
# 2026-11-28, fourth"): below ~2^36 (a 4k-token chunk of 32 x 128 heads, ~0.3 ms of attention)
# the host cost would not be hidden.
TMA_MIN_WORK = 1 << 36


def use_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_seq_len: int = 0) -> bool:
    """The default of ``prefill_attention(tma=None)``: the chunk's K/V through TMA where the GPU
    has it and the work (``max_seq_len``: a host bound of the sequences' lengths) pays its
    launch. Only the measured tiles: 16-bit q, k and v, head_dim up to 128."""
    if q.element_size() != 2 or q.shape[2] > 128:
        return False
    if q.shape[0] * max_seq_len * q.shape[1] * q.shape[2] < TMA_MIN_WORK:
        return False
    return hopper_or_newer(q) and _tma_ready(q, k, v)


def _blocks(q: torch.Tensor, tma: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); small tiles in the interpreter, which pays per
    element. BLOCK_M is a multiple of BLOCK_N (the chunk's unmasked run starts on a tile)."""
    if not on_gpu(q):
        return 16, 16, 1, 1
    if q.shape[-1] > 128:
        return 64, 32, 4, 2
    if q.element_size() > 2:
        return 64, 64, 4, 2  # fp32 tiles of the 16-bit shape would overflow shared memory
    if tma:
        # Best of seven configs on an H100 (H=32, Hkv=8, D=128, bf16) wherever the work is large
        # enough for TMA (use_tma): 128 x 128 tiles, three stages (229 KB of shared memory).
        return 128, 128, 8, 3
    # The pool-only kernel's best of seven on an H200 (268-357 TFLOP/s for chunks of 512+ tokens);
    # with the chunk's K/V by pointers it is as fast or faster (1.0-1.2x on an H100).
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
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    tma: bool | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Causal GQA attention of the packed new tokens q [T, H, D] over their sequences' K/V.

    Sequence b's queries are q[q_starts[b] : q_starts[b] + q_lens[b]]; its keys and values
    (cached prefix and the new tokens, already stored) are k_buf/v_buf [S, Hkv, D] at the
    slots req_to_token[req_rows[b], :seq_lens[b]]. Query i sits at position
    seq_lens[b] - q_lens[b] + i and attends to positions 0..that. max_q_len is a host-side
    upper bound of q_lens (it sizes the grid without a device sync). An e4m3 pool needs
    ``k_scale`` and ``v_scale`` (one fp32 element each): it holds K / k_scale and V / v_scale.

    ``k``/``v`` [T, Hkv, D] (q's dtype, rows aligned with q's): the new tokens' keys (rotated)
    and values as stored, read from there instead of the pool; ignored for an FP8 pool.
    ``tma``: read them (and q) through TMA descriptors; None chooses (``use_tma``).
    ``max_seq_len``: a host-side upper bound of seq_lens (None: no cached prefix is assumed);
    it only weighs the work for that choice. Returns out [T, H, D].
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
    chunk_kv = k is not None and v is not None and not fp8
    if chunk_kv:
        for name, t in (("k", k), ("v", v)):
            check_rows(t, name, 3, q.dtype)
            assert t.shape == (num_tokens, num_kv_heads, head_dim), f"{name} {tuple(t.shape)} vs q and pool"
    max_seq_len = max_q_len if max_seq_len is None else max(max_seq_len, max_q_len)
    tma = chunk_kv and (use_tma(q, k, v, max_seq_len) if tma is None else tma)
    out = torch.empty_like(q) if out is None else out
    check_rows(out, "out", 3, q.dtype)
    assert out.shape == q.shape, f"out {tuple(out.shape)} != q {tuple(q.shape)}"
    if num_tokens == 0 or batch == 0 or max_q_len == 0:
        return out
    block_m, block_n, num_warps, num_stages = _blocks(q, tma)
    descs = (None, None, None)
    if tma:
        assert _tma_ready(q, k, v), "tma=True needs rows of whole heads, 16-byte aligned, D a power of two"
        descs = tuple(
            TensorDescriptor(t, [num_tokens, t.shape[1] * head_dim], [t.stride(0), 1], [rows, head_dim])
            for t, rows in ((q, block_m), (k, block_n), (v, block_n))
        )
    _prefill_attention_kernel[(batch, num_heads, triton.cdiv(max_q_len, block_m))](
        q,
        k if chunk_kv else q,  # unread unless CHUNK_KV
        v if chunk_kv else q,
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
        *descs,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0) if chunk_kv else 0,
        k.stride(1) if chunk_kv else 0,
        v.stride(0) if chunk_kv else 0,
        v.stride(1) if chunk_kv else 0,
        out.stride(0),
        out.stride(1),
        k_buf.stride(0),
        k_buf.stride(1),
        req_to_token.stride(0),
        head_dim,
        GROUP=num_heads // num_kv_heads,
        KV_FP8=fp8,
        CHUNK_KV=chunk_kv,
        TMA=tma,
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
