"""The few-token GEMV (``gemv_rows``) against its torch reference: unscaled weights of x's dtype
and e4m3 weights with per-row scales and a bias, 1..4 tokens (each count its own kernel)."""

from __future__ import annotations

import pytest
import torch
from lightllm_grpc_kernels.fp8_gemv import FP8
from lightllm_grpc_kernels.gemv_rows import GEMV_ROWS_CONFIGS, MAX_ROWS, gemv_rows, gemv_rows_ref

from tests.kernels.test_kernel_fp8_gemv import _check  # the same tolerances as the W8A16 kernel's


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, fp8: bool, bias: bool):
    gen = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    x = torch.randn(m, k + 5, generator=gen).to(dtype)[:, :k].to(device)  # a row stride past the width
    if not fp8:
        return x, (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(device), None, None
    w = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(FP8).to(device)
    scale = (torch.rand(n, generator=gen) * 1e-3 + 1e-5).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    return x, w, scale, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize(("n", "k"), [(1, 1), (37, 100), (130, 257)])
@pytest.mark.parametrize(("fp8", "bias"), [(False, False), (True, False), (True, True)])
def test_gemv_rows_matches_reference_interpreter(
    m: int, n: int, k: int, dtype: torch.dtype, fp8: bool, bias: bool, device: torch.device
) -> None:
    x, w, scale, b = _inputs(m, n, k, dtype, device, fp8, bias)
    _check(gemv_rows(x, w, scale=scale, bias=b), gemv_rows_ref(x, w, scale, b))


def test_every_token_row_gets_its_own_product(device: torch.device) -> None:
    """Rows of x that differ give rows of y that differ, each its own x row's product (a kernel
    that broadcast one token's input to all rows would pass a check on identical rows)."""
    x = torch.zeros(MAX_ROWS, 8, device=device)
    for t in range(MAX_ROWS):
        x[t, t] = 1.0
    w = torch.arange(8 * 8, dtype=torch.float32, device=device).view(8, 8)
    assert torch.equal(gemv_rows(x, w), w.T[:MAX_ROWS])


def test_gemv_rows_checks_its_inputs(device: torch.device) -> None:
    x, w, _, _ = _inputs(MAX_ROWS + 1, 16, 32, torch.float16, device, False, False)
    with pytest.raises(AssertionError, match=r"takes 1\.\.4 rows"):
        gemv_rows(x, w)
    with pytest.raises(AssertionError, match="does not match"):
        gemv_rows(x[:2, :16], w)
    with pytest.raises(AssertionError, match="w: expected"):
        gemv_rows(x[:2], w.float())


@pytest.mark.gpu
@pytest.mark.parametrize("config", GEMV_ROWS_CONFIGS)
@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 14336), (1000, 333)])
@pytest.mark.parametrize("fp8", [False, True])
def test_gemv_rows_gpu(n: int, k: int, m: int, config, fp8: bool, device: torch.device) -> None:
    x, w, scale, b = _inputs(m, n, k, torch.bfloat16, device, fp8, fp8)
    _check(gemv_rows(x, w, config, scale, b), gemv_rows_ref(x, w, scale, b))
