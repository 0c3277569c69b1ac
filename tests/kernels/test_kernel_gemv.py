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


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs a Hopper GPU"
)
def test_gemv_chain_with_programmatic_dependent_launch_is_bit_equal_in_a_cuda_graph() -> None:
    """Each GEMV reads the one before it: launched with PDL (the next grid starts early and waits
    in-kernel) inside a CUDA graph, every kernel still sees its input complete, bit for bit."""
    from dataclasses import replace

    from lightllm_grpc_kernels.gemv import add_rmsnorm_gemv, silu_gemv

    gen = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5
          for n, k in [(6144, 4096), (4096, 3072), (8192, 4096), (4096, 4096)] * 4]  # fmt: skip
    norm = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    x0 = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)

    def chain(cfg):
        x, res = x0, x0
        for i in range(0, len(ws), 4):
            q, res = add_rmsnorm_gemv(x, res, norm, 1e-5, ws[i], cfg)
            o = gemv(q[:, :3072].contiguous(), ws[i + 1], cfg)
            g, res = add_rmsnorm_gemv(o, res, norm, 1e-5, ws[i + 2], cfg)
            x = silu_gemv(g, ws[i + 3], cfg)
        return x, res

    plain = GEMV_CONFIGS[6]
    ref = chain(plain)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        chain(replace(plain, pdl=True))
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = chain(replace(plain, pdl=True))
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
