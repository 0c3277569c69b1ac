from __future__ import annotations

import pytest
import torch
from lightllm_grpc_kernels.activation import silu_and_mul, silu_and_mul_ref

GPU = pytest.mark.gpu


@pytest.mark.parametrize(
    "rows, inter, dtype",
    [
        (1, 64, torch.float32),
        (7, 33, torch.float16),
        (5, 5000, torch.float32),  # more than one column block in the interpreter too
        pytest.param(129, 14336, torch.bfloat16, marks=GPU),
        pytest.param(3, 1000, torch.float16, marks=GPU),
    ],
)
def test_silu_and_mul_matches_reference(
    rows: int, inter: int, dtype: torch.dtype, device: torch.device
) -> None:
    x = torch.randn(rows, 2 * inter, dtype=dtype, device=device) * 4
    out = torch.full((rows, inter), float("nan"), dtype=dtype, device=device)
    silu_and_mul(x, out=out)
    torch.testing.assert_close(out, silu_and_mul_ref(x))
