from __future__ import annotations

import pytest
import torch
from lightllm_grpc_kernels.gemv import GEMV_CONFIGS, gemv, gemv_ref

CPU_SHAPES = [(1, 1), (7, 33), (64, 100), (130, 257)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "k"), CPU_SHAPES)
def test_gemv_matches_reference_interpreter(n: int, k: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n * 1000 + k)
    x = torch.randn(1, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    if torch.cuda.is_available():
        x, w = x.cuda(), w.cuda()
    out = gemv(x, w)
    ref = gemv_ref(x, w)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    assert out.shape == (1, n)
    assert torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol * k**0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", GEMV_CONFIGS)
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (6144, 4096), (4096, 14336), (1000, 333)])
def test_gemv_bf16_gpu(n: int, k: int, config) -> None:
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    out = gemv(x, w, config)
    ref = x.float() @ w.float().T
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2
