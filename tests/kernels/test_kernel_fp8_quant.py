"""Per-token FP8 quantization kernel against its torch reference (GPU only: Triton's interpreter
rounds to e4m3 wrongly near powers of two, so it cannot check this kernel)."""

from __future__ import annotations

import pytest
import torch
from lightllm_grpc_kernels.fp8_quant import FP8, FP8_MAX, per_token_quant_fp8, per_token_quant_fp8_ref

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    ("rows", "cols", "dtype"),
    [
        (1, 4096, torch.bfloat16),
        (7, 14336, torch.bfloat16),
        (300, 4096, torch.float16),
        (33, 100, torch.float32),
    ],
)
@pytest.mark.parametrize("static", [False, True])
def test_per_token_quant_matches_reference(
    rows: int, cols: int, dtype: torch.dtype, static: bool, device: torch.device
) -> None:
    x = torch.randn(rows, cols + 8, device=device, dtype=dtype)[:, :cols]  # a row stride past the width
    x *= torch.logspace(-3, 2, rows, device=device).to(dtype).view(-1, 1)
    if rows > 2:
        x[1] = 0  # an all-zero row
    input_scale = torch.tensor([0.05], device=device) if static else None
    q, scale = per_token_quant_fp8(x, input_scale)
    q_ref, scale_ref = per_token_quant_fp8_ref(x, input_scale)
    assert q.dtype == FP8 and q.shape == (rows, cols) and scale.shape == (rows, 1)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    # Same e4m3 value, or (where x / scale lands within an ulp of a rounding boundary) the next one.
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=0.125, atol=2.0**-9)
    assert (q.float() != q_ref.float()).float().mean() < 1e-3
    assert q.float().abs().max() <= FP8_MAX
