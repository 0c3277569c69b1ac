from __future__ import annotations

import pytest
import torch
from lightllm_grpc_kernels.rmsnorm import fused_add_rmsnorm, fused_add_rmsnorm_ref, rmsnorm, rmsnorm_ref

GPU = pytest.mark.gpu
EPS = 1e-5

SHAPES = [
    pytest.param(1, 64, torch.float32),
    pytest.param(7, 96, torch.float16),
    pytest.param(33, 128, torch.float32),
    pytest.param(5, 4096, torch.bfloat16, marks=GPU),
    pytest.param(257, 5120, torch.bfloat16, marks=GPU),
    pytest.param(129, 4096, torch.float16, marks=GPU),
]


def _inputs(
    rows: int, cols: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(rows, cols, dtype=dtype, device=device) * 3
    weight = 1 + 0.1 * torch.randn(cols, dtype=dtype, device=device)
    return x, weight


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    """About two units in the last place: the fp32 sums differ in order, and the normalised
    value is rounded to the activation dtype before the weight multiplies it."""
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    return {"rtol": tol, "atol": tol}


@pytest.mark.parametrize("rows, cols, dtype", SHAPES)
def test_rmsnorm_matches_reference(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> None:
    x, weight = _inputs(rows, cols, dtype, device)
    out = torch.full_like(x, float("nan"))
    rmsnorm(x, weight, EPS, out=out)
    torch.testing.assert_close(out, rmsnorm_ref(x, weight, EPS), **_tolerance(dtype))


@pytest.mark.parametrize("rows, cols, dtype", SHAPES)
def test_fused_add_rmsnorm_matches_reference(
    rows: int, cols: int, dtype: torch.dtype, device: torch.device
) -> None:
    x, weight = _inputs(rows, cols, dtype, device)
    residual = torch.randn_like(x)
    residual_ref = residual.clone()
    out = torch.full_like(x, float("nan"))

    fused_add_rmsnorm(x, residual, weight, EPS, out=out)
    expected = fused_add_rmsnorm_ref(x, residual_ref, weight, EPS)

    torch.testing.assert_close(residual, residual_ref, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, **_tolerance(dtype))


def test_rmsnorm_reads_strided_rows(device: torch.device) -> None:
    base, weight = _inputs(6, 128, torch.float32, device)
    x = base[::2, :64]  # row stride 256, unit column stride
    torch.testing.assert_close(rmsnorm(x, weight[:64].contiguous(), EPS), rmsnorm_ref(x, weight[:64], EPS))
