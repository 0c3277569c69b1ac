"""Matrix-vector products for a few decode tokens: ``y [M, N] = x [M, K] @ w [N, K]^T``, M <= 4.

At 2-4 tokens a step is still a read of the weights, but the paths for more than one token
leave much of the bandwidth unused: ``fp8_gemv``'s ``tl.dot`` tiles pad the tokens to 16 rows
and convert every e4m3 weight to the activations' dtype in the MMA's layout (the FP8 decode
graph took 4.29 ms at 2 rows against 2.74 at one on an H200, BENCHMARKS.md). This kernel is
``gemv.py``'s loop with a token dimension: each program streams a slab of ``BLOCK_N`` weight
rows once, converts each weight to fp32 once, and multiplies it into every token's
accumulator (fp32 FMAs, so up to 4 tokens stay cheap beside the weight read). An e4m3 weight
takes its per-row scale and the bias in the fp32 epilogue, as in ``gemv.py``.

Serving uses it where warm-up timed it faster than the alternative for that weight shape and
token count (``layers/triton_ops.tune_fp8_gemv``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightllm_grpc_kernels._launch import check_rows, on_gpu, pdl, wait_for_predecessor
from lightllm_grpc_kernels.gemv import GemvConfig, check_weight, interpreter_config

MAX_ROWS = 4  # tokens per call: each adds a [BLOCK_N, BLOCK_K] fp32 accumulator per program

# Candidates warm-up times per weight shape: slabs narrow enough that 4 accumulators fit in
# registers (MAX_ROWS x BLOCK_N x BLOCK_K / threads <= 64 fp32 each), most pipelined.
GEMV_ROWS_CONFIGS = (
    GemvConfig(8, 256, 4, 3),
    GemvConfig(4, 512, 4, 3),
    GemvConfig(16, 128, 4, 3),
    GemvConfig(4, 256, 4, 3),
    GemvConfig(8, 512, 8, 2),
    GemvConfig(8, 256, 4, 1),
)


@triton.jit
def _gemv_rows_kernel(
    x_ptr, w_ptr, y_ptr, m, n, k, stride_x, stride_w, stride_y, scale_ptr, bias_ptr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    wait_for_predecessor(PDL)
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    tokens = tl.arange(0, ROWS)
    token_mask = tokens < m
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    x_rows = x_ptr + tokens[:, None].to(tl.int64) * stride_x
    acc = tl.zeros([ROWS, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for start in tl.range(0, k, BLOCK_K, num_stages=NUM_STAGES):
        cols = start + tl.arange(0, BLOCK_K)
        col_mask = cols < k
        x = tl.load(x_rows + cols[None, :], mask=token_mask[:, None] & col_mask[None, :], other=0.0)
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
    y = tl.sum(acc, axis=2)
    if SCALED:  # an e4m3 weight: its per-row scale, then the bias, in fp32 (gemv.py's epilogue)
        y *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + tokens[:, None].to(tl.int64) * stride_y + rows[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=token_mask[:, None] & row_mask[None, :])


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
    cfg = config or GEMV_ROWS_CONFIGS[0]
    if not on_gpu(x):
        cfg = interpreter_config(n, k)
    y = x.new_empty((m, n))
    scale_arg = x if scale is None else scale  # a valid pointer the unscaled kernel never reads
    _gemv_rows_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), scale_arg,
        scale_arg if bias is None else bias,
        ROWS=triton.next_power_of_2(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NUM_STAGES=cfg.num_stages,
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
