"""Flash-decoding: one query token per sequence, K/V split along the sequence, then reduced.

Stage 1 runs one program per (sequence, kv head, split). Each reads its chunk of the
sequence's K/V once through req_to_token and attends all query heads of the kv head's group
at once, writing a normalised partial output and its log-sum-exp. Stage 2 merges the splits.
With a single split (large batches) stage 1 writes the output itself and stage 2 is skipped.
Every program derives its chunk from the seq_len it loads, so the grid depends only on the
batch size, the head counts and the split count: no host sync, safe to capture in a CUDA graph.

With ``counters`` (zeroed int32, one per (sequence, kv head), kept between calls) the merge
happens in stage 1 instead: each program counts itself in with an atomic add once its
partial is written, and the last one of a (sequence, kv head) merges that head group's
splits and resets the counter, so one launch replaces two (a batch-1 decode step at short
context is launch-bound: ``bench.py --only decode_stages`` times both).

An FP8 (e4m3) pool is read as it is stored: each tile converts to the queries' dtype (exact),
the K scale is folded into the softmax scale and the V scale multiplies the partial output,
both loaded from device memory (one fp32 element each).
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
# Most rows of one shared-prefix group (the coordinator cuts larger groups to this size):
# their query heads form one tile of MAX_GROUP_ROWS x (heads per kv head) rows.
MAX_GROUP_ROWS = 16
MAX_SPLITS = 32  # upper bound of decode_num_splits; workspaces sized for it fit every batch size
# Sequences x splits to aim for. Measured on an H200 at H=32, Hkv=8, D=128 (CUDA graphs):
# batch 1 wants 32 splits (9 us vs 86 us unsplit at seq 4096), batch 32 wants 2, batch 128 one.
_TARGET_ROW_SPLITS = 64


def decode_num_splits(batch_size: int) -> int:
    """Splits per sequence for a batch: many when the batch alone cannot fill the GPU, one otherwise.

    A pure function of the batch size, so a captured graph and its workspace agree with it.
    """
    wanted = triton.next_power_of_2(triton.cdiv(_TARGET_ROW_SPLITS, max(batch_size, 1)))
    return min(MAX_SPLITS, wanted)


def decode_workspace_rows(max_batch_size: int) -> int:
    """(sequence, split) rows a workspace needs to serve every batch size up to max_batch_size."""
    return max(b * decode_num_splits(b) for b in range(1, max_batch_size + 1))


@triton.jit
def _split_bounds(seq_len, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    # Chunks are whole BLOCK_N tiles so short sequences use few splits instead of ragged ones.
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    return start, tl.minimum(start + chunk, seq_len)


@triton.jit
def _attend(
    q,
    k_buf_ptr,
    v_buf_ptr,
    slot_row,
    kv_head,
    start,
    end,
    qk_scale,
    stride_bs,
    stride_bh,
    offs_d,
    d_mask,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax of the ROWS queries in ``q`` over the keys at positions [start, end) of
    one req_to_token row (``slot_row``): the running max, sum and unnormalised output. K/V
    tiles are converted to q's dtype (a no-op but for an FP8 pool, whose scales the callers
    apply)."""
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for n_start in range(start, end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        slots = tl.load(slot_row + offs_n, mask=n_mask, other=0).to(tl.int64)
        kv_offs = slots[:, None] * stride_bs + kv_head * stride_bh + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_buf_ptr + kv_offs, mask=kv_mask, other=0.0).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        # Scores in log2 units for exp2; every tile holds at least one key, so m_new is finite.
        qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_buf_ptr + kv_offs, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _merge_if_last(
    counter_ptr, mid_o_ptr, mid_lse_ptr, out_ptrs, heads_rows, g_mask, offs_d, d_mask, head_dim,
    NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Count this program's partial in; the last of the NUM_SPLITS programs of its (sequence,
    kv head) merges their partials as stage 2 does and resets the counter for the next call.
    ``heads_rows``: workspace row of split 0 of each of the head group's query heads."""
    tl.debug_barrier()  # every thread's partial stores are issued before the count
    # acq_rel at GPU scope: the last program sees every other program's partial.
    count = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if count == NUM_SPLITS - 1:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
        offs_s = tl.arange(0, BLOCK_S)
        gs_mask = g_mask[:, None] & (offs_s[None, :] < NUM_SPLITS)
        # .cg: from L2, where the other programs' stores are (this SM's L1 may not be coherent).
        lse = tl.load(mid_lse_ptr + heads_rows[:, None] + offs_s[None, :], mask=gs_mask,
                      other=float("-inf"), cache_modifier=".cg")  # fmt: skip
        lse_max = tl.max(lse, axis=1)
        lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # no keys at all: zeros, not NaN
        total = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        gd_mask = g_mask[:, None] & d_mask[None, :]
        for s in tl.static_range(NUM_SPLITS):
            lse_s = tl.load(
                mid_lse_ptr + heads_rows + s, mask=g_mask, other=float("-inf"), cache_modifier=".cg"
            )
            has_keys = lse_s > float("-inf")
            weight = tl.where(has_keys, tl.exp2(lse_s - lse_max), 0.0)
            part = tl.load(mid_o_ptr + (heads_rows + s)[:, None] * head_dim + offs_d[None, :],
                           mask=gd_mask & has_keys[:, None], other=0.0, cache_modifier=".cg")  # fmt: skip
            acc += part * weight[:, None]
            total += weight
        out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=gd_mask)


