"""RMSNorm, alone and fused with the residual add that precedes it in every decoder layer."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightllm_grpc_kernels._launch import block, check_rows, on_gpu


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
):
    # One program per row; the whole row sits in registers (hidden sizes are at most a few thousand).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Round the sum to the activation dtype before normalising, as HF's `residual + x` does.
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(r.dtype)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    # HF casts the normalised row back to the input dtype before multiplying by the weight.
    y = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (y * w).to(x.dtype), mask=mask)


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
