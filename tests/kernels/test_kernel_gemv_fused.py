"""The GEMV with a folded prologue against the two kernels it replaces: bit for bit, with a
weight in the activations' dtype and with an e4m3 weight and its scales (FP8 layers)."""

from __future__ import annotations

import pytest
import torch
from lightllm_grpc_kernels.activation import silu_and_mul, silu_and_mul_ref
from lightllm_grpc_kernels.fp8_gemv import FP8, FP8_GEMV_CONFIGS_ONE_TOKEN, fp8_gemv, fp8_gemv_ref
from lightllm_grpc_kernels.gemv import GEMV_CONFIGS, GemvConfig, add_rmsnorm_gemv, gemv, gemv_ref, silu_gemv
from lightllm_grpc_kernels.rmsnorm import fused_add_rmsnorm, rmsnorm, rmsnorm_ref

EPS = 1e-5
# (N, K): odd sizes, K past one 256-wide slice (the statistic then sums several tiles).
CPU_SHAPES = [(1, 1), (7, 33), (130, 257), (64, 1000)]
GPU_CONFIGS = pytest.mark.parametrize("config", GEMV_CONFIGS, ids=str)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    as_int = {2: torch.int16, 4: torch.int32}[a.element_size()]
    assert torch.equal(a.view(as_int), b.view(as_int)), f"differ in {(a != b).sum().item()} of {a.numel()}"


def _weights(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return (torch.randn(n, k, device=device) / k**0.5).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "k"), CPU_SHAPES)
def test_silu_gemv_is_silu_and_mul_then_gemv(
    n: int, k: int, dtype: torch.dtype, device: torch.device
) -> None:
    h = (torch.randn(1, 2 * k, device=device) * 3).to(dtype)
    w = _weights(n, k, dtype, device)

    out = silu_gemv(h, w)

    _same_bits(out, gemv(silu_and_mul(h), w))
    tol = 1e-4 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out, gemv_ref(silu_and_mul_ref(h), w), rtol=tol, atol=tol)


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "k"), CPU_SHAPES)
def test_add_rmsnorm_gemv_is_the_norm_then_gemv(
    n: int, k: int, dtype: torch.dtype, with_residual: bool, device: torch.device
) -> None:
    """The projection and the new residual equal ``fused_add_rmsnorm`` (or ``rmsnorm``) then
    ``gemv``; the residual given is only read; the norm's weight matters."""
    x = (torch.randn(1, k, device=device) * 2).to(dtype)
    residual = (torch.randn(1, k, device=device) * 4).to(dtype) if with_residual else None
    norm_w = (1 + 0.3 * torch.randn(k, device=device)).to(dtype)
    w = _weights(n, k, dtype, device)
    before = None if residual is None else residual.clone()

    out, summed = add_rmsnorm_gemv(x, residual, norm_w, EPS, w)

    if residual is None:
        assert summed is x
        _same_bits(out, gemv(rmsnorm(x, norm_w, EPS), w))
        expected_normed = rmsnorm_ref(x, norm_w, EPS)
    else:
        assert summed.data_ptr() not in (x.data_ptr(), residual.data_ptr())
        _same_bits(residual, before)  # read only
        unfused_residual = residual.clone()
        _same_bits(out, gemv(fused_add_rmsnorm(x, unfused_residual, norm_w, EPS), w))
        _same_bits(summed, unfused_residual)
        expected_normed = rmsnorm_ref(before + x, norm_w, EPS)
    tol = 1e-4 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out, gemv_ref(expected_normed, w), rtol=tol, atol=tol)


def _fp8_weights(n: int, k: int, dtype: torch.dtype, device: torch.device, bias: bool):
    """An e4m3 weight over its whole range, per-row scales, and maybe a bias in ``dtype``."""
    w = (torch.randn(n, k, device=device) * 100).clamp(-448, 448).to(FP8)
    scale = (torch.rand(n, device=device) + 0.5) / (100 * k**0.5)
    return w, scale, (torch.randn(n, device=device).to(dtype) if bias else None)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "k"), CPU_SHAPES)