@triton.jit
def _decode_stage1_kernel(
    q_ptr,
    k_buf_ptr,
    v_buf_ptr,
    req_to_token_ptr,
    req_rows_ptr,
    seq_lens_ptr,
    kv_starts_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    out_ptr,
    k_scale_ptr,
    v_scale_ptr,
    counters_ptr,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_bs,
    stride_bh,
    stride_rt,
    num_heads,
    num_kv_heads,
    head_dim,
    GROUP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    KV_FP8: tl.constexpr,
    MERGE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_F16: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    # With a shared prefix (cascade), this pass covers only the keys after it; the prefix's
    # partial result sits in workspace slot NUM_SPLITS and stage 2 merges it with the rest.
    MID_STRIDE: tl.constexpr = NUM_SPLITS + 1 if HAS_PREFIX else NUM_SPLITS
    kv_start = tl.load(kv_starts_ptr + b) if HAS_PREFIX else 0
    start, end = _split_bounds(seq_len - kv_start, split, NUM_SPLITS, BLOCK_N)
    start += kv_start
    end += kv_start
    # The GROUP query heads that share this kv head, padded to BLOCK_G rows (tl.dot needs 16).
    offs_g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    gd_mask = g_mask[:, None] & d_mask[None, :]
    # Workspace rows are (b, head, split): contiguous [B, H, MID_STRIDE(, D)].
    mid_rows = (b * num_heads + heads) * MID_STRIDE + split
    out_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    counter = counters_ptr + b * num_kv_heads + kv_head  # MERGE only
    if HAS_PREFIX:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if (split == 0) & (kv_start == 0):  # no shared prefix here: that slot has no keys
            no_prefix = (b * num_heads + heads) * MID_STRIDE + NUM_SPLITS
            tl.store(mid_lse_ptr + no_prefix, tl.full([BLOCK_G], float("-inf"), tl.float32), mask=g_mask)
    if start >= end:
        if NUM_SPLITS == 1 and not HAS_PREFIX:
            # A padded batch entry (seq_len 0): zeros, not NaN.
            tl.store(out_ptrs, tl.zeros([BLOCK_G, BLOCK_D], out_ptr.dtype.element_ty), mask=gd_mask)
        else:
            # No keys here: a log-sum-exp of -inf gives this split zero weight in stage 2.
            tl.store(mid_lse_ptr + mid_rows, tl.full([BLOCK_G], float("-inf"), tl.float32), mask=g_mask)
            if MERGE:
                _merge_if_last(counter, mid_o_ptr, mid_lse_ptr, out_ptrs, mid_rows - split, g_mask, offs_d,
                               d_mask, head_dim, NUM_SPLITS, BLOCK_G, BLOCK_S, BLOCK_D)  # fmt: skip
        return
    slot_row = req_to_token_ptr + tl.load(req_rows_ptr + b).to(tl.int64) * stride_rt

    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=gd_mask,
        other=0.0,
    )

    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
        if FP8_F16:
            # bf16 queries: the dots in fp16, as e4m3 -> fp16 is one instruction per pair on Hopper
            # and e4m3 -> bf16 is not; q and every e4m3 value convert exactly (|q| << 65504).
            q = q.to(tl.float16)
    m_i, l_i, acc = _attend(
        q, k_buf_ptr, v_buf_ptr, slot_row, kv_head, start, end, qk_scale, stride_bs, stride_bh,
        offs_d, d_mask, BLOCK_G, BLOCK_N, BLOCK_D, DOT_PRECISION,
    )  # fmt: skip
    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr)

    if NUM_SPLITS == 1 and not HAS_PREFIX:
        # The split is the whole sequence: this is the output, and stage 2 is skipped.
        tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:
        tl.store(mid_o_ptr + mid_rows[:, None] * head_dim + offs_d[None, :], acc / l_i[:, None], mask=gd_mask)
        tl.store(mid_lse_ptr + mid_rows, m_i + tl.log2(l_i), mask=g_mask)
        if MERGE:
            _merge_if_last(counter, mid_o_ptr, mid_lse_ptr, out_ptrs, mid_rows - split, g_mask, offs_d,
                           d_mask, head_dim, NUM_SPLITS, BLOCK_G, BLOCK_S, BLOCK_D)  # fmt: skip


