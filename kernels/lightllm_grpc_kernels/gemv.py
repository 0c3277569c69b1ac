"""Matrix-vector product for one-token decode: ``y [1, N] = x [1, K] @ w [N, K]^T``.

At batch 1 a decode step is a chain of weight reads; cuBLAS's heuristics leave some of
these shapes well under the copy bandwidth (e.g. too few thread blocks for the SMs). This
kernel gives each program a slab of ``BLOCK_N`` weight rows and streams it once, with
fp32 accumulation. The serving path uses it only for the shapes where it measured faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lightllm_grpc_kernels._launch import check_rows, on_gpu


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 1  # K-loop tiles in flight (cp.async pipelining); 1: none


# Candidates tried per weight shape when the serving path tunes itself.
GEMV_CONFIGS = (
    GemvConfig(16, 256, 4),
    GemvConfig(32, 256, 4),
    GemvConfig(8, 512, 4),
    GemvConfig(16, 512, 8),
    GemvConfig(4, 1024, 4),
    # Pipelined: for shapes with few programs per SM (N = 2048..4096 at TP=1 and 2).
    GemvConfig(16, 256, 4, 3),
    GemvConfig(8, 512, 4, 3),
    GemvConfig(4, 1024, 4, 2),
    GemvConfig(8, 1024, 8, 2),
    GemvConfig(2, 2048, 4, 2),
)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, y_ptr, n, k, stride_w,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for start in tl.range(0, k, BLOCK_K, num_stages=NUM_STAGES):
        cols = start + tl.arange(0, BLOCK_K)
        col_mask = cols < k
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_mask)


def gemv(x: torch.Tensor, w: torch.Tensor, config: GemvConfig | None = None) -> torch.Tensor:
    """``x @ w.T`` for x [1, K] and w [N, K] of one dtype (last dims contiguous); returns [1, N]."""
    check_rows(x, "x", 2)
    check_rows(w, "w", 2, x.dtype)
    assert x.shape[0] == 1, f"gemv takes one row, got x {tuple(x.shape)}"
    n, k = w.shape
    assert x.shape[1] == k, f"x {tuple(x.shape)} does not match w {tuple(w.shape)}"
    cfg = config or GemvConfig()
    if not on_gpu(x):  # the interpreter wants few, large programs
        cfg = GemvConfig(
            block_n=min(64, triton.next_power_of_2(n)), block_k=min(256, triton.next_power_of_2(k))
        )
    y = x.new_empty((1, n))
    grid = (triton.cdiv(n, cfg.block_n),)
    _gemv_kernel[grid](x, w, y, n, k, w.stride(0), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                       NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps)  # fmt: skip
    return y


def gemv_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float() @ w.float().T).to(x.dtype)
