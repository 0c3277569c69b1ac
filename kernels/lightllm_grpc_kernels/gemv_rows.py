"""Matrix-vector products for a few decode tokens: ``y [M, N] = x [M, K] @ w [N, K]^T``, M <= 4.

At 2-4 tokens a step is still a read of the weights, but the paths for more than one token
leave much of the bandwidth unused: ``fp8_gemv``'s ``tl.dot`` tiles pad the tokens to 16 rows
and convert every e4m3 weight to the activations' dtype in the MMA's layout (1.4-1.6 TB/s on an
H200 against 3.6-4.3 at one token), and cuBLAS runs the small bf16 shapes at 3.1-3.6 TB/s.

This kernel is ``gemv.py``'s loop with the tokens unrolled: each program streams a slab of
``BLOCK_N`` weight rows once, converts each weight to fp32 once, and multiplies it into one
``[BLOCK_N, BLOCK_K]`` accumulator per token, each in the weight tile's own layout. (A first
version held the tokens as a third dimension of one accumulator; the compiler then moved every
weight tile into that 3-D layout, and it ran 20-40% slower: BENCHMARKS.md.) The token count is a
constexpr, so 3 tokens compile their own kernel rather than padding to 4. An e4m3 weight takes
its per-row scale and the bias in the fp32 epilogue, as in ``gemv.py``.

Serving uses it per weight shape and token count where warm-up timed it faster than the
alternative (``layers/matmul_tuning.tune_fp8_gemv`` and ``tune_gemv_rows``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightllm_grpc_kernels._launch import check_rows, pdl, wait_for_predecessor
from lightllm_grpc_kernels.gemv import (
    GemvConfig,
    check_weight,
    epilogue_pointers,
    launch_tiles,
    store_output_row,
)

MAX_ROWS = 4  # tokens per call: each adds a [BLOCK_N, BLOCK_K] fp32 accumulator per program

# Candidates warm-up times per weight shape and token count: those that were fastest at 2-4
# tokens on an H200 for the 8B shapes, e4m3 or bf16 (BENCHMARKS.md). Each is compiled for each
# token count, so the list is kept short; (16, 512, 4, 3) spills registers at 4 tokens (ptxas)
# and only wins at 2-3.
GEMV_ROWS_CONFIGS = (
    GemvConfig(16, 256, 4, 4),
    GemvConfig(16, 256, 4, 3),
    GemvConfig(8, 256, 4, 3),
    GemvConfig(8, 512, 4, 3),
    GemvConfig(16, 512, 4, 3),
)

# What warm-up binds for a weight: ``rows[m - 2]`` is the config for m tokens (2..MAX_ROWS), None
# where another kernel was faster; an empty tuple: never this kernel.
RowsConfigs = tuple[GemvConfig | None, ...]


def rows_config(rows: RowsConfigs, m: int) -> GemvConfig | None:
    """The config ``rows`` holds for ``m`` tokens, or None (not bound for that count)."""
    return rows[m - 2] if 2 <= m < len(rows) + 2 else None


@triton.jit
def _token_step(acc, w, x_row_ptr, cols, col_mask):
    # One token's share of a K-slice: its x slice, in the weight tile's column layout.
    x = tl.load(x_row_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    return acc + w * x[None, :]


@triton.jit
def _gemv_rows_kernel(
    x_ptr, w_ptr, y_ptr, n, k, stride_x, stride_w, stride_y, scale_ptr, bias_ptr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    wait_for_predecessor(PDL)
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    # One accumulator per token; those past ROWS are never updated, and the compiler drops them.
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    for start in tl.range(0, k, BLOCK_K, num_stages=NUM_STAGES):
        cols = start + tl.arange(0, BLOCK_K)
        col_mask = cols < k
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        w = w.to(tl.float32)  # once, for every token
        acc0 = _token_step(acc0, w, x_ptr, cols, col_mask)
        if ROWS > 1:
            acc1 = _token_step(acc1, w, x_ptr + stride_x, cols, col_mask)
        if ROWS > 2:
            acc2 = _token_step(acc2, w, x_ptr + 2 * stride_x, cols, col_mask)
        if ROWS > 3:
            acc3 = _token_step(acc3, w, x_ptr + 3 * stride_x, cols, col_mask)
    store_output_row(y_ptr, acc0, rows, row_mask, scale_ptr, bias_ptr, SCALED, HAS_BIAS)
    if ROWS > 1:
        store_output_row(y_ptr + stride_y, acc1, rows, row_mask, scale_ptr, bias_ptr, SCALED, HAS_BIAS)
    if ROWS > 2:
        store_output_row(y_ptr + 2 * stride_y, acc2, rows, row_mask, scale_ptr, bias_ptr, SCALED, HAS_BIAS)
    if ROWS > 3:
        store_output_row(y_ptr + 3 * stride_y, acc3, rows, row_mask, scale_ptr, bias_ptr, SCALED, HAS_BIAS)


def gemv_rows(
    x: torch.Tensor,
    w: torch.Tensor,
    config: GemvConfig | None = None,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ w.T`` for x [M, K] (1 <= M <= ``MAX_ROWS``, last dim contiguous) and w [N, K] of x's
    dtype; returns [M, N]. With ``scale``: w is e4m3 and the result ``(x @ w.T) * scale + bias``,
    as ``gemv.gemv``."""
    check_rows(x, "x", 2)
    check_weight(x, w, scale, bias)
    (m, k), n = x.shape, w.shape[0]
    assert 1 <= m <= MAX_ROWS, f"gemv_rows takes 1..{MAX_ROWS} rows, got x {tuple(x.shape)}"
    assert w.shape[1] == k, f"x {tuple(x.shape)} does not match w {tuple(w.shape)}"
    cfg = launch_tiles(x, w, config, GEMV_ROWS_CONFIGS[0])
    y = x.new_empty((m, n))
    _gemv_rows_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, w, y, n, k, x.stride(0), w.stride(0), y.stride(0), *epilogue_pointers(x, scale, bias),
        ROWS=m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NUM_STAGES=cfg.num_stages,
        SCALED=scale is not None, HAS_BIAS=bias is not None, num_warps=cfg.num_warps, **pdl(x, gemv=True),
    )  # fmt: skip
    return y


def gemv_rows_ref(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch reference of :func:`gemv_rows`: in fp32, rounded once to x's dtype."""
    y = x.float() @ w.float().T
    if scale is not None:
        y = y * scale.view(1, -1)
        if bias is not None:
            y = y + bias.float()
    return y.to(x.dtype)