@triton.jit
def _shared_prefix_kernel(
    q_ptr,
    k_buf_ptr,
    v_buf_ptr,
    req_to_token_ptr,
    req_rows_ptr,
    prefix_lens_ptr,
    group_sizes_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    k_scale_ptr,
    v_scale_ptr,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_bs,
    stride_bh,
    stride_rt,
    num_heads,
    head_dim,
    GROUP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    KV_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    # Program (b, kv head), for b the first row of a group (group_sizes[b] > 0): the group's
    # rows b .. b + size - 1 share K/V positions [0, prefix_lens[b]), so those keys are read
    # once for all of them: the queries of every row and head of the group form one tile.
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    size = tl.load(group_sizes_ptr + b)
    if size == 0:
        return
    length = tl.load(prefix_lens_ptr + b)
    offs_m = tl.arange(0, BLOCK_M)
    rows = b + offs_m // GROUP
    heads = kv_head * GROUP + offs_m % GROUP
    m_mask = offs_m < size * GROUP
    mid_rows = (rows * num_heads + heads) * (NUM_SPLITS + 1) + NUM_SPLITS
    if length == 0:
        # No shared key (warm-up's groups): zero weight in stage 2, as stage 1 writes for rows alone.
        tl.store(mid_lse_ptr + mid_rows, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=m_mask)
        return
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    md_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + rows[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=md_mask,
        other=0.0,
    )
    slot_row = req_to_token_ptr + tl.load(req_rows_ptr + b).to(tl.int64) * stride_rt
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    m_i, l_i, acc = _attend(
        q, k_buf_ptr, v_buf_ptr, slot_row, kv_head, 0, length, qk_scale, stride_bs, stride_bh,
        offs_d, d_mask, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION,
    )  # fmt: skip
    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr)
    tl.store(mid_o_ptr + mid_rows[:, None] * head_dim + offs_d[None, :], acc / l_i[:, None], mask=md_mask)
    tl.store(mid_lse_ptr + mid_rows, m_i + tl.log2(l_i), mask=m_mask)


