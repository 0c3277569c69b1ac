"""The norm and SiLU-and-mul kernels that quantize their output to e4m3 (fp8_quant.py): bit for
bit the two kernels they replace, and close to the torch references. Compiled on a GPU, in
Triton's interpreter elsewhere (the conftest makes its e4m3 rounding the GPU's)."""

from __future__ import annotations

import pytest
import torch
from lightllm_grpc_kernels.activation import silu_and_mul_ref
from lightllm_grpc_kernels.fp8_quant import (
    FP8,
    SILU_QUANT_BLOCK,
    add_rmsnorm_quant_fp8,
    add_rmsnorm_then_quant_fp8,
    per_token_quant_fp8_ref,
    silu_and_mul_quant_fp8,
    silu_and_mul_then_quant_fp8,
)
from lightllm_grpc_kernels.rmsnorm import fused_add_rmsnorm_ref, rmsnorm_ref

GPU = torch.cuda.is_available()
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Equal e4m3 bytes and equal scales."""
    assert a[0].dtype == FP8 and a[0].shape == b[0].shape and a[1].shape == b[1].shape
    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
    assert torch.equal(a[1], b[1])


def _close_to_ref(a: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    # The reference rounds the activation elsewhere: a 16-bit row max may be an ulp (2^-7) off.
    torch.testing.assert_close(a[1], ref[1], rtol=2e-2, atol=0)
    dequantized, expected = a[0].float() * a[1], ref[0].float() * ref[1]
    torch.testing.assert_close(dequantized, expected, rtol=0.13, atol=float(ref[1].max()) * 2**-8)


def _scaled_rows(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rows of very different magnitudes, a row stride past the width, one all-zero row."""
    x = torch.randn(rows, cols + 8, device=device, dtype=dtype)[:, :cols]
    x *= torch.logspace(-2, 1, rows, device=device).to(dtype).view(-1, 1)
    if rows > 2:
        x[1] = 0
    return x


NORM_SHAPES = [(5, 96), (3, 100)] + ([(300, 4096), (17, 5120)] if GPU else [])


@pytest.mark.parametrize(("rows", "cols"), NORM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("static", [False, True])
def test_add_rmsnorm_quant_is_the_norm_then_the_quantization(
    rows: int, cols: int, dtype: torch.dtype, residual: bool, static: bool, device: torch.device
) -> None:
    x = _scaled_rows(rows, cols, dtype, device)
    weight = (torch.rand(cols, device=device) + 0.5).to(dtype)
    res = torch.randn(rows, cols, device=device, dtype=dtype) if residual else None
    input_scale = torch.tensor([0.01], device=device) if static else None
    res_fused = res.clone() if residual else None
    res_split = res.clone() if residual else None
    res_ref = res.clone() if residual else None
    fused = add_rmsnorm_quant_fp8(x, res_fused, weight, 1e-5, input_scale)
    _same(fused, add_rmsnorm_then_quant_fp8(x, res_split, weight, 1e-5, input_scale))
    if residual:
        assert torch.equal(res_fused, res_split) and not torch.equal(res_fused, res)  # added in place
    if res_ref is None:
        normed = rmsnorm_ref(x, weight, 1e-5)
    else:
        normed = fused_add_rmsnorm_ref(x, res_ref, weight, 1e-5)
    _close_to_ref(fused, per_token_quant_fp8_ref(normed, input_scale))


SILU_SHAPES = [(4, 64), (3, 100)] + ([(7, 14336), (513, 14336), (33, SILU_QUANT_BLOCK + 37)] if GPU else [])


@pytest.mark.parametrize(("rows", "inter"), SILU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [False, True])
def test_silu_and_mul_quant_is_the_activation_then_the_quantization(
    rows: int, inter: int, dtype: torch.dtype, static: bool, device: torch.device
) -> None:
    h = _scaled_rows(rows, 2 * inter, dtype, device) * 3
    input_scale = torch.tensor([0.02], device=device) if static else None
    fused = silu_and_mul_quant_fp8(h, input_scale)
    _same(fused, silu_and_mul_then_quant_fp8(h, input_scale))
    _close_to_ref(fused, per_token_quant_fp8_ref(silu_and_mul_ref(h), input_scale))
    if rows > 2 and not static:
        assert fused[0][1].float().abs().max() == 0  # the all-zero row stays zero, with a finite scale
        assert 0 < fused[1][1].item() < 1e-9


def test_empty_inputs(device: torch.device) -> None:
    q, scale = silu_and_mul_quant_fp8(torch.empty(0, 64, device=device))
    assert q.shape == (0, 32) and scale.shape == (0, 1)
    weight = torch.ones(32, device=device)
    q, scale = add_rmsnorm_quant_fp8(torch.empty(0, 32, device=device), None, weight, 1e-6)
    assert q.shape == (0, 32) and scale.shape == (0, 1)
