"""Weight-only FP8 (W8A16) skinny GEMM for decode: ``y [M, N] = (x [M, K] @ w [N, K]^T) * scale [N] + bias``.

At a few tokens a matmul is a read of its weight. This kernel streams the ``float8_e4m3fn``
weight (half of bf16's bytes) once and multiplies the activations as they are (bf16 / fp16,
not quantized), then applies the per-output-channel weight scale and the bias in fp32 and
writes the activations' dtype. It has the structure of ``gemv.py``: each program owns a slab
of ``BLOCK_N`` weight rows and loops over K (no split-K), here with the loads pipelined. One
token runs through ``gemv.py``'s kernel itself (its scaled epilogue: the weight converted to
fp32 in registers), so that the GEMVs with a folded norm or SiLU share its loop; more tokens go
through ``tl.dot`` on tiles of 16 rows, the weight converted to the activations' dtype, which
holds every e4m3 value exactly, so the products are exact there too and only the fp32
summation order differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lightllm_grpc_kernels._launch import check_rows, dot_precision, on_gpu, pdl, wait_for_predecessor
from lightllm_grpc_kernels.gemv import GemvConfig, check_weight, gemv

FP8 = torch.float8_e4m3fn
DOT_ROWS = 16  # tl.dot's smallest M tile: 2..16 tokens cost one pass over the weight


@dataclass(frozen=True)
class Fp8GemvConfig(GemvConfig):
    """``GemvConfig``'s fields with the W8A16 kernel's defaults; ``block_n`` >= 16 for more than
    one token (tl.dot's smallest tile)."""

    block_k: int = 512  # 512 e4m3 bytes per row per step: gemv.py's 256 bf16 ones
    # K-loop software pipelining (cp.async): tiles in flight per program, so that a shape with
    # few programs per SM (N = 4096: 256 programs of 16 rows) still keeps HBM busy.
    num_stages: int = 3


# Candidates the warm-up times per weight shape (layers/matmul_tuning.py tune_fp8_gemv) and the
# benchmark reports (bench/fp8_check.py); untuned layers use the default (the first).
FP8_GEMV_CONFIGS = (
    Fp8GemvConfig(16, 512, 4, 3),
    Fp8GemvConfig(16, 512, 4, 1),
    Fp8GemvConfig(16, 256, 4, 4),
    Fp8GemvConfig(32, 256, 4, 3),
    Fp8GemvConfig(32, 512, 8, 3),
    Fp8GemvConfig(16, 1024, 8, 2),
    Fp8GemvConfig(64, 128, 4, 4),
    Fp8GemvConfig(16, 1024, 4, 3),
    Fp8GemvConfig(32, 1024, 8, 3),
)
# One token needs no tl.dot tile: these narrower slabs give N = 2048..4096 more programs.
FP8_GEMV_CONFIGS_ONE_TOKEN = (
    *FP8_GEMV_CONFIGS,
    Fp8GemvConfig(8, 512, 4, 3),
    Fp8GemvConfig(8, 1024, 4, 3),
    Fp8GemvConfig(4, 1024, 4, 3),
    Fp8GemvConfig(4, 2048, 8, 2),
)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    y_ptr,
    m,
    n,
    k,
    stride_x,
    stride_w,
    stride_y,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels: weight rows
    tokens = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask, token_mask = rows < n, tokens < m
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    x_rows = x_ptr + tokens[:, None].to(tl.int64) * stride_x
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in tl.range(0, k, BLOCK_K, num_stages=NUM_STAGES):
        cols = start + tl.arange(0, BLOCK_K)
        col_mask = cols < k
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        x = tl.load(x_rows + cols[None, :], mask=token_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    y = acc * tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + tokens[:, None].to(tl.int64) * stride_y + rows[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=token_mask[:, None] & row_mask[None, :])


def fp8_gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: Fp8GemvConfig | None = None,
) -> torch.Tensor:
    """``(x @ w.T) * scale + bias`` for x [M, K] (bf16 / fp16 / fp32), w e4m3 [N, K] (last dims
    contiguous), scale fp32 [N] and bias [N] in x's dtype; returns [M, N] in x's dtype.
    Any M works; it is meant for a few (each 16 more tokens read the weight again)."""
    check_rows(x, "x", 2)
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), f"x: unsupported {x.dtype}"
    cfg = config or Fp8GemvConfig()
    if x.shape[0] == 1:
        return gemv(x, w, cfg, scale, bias)  # which checks w, scale and bias itself
    check_weight(x, w, scale, bias)
    (m, k), n = x.shape, w.shape[0]
    assert w.shape[1] == k, f"x {tuple(x.shape)} does not match w {tuple(w.shape)}"
    if not on_gpu(x):  # the interpreter wants few, large programs
        cfg = Fp8GemvConfig(block_n=max(16, min(64, triton.next_power_of_2(n))),
                            block_k=max(16, min(256, triton.next_power_of_2(k))))  # fmt: skip
    assert cfg.block_n >= DOT_ROWS, f"block_n must be >= {DOT_ROWS} for tl.dot, got {cfg}"
    y = x.new_empty((m, n))
    if m == 0:
        return y
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, DOT_ROWS))
    _fp8_gemv_kernel[grid](
        x, w, scale, scale if bias is None else bias, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=DOT_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PRECISION=dot_precision(x.dtype), NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
        **pdl(x),
    )  # fmt: skip
    return y


def fp8_gemv_ref(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch reference of :func:`fp8_gemv`: the dequantized weight times the unquantized ``x``, in fp32."""
    y = (x.float() @ w.float().T) * scale.view(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