@triton.jit
def _decode_stage2_kernel(
    mid_o_ptr,
    mid_lse_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    num_heads,
    head_dim,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    # Program (b, h): merge the splits, weighting each by its share of the softmax. The partial
    # outputs of empty splits are never written, so their (garbage) values are selected away,
    # not multiplied by a zero weight. Both loads are independent: one memory round trip.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < head_dim
    rows = (b * num_heads + h) * NUM_SPLITS + offs_s
    lse = tl.load(mid_lse_ptr + rows, mask=s_mask, other=float("-inf"))
    parts = tl.load(
        mid_o_ptr + rows[:, None] * head_dim + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :]
    )
    has_keys = lse > float("-inf")
    lse_max = tl.max(lse, axis=0)
    # A padded batch entry with seq_len 0 has no split with keys: it gets zeros, not NaN.
    weights = tl.where(has_keys, tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max)), 0.0)
    total = tl.sum(weights, axis=0)
    merged = tl.sum(tl.where(has_keys[:, None], parts * weights[:, None], 0.0), axis=0)
    out = merged / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _check_inputs(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> bool:
    """Asserts the inputs' shapes and dtypes; returns whether the pool is FP8."""
    check_rows(q, "q", 3)
    batch, num_heads, head_dim = q.shape
    fp8 = check_kv_cache(k_buf, v_buf, q.dtype, k_scale, v_scale)
    assert k_buf.shape[2] == head_dim, f"k_buf head_dim {k_buf.shape[2]} != {head_dim}"
    assert num_heads % k_buf.shape[1] == 0, f"{num_heads} heads not a multiple of {k_buf.shape[1]} kv heads"
    check_rows(req_to_token, "req_to_token", 2, torch.int32)
    check_index(req_rows, "req_rows", batch, torch.int32)
    check_index(seq_lens, "seq_lens", batch, torch.int32)
    return fp8


def _workspace(
    q: torch.Tensor, num_splits: int, mid_o: torch.Tensor | None, mid_lse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The caller's fp32 workspace, checked, or a fresh one sized from shapes alone."""
    batch, num_heads, head_dim = q.shape
    if mid_o is None:
        mid_o = q.new_empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32)
    if mid_lse is None:
        mid_lse = q.new_empty((batch, num_heads, num_splits), dtype=torch.float32)
    assert mid_o.shape == (batch, num_heads, num_splits, head_dim), f"mid_o shape {tuple(mid_o.shape)}"
    assert mid_lse.shape == (batch, num_heads, num_splits), f"mid_lse shape {tuple(mid_lse.shape)}"
    for name, t in (("mid_o", mid_o), ("mid_lse", mid_lse)):
        assert t.dtype == torch.float32 and t.is_contiguous(), f"{name} must be contiguous fp32"
    return mid_o, mid_lse


def decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    mid_o: torch.Tensor | None = None,
    mid_lse: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence, q [B, H, D], over all of its sequence's K/V.

    Sequence b's keys/values are k_buf/v_buf [S, Hkv, D] at req_to_token[req_rows[b], :seq_lens[b]]
    (the new token's already stored). num_splits defaults to decode_num_splits(B). mid_o
    [B, H, num_splits, D] and mid_lse [B, H, num_splits] (contiguous fp32) are the workspace;
    pass preallocated ones under CUDA-graph capture (with one split they go unused).
    An e4m3 pool needs ``k_scale`` and ``v_scale`` (one fp32 element each): it holds K / k_scale
    and V / v_scale. ``counters`` (contiguous int32, at least B * Hkv elements, all zero, which
    every call leaves them) merges the splits in the one launch (see the module docstring)
    instead of a second kernel. Returns out [B, H, D].
    """
    _check_inputs(q, k_buf, v_buf, req_to_token, req_rows, seq_lens, k_scale, v_scale)
    batch = q.shape[0]
    num_splits = decode_num_splits(batch) if num_splits is None else num_splits
    mid_o, mid_lse = _workspace(q, num_splits, mid_o, mid_lse)
    out = torch.empty_like(q) if out is None else out
    check_rows(out, "out", 3, q.dtype)
    assert out.shape == q.shape, f"out {tuple(out.shape)} != q {tuple(q.shape)}"
    if batch == 0:
        return out
    merge = counters is not None and num_splits > 1
    if merge:
        assert counters.dtype == torch.int32 and counters.is_contiguous(), "counters: contiguous int32"
        assert counters.numel() >= batch * k_buf.shape[1], f"counters: {counters.numel()} < B * Hkv"
    _stage1(
        q, k_buf, v_buf, req_to_token, req_rows, seq_lens, None, mid_o, mid_lse, out, scale, num_splits,
        k_scale, v_scale, counters if merge else None,
    )  # fmt: skip
    if num_splits > 1 and not merge:
        _stage2(mid_o, mid_lse, out, num_splits)
    return out


def cascade_decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    prefix_lens: torch.Tensor,
    group_sizes: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    mid_o: torch.Tensor | None = None,
    mid_lse: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`decode_attention` for batches whose sequences share prefixes (cascade attention).

    Rows ``b .. b + group_sizes[b] - 1`` (``group_sizes[b] > 0`` marks a group's first row,
    0 elsewhere; at most ``MAX_GROUP_ROWS`` rows a group) have the same slots at
    positions ``[0, prefix_lens[b])`` of their ``req_to_token`` rows; every row of a group
    carries the group's ``prefix_lens``, and a row in no group has ``prefix_lens`` 0. The
    shared keys are read once per group and kv head instead of once per row; each row then
    attends to its own keys after the prefix, and the two partial softmaxes are merged by
    their log-sum-exps. The workspace is mid_o [B, H, num_splits + 1, D] and mid_lse
    [B, H, num_splits + 1] (contiguous fp32; pass preallocated ones under graph capture).
    FP8 pools take ``k_scale`` and ``v_scale`` as in :func:`decode_attention`.
    """
    fp8 = _check_inputs(q, k_buf, v_buf, req_to_token, req_rows, seq_lens, k_scale, v_scale)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_buf.shape[1]
    check_index(prefix_lens, "prefix_lens", batch, torch.int32)
    check_index(group_sizes, "group_sizes", batch, torch.int32)
    num_splits = decode_num_splits(batch) if num_splits is None else num_splits
    mid_o, mid_lse = _workspace(q, num_splits + 1, mid_o, mid_lse)
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape, f"out {tuple(out.shape)} != q {tuple(q.shape)}"
    if batch == 0:
        return out
    gpu = on_gpu(q)
    group = num_heads // num_kv_heads
    block_m = max(16, block(MAX_GROUP_ROWS * group))
    _shared_prefix_kernel[(batch, num_kv_heads)](
        q, k_buf, v_buf, req_to_token, req_rows, prefix_lens, group_sizes, mid_o, mid_lse, k_scale, v_scale,
        scale * _LOG2E, q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), req_to_token.stride(0),
        num_heads, head_dim, GROUP=group, NUM_SPLITS=num_splits, KV_FP8=fp8, BLOCK_M=block_m,
        BLOCK_N=64 if gpu else 16, BLOCK_D=block(head_dim), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=(8 if block_m >= 128 else 4) if gpu else 1, num_stages=2 if gpu else 1,
        **pdl(q),
    )  # fmt: skip
    _stage1(
        q, k_buf, v_buf, req_to_token, req_rows, seq_lens, prefix_lens, mid_o, mid_lse, out, scale,
        num_splits, k_scale, v_scale,
    )  # fmt: skip
    _stage2(mid_o, mid_lse, out, num_splits + 1)
    return out


def stage1_tiles(fp8: bool, num_splits: int) -> tuple[int, int, int]:
    """(keys per tile, warps, pipeline stages) of stage 1 on a GPU: a function of the pool's
    dtype and the split count only, so a captured graph keeps its choice.

    Measured on an H200 (8B heads, stage 1 alone under CUDA graphs, shuffled slots; BENCHMARKS.md,
    "decode attention tiles"). One or two splits means a large batch, many short programs, each
    reading a few tiles: small tiles with deep pipelines keep more loads in flight per SM. An
    e4m3 pool at 32 keys x 1 warp x 5 stages reads 3.2-3.6 TB/s against 2.6-2.8 at 64 x 2 x 3
    (B 32-512); a 16-bit pool at 32 x 2 x 3 reads 4.1-4.3 TB/s against 4.0-4.2 at 64 x 4 x 2,
    the copy's read rate. With more splits (batches under 32) the larger tiles stay ahead.
    """
    if fp8:  # bf16 queries do fp16 math here: with bf16 math an e4m3 pool read 0.5-0.7x a bf16 one
        return (32, 1, 5) if num_splits <= 2 else (64, 2, 3)
    return (32, 2, 3) if num_splits == 1 else (64, 4, 2)


def _stage1(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_starts: torch.Tensor | None,
    mid_o: torch.Tensor,
    mid_lse: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    num_splits: int,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    counters: torch.Tensor | None = None,
) -> None:
    """Flash-decoding over each sequence's keys from ``kv_starts`` (None: from 0) on; with
    ``counters``, the splits merged by the last program of each (sequence, kv head)."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_buf.shape[1]
    gpu = on_gpu(q)
    group = num_heads // num_kv_heads
    fp8 = k_scale is not None
    block_n, warps, stages = stage1_tiles(fp8, num_splits) if gpu else (16, 1, 1)
    _decode_stage1_kernel[(batch, num_kv_heads, num_splits)](
        q, k_buf, v_buf, req_to_token, req_rows, seq_lens,
        seq_lens if kv_starts is None else kv_starts,  # unused without a shared prefix
        mid_o, mid_lse, out, k_scale, v_scale, seq_lens if counters is None else counters, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_buf.stride(0), k_buf.stride(1),
        req_to_token.stride(0), num_heads, num_kv_heads, head_dim,
        GROUP=group, NUM_SPLITS=num_splits, HAS_PREFIX=kv_starts is not None, KV_FP8=fp8,
        MERGE=counters is not None, BLOCK_G=max(16, block(group)), BLOCK_N=block_n,
        BLOCK_D=block(head_dim), BLOCK_S=block(num_splits), DOT_PRECISION=dot_precision(q.dtype),
        FP8_F16=q.dtype == torch.bfloat16, num_warps=warps, num_stages=stages,
        **pdl(q),
    )  # fmt: skip


def _stage2(mid_o: torch.Tensor, mid_lse: torch.Tensor, out: torch.Tensor, parts: int) -> None:
    """Merge ``parts`` partial results per (sequence, head) by their log-sum-exps."""
    batch, num_heads, head_dim = out.shape
    _decode_stage2_kernel[(batch, num_heads)](
        mid_o, mid_lse, out, out.stride(0), out.stride(1), num_heads, head_dim,
        NUM_SPLITS=parts, BLOCK_S=block(parts), BLOCK_D=block(head_dim), num_warps=4 if on_gpu(out) else 1,
        **pdl(out),
    )  # fmt: skip


def decode_attention_ref(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of :func:`decode_attention`: the last position attends to all keys, in fp32
    (an FP8 pool's rows dequantized: times their scale)."""
    out = torch.empty_like(q)
    group = q.shape[1] // k_buf.shape[1]
    for b, (row, seq_len) in enumerate(zip(req_rows.tolist(), seq_lens.tolist(), strict=True)):
        slots = req_to_token[row, :seq_len].long()
        k = dequantize_kv_ref(k_buf[slots], k_scale).repeat_interleave(group, dim=1)
        v = dequantize_kv_ref(v_buf[slots], v_scale).repeat_interleave(group, dim=1)
        probs = (torch.einsum("hd,khd->hk", q[b].float(), k) * scale).softmax(dim=-1)
        out[b] = torch.einsum("hk,khd->hd", probs, v).to(q.dtype)
    return out