def test_fp8_fused_gemvs_are_the_op_then_fp8_gemv(
    n: int, k: int, dtype: torch.dtype, bias: bool, device: torch.device
) -> None:
    """With an e4m3 weight, ``scale`` and ``bias``: SiLU-and-mul, or add + RMSNorm, folded in equal
    that op followed by the W8A16 GEMV (``fp8_gemv``), bit for bit; and its reference closely."""
    w, scale, b = _fp8_weights(n, k, dtype, device, bias)
    h = (torch.randn(1, 2 * k, device=device) * 3).to(dtype)
    x, residual = ((torch.randn(1, k, device=device) * s).to(dtype) for s in (2, 4))
    norm_w = (1 + 0.3 * torch.randn(k, device=device)).to(dtype)

    out = silu_gemv(h, w, None, scale, b)
    _same_bits(out, fp8_gemv(silu_and_mul(h), w, scale, b))
    tol = 1e-4 if dtype == torch.float32 else 4e-3
    ref = fp8_gemv_ref(silu_and_mul_ref(h), w, scale, b)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)

    out, summed = add_rmsnorm_gemv(x, residual, norm_w, EPS, w, None, scale, b)
    unfused_residual = residual.clone()
    _same_bits(out, fp8_gemv(fused_add_rmsnorm(x, unfused_residual, norm_w, EPS), w, scale, b))
    _same_bits(summed, unfused_residual)
    ref = fp8_gemv_ref(rmsnorm_ref(residual + x, norm_w, EPS), w, scale, b)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_fused_gemvs_check_their_inputs(device: torch.device) -> None:
    w = torch.randn(8, 16, device=device)
    with pytest.raises(AssertionError, match="2 \\* 16"):
        silu_gemv(torch.randn(1, 16, device=device), w)
    with pytest.raises(AssertionError, match="one row"):
        silu_gemv(torch.randn(2, 32, device=device), w)
    with pytest.raises(AssertionError, match="norm weight"):
        add_rmsnorm_gemv(torch.randn(1, 16, device=device), None, torch.ones(8, device=device), EPS, w)
    with pytest.raises(AssertionError, match="residual"):
        add_rmsnorm_gemv(
            torch.randn(1, 16, device=device),
            torch.randn(1, 16, device=device).half(),
            torch.ones(16, device=device),
            EPS,
            w,
        )
    w8, scale, _ = _fp8_weights(8, 16, torch.float32, device, False)
    with pytest.raises(AssertionError, match=r"w: expected torch\.float8_e4m3fn"):
        silu_gemv(torch.randn(1, 32, device=device), w, None, scale)  # a scale needs an e4m3 weight
    with pytest.raises(AssertionError, match=r"w: expected torch\.float32"):
        gemv(torch.randn(1, 16, device=device), w8)  # an e4m3 weight needs its scale
    with pytest.raises(AssertionError, match="scale"):
        gemv(torch.randn(1, 16, device=device), w8, None, scale[:4])
    with pytest.raises(AssertionError, match="no bias"):
        gemv(torch.randn(1, 16, device=device), w, None, None, torch.zeros(8, device=device))


@pytest.mark.gpu
@GPU_CONFIGS
@pytest.mark.parametrize(("n", "k"), [(4096, 14336), (4096, 7168), (1000, 333)])
def test_silu_gemv_bf16_gpu(n: int, k: int, config: GemvConfig) -> None:
    """8B's down projection (TP=1 and 2) and an odd shape, every config: bit for bit on the GPU."""
    h = (torch.randn(1, 2 * k, device="cuda") * 3).to(torch.bfloat16)
    w = _weights(n, k, torch.bfloat16, torch.device("cuda"))
    _same_bits(silu_gemv(h, w, config), gemv(silu_and_mul(h), w, config))


@pytest.mark.gpu
@GPU_CONFIGS
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (28672, 4096), (3072, 4096), (1000, 333)])
def test_add_rmsnorm_gemv_bf16_gpu(n: int, k: int, with_residual: bool, config: GemvConfig) -> None:
    """8B's qkv and gate_up (TP=1; qkv at TP=2) and an odd shape, every config: bit for bit."""
    cuda = torch.device("cuda")
    x = (torch.randn(1, k, device=cuda) * 2).to(torch.bfloat16)
    residual = (torch.randn(1, k, device=cuda) * 4).to(torch.bfloat16) if with_residual else None
    norm_w = (1 + 0.3 * torch.randn(k, device=cuda)).to(torch.bfloat16)
    w = _weights(n, k, torch.bfloat16, cuda)
    for _ in range(3):  # a racy residual write would show as a run-to-run difference
        out, summed = add_rmsnorm_gemv(x, residual, norm_w, EPS, w, config)
        if residual is None:
            _same_bits(out, gemv(rmsnorm(x, norm_w, EPS), w, config))
            continue
        unfused_residual = residual.clone()
        _same_bits(out, gemv(fused_add_rmsnorm(x, unfused_residual, norm_w, EPS), w, config))
        _same_bits(summed, unfused_residual)


@pytest.mark.gpu
@pytest.mark.parametrize("config", FP8_GEMV_CONFIGS_ONE_TOKEN, ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("n", "k"), [(4096, 14336), (6144, 4096), (28672, 4096), (1000, 333)])
def test_fp8_fused_gemvs_bf16_gpu(n: int, k: int, bias: bool, config: GemvConfig) -> None:
    """8B's FP8 down, qkv and gate_up shapes and an odd one, every one-token W8A16 tile: the fused
    GEMVs equal the op then ``fp8_gemv`` bit for bit (the down shape takes the SiLU fusion, the
    others the norm's)."""
    cuda = torch.device("cuda")
    w, scale, b = _fp8_weights(n, k, torch.bfloat16, cuda, bias)
    h = (torch.randn(1, 2 * k, device=cuda) * 3).to(torch.bfloat16)
    _same_bits(silu_gemv(h, w, config, scale, b), fp8_gemv(silu_and_mul(h), w, scale, b, config))
    x, residual = ((torch.randn(1, k, device=cuda) * s).to(torch.bfloat16) for s in (2, 4))
    norm_w = (1 + 0.3 * torch.randn(k, device=cuda)).to(torch.bfloat16)
    for _ in range(3):  # a racy residual write would show as a run-to-run difference
        out, summed = add_rmsnorm_gemv(x, residual, norm_w, EPS, w, config, scale, b)
        unfused_residual = residual.clone()
        normed = fused_add_rmsnorm(x, unfused_residual, norm_w, EPS)
        _same_bits(out, fp8_gemv(normed, w, scale, b, config))
        _same_bits(summed, unfused_residual)
