"""RMSNorm, alone and fused with the residual add that precedes it in every decoder layer.

The sum of squares is accumulated in fp64 and rounded to fp32 once. Each square of a 16-bit
(or fp32) value is exact in fp64, and so is their sum while the row's magnitudes span less
than about 2^18 (activations do); past that, the fp64 sums of different orders differ by
~2^-53 relative, which changes the fp32 result only if it lands that close to an fp32
rounding midpoint. So the fp32 statistic does not depend on the order of the sum (nor on FMA
contraction, as the products are exact), which lets the GEMV that folds this norm into its
prologue (``gemv.add_rmsnorm_gemv``), summing the row in its own tiles, reproduce it bit
for bit. The statistic is still fp32, as HF's: ``mean(x**2)`` correctly rounded, then
``rsqrt(mean + eps)``, the normalised value cast to the dtype, times the weight in the dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightllm_grpc_kernels._launch import block, check_rows, on_gpu, pdl, wait_for_predecessor


@triton.jit
def add_rows(x, r):
    """``r + x`` rounded to the activation dtype, as HF's ``residual + x``."""
    return (r.to(tl.float32) + x.to(tl.float32)).to(r.dtype)


@triton.jit
def squares(x):
    """Exact fp64 squares of ``x`` (16-bit or fp32), to sum in any order."""
    xd = x.to(tl.float32).to(tl.float64)
    return xd * xd


@triton.jit
def inv_rms(sum_of_squares, n_cols, eps):
    """``1 / sqrt(mean + eps)`` in fp32 from the fp64 sum of squares."""
    return 1.0 / tl.sqrt(sum_of_squares.to(tl.float32) / n_cols + eps)


@triton.jit
def normed(x, rstd, w):
    """HF's rounding: the normalised value cast to the dtype, then times the weight in the dtype."""
    y = (x.to(tl.float32) * rstd).to(w.dtype).to(tl.float32)
    return (y * w.to(tl.float32)).to(w.dtype)


@triton.jit
def norm_row(
    x_ptr, res_ptr, w_ptr, row, stride_x, stride_r, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Row ``row`` of the (residual add +) RMSNorm in the activation dtype, ``[BLOCK]`` (0 past
    ``n_cols``); with a residual, the sum is stored back into it. The whole row sits in
    registers (hidden sizes are at most a few thousand)."""
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Round the sum to the activation dtype before normalising, as HF's `residual + x` does.
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = add_rows(x, r)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    rstd = inv_rms(tl.sum(squares(x), axis=0), n_cols, eps)
    return normed(x, rstd, tl.load(w_ptr + cols, mask=mask, other=0.0))


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    y = norm_row(x_ptr, res_ptr, w_ptr, row, stride_x, stride_r, n_cols, eps, HAS_RESIDUAL, BLOCK)
    cols = tl.arange(0, BLOCK)
    tl.store(out_ptr + row * stride_o + cols, y, mask=cols < n_cols)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, out: torch.Tensor | None
) -> torch.Tensor:
    check_rows(x, "x", 2)
    n_rows, n_cols = x.shape
    assert weight.shape == (n_cols,) and weight.dtype == x.dtype, "weight must be [N] of x's dtype"
    assert weight.is_contiguous(), "weight must be contiguous"
    if residual is not None:
        check_rows(residual, "residual", 2, x.dtype)
        assert residual.shape == x.shape, f"residual {tuple(residual.shape)} != x {tuple(x.shape)}"
    out = torch.empty_like(x) if out is None else out
    check_rows(out, "out", 2, x.dtype)
    assert out.shape == x.shape, f"out {tuple(out.shape)} != x {tuple(x.shape)}"
    if n_rows == 0:
        return out
    res = x if residual is None else residual  # a valid pointer; unused without a residual
    width = block(n_cols)
    _rmsnorm_kernel[(n_rows,)](
        x, res, weight, out,
        x.stride(0), res.stride(0), out.stride(0),
        n_cols, eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=width,
        num_warps=min(max(width // 512, 1), 16) if on_gpu(x) else 1,
        enable_fp_fusion=False,  # keep the HF roundings: no FMA across them
        **pdl(x),
    )  # fmt: skip
    return out


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Returns ``norm(x) * weight`` for x [T, N] (last dim contiguous) and weight [N] of x's dtype."""
    return _launch(x, None, weight, eps, out)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Does ``residual += x`` in place, then returns ``norm(residual) * weight``."""
    return _launch(x, residual, weight, eps, out)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: fp32 variance and rsqrt, cast back, then scale by the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Torch reference of :func:`fused_add_rmsnorm` (updates ``residual`` in place too)."""
    residual.add_(x)
    return rmsnorm_ref(residual, weight, eps)
