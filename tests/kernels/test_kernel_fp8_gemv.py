"""W8A16 FP8 GEMV kernel against its torch reference. Triton's interpreter loads e4m3 and converts
it to fp32 / fp16 exactly (all 254 finite codes), so the kernel logic runs on the CPU too."""

from __future__ import annotations

import pytest
import torch
from lightllm_grpc_kernels.fp8_gemv import FP8, FP8_GEMV_CONFIGS, fp8_gemv, fp8_gemv_ref


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, bias: bool):
    x = torch.randn(m, k + 5, device=device).to(dtype)[:, :k]  # a row stride past the width
    w = (torch.randn(n, k, device=device) * 100).clamp(-448, 448).to(FP8)
    scale = torch.rand(n, device=device) * 1e-3 + 1e-5
    b = torch.randn(n, device=device).to(dtype) if bias else None
    return x, w, scale, b


def _check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = 1e-4 if ref.dtype == torch.float32 else 1e-2
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < tol, rel
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("m", "n", "k"), [(1, 1, 1), (1, 37, 100), (3, 64, 300), (16, 130, 257), (20, 24, 40)]
)
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_gemv_matches_reference_interpreter(
    m: int, n: int, k: int, dtype: torch.dtype, bias: bool, device: torch.device
) -> None:
    x, w, scale, b = _inputs(m, n, k, dtype, device, bias)
    _check(fp8_gemv(x, w, scale, b), fp8_gemv_ref(x, w, scale, b))


def test_fp8_gemv_checks_its_inputs(device: torch.device) -> None:
    x, w, scale, _ = _inputs(2, 32, 64, torch.float16, device, False)
    with pytest.raises(AssertionError, match="w: expected"):
        fp8_gemv(x, w.half(), scale)
    with pytest.raises(AssertionError, match="does not match"):
        fp8_gemv(x[:, :48], w, scale)
    with pytest.raises(AssertionError, match="scale"):
        fp8_gemv(x, w, scale.half())
    with pytest.raises(AssertionError, match="bias"):
        fp8_gemv(x, w, scale, torch.zeros(32, device=device))  # fp32 bias for fp16 x
    assert fp8_gemv(x[:0], w, scale).shape == (0, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 14336), (1000, 333), (48, 4100)])
def test_fp8_gemv_gpu(n: int, k: int, m: int, dtype: torch.dtype, bias: bool, device: torch.device) -> None:
    x, w, scale, b = _inputs(m, n, k, dtype, device, bias)
    _check(fp8_gemv(x, w, scale, b), fp8_gemv_ref(x, w, scale, b))


@pytest.mark.gpu
@pytest.mark.parametrize("config", FP8_GEMV_CONFIGS)
@pytest.mark.parametrize("m", [1, 16])
def test_fp8_gemv_configs_gpu(m: int, config, device: torch.device) -> None:
    x, w, scale, b = _inputs(m, 4096, 14336, torch.bfloat16, device, True)
    _check(fp8_gemv(x, w, scale, b, config), fp8_gemv_ref(x, w, scale, b))


def test_fp8_layers_dispatch_on_token_count(monkeypatch: pytest.MonkeyPatch, device: torch.device) -> None:
    """``fp8_linear_cuda`` (the Hopper choice): W8A16 up to W8A16_MAX_M tokens, counted over the
    leading dims, ``_scaled_mm`` above; run here with the kernel in the interpreter."""
    from lightllm_grpc.layers import fp8
    from lightllm_grpc.layers.linear import RowParallelLinear

    large_calls = []
    monkeypatch.setattr(fp8, "fp8_linear_scaled_mm", lambda x, *args: large_calls.append(x.shape) or x)
    layer = RowParallelLinear(96, 40, bias=True, method=fp8.Fp8LinearMethod())
    fp8.Fp8LinearMethod.load_dense_(layer, torch.randn(40, 96) * 0.02)
    layer.bias.data.normal_()
    layer = layer.to(device)
    dense = fp8.Fp8LinearMethod.dequantized_weight(layer)
    for shape in [(1, 96), (16, 96), (2, 8, 96)]:
        x = torch.randn(shape, device=device)
        y = fp8.fp8_linear_cuda(x, layer.weight, layer.weight_scale, None, layer.bias)
        assert y.shape == (*shape[:-1], 40)
        torch.testing.assert_close(y, x @ dense.T + layer.bias, rtol=1e-4, atol=1e-5)  # x not quantized
    assert not large_calls
    for shape in [(17, 96), (3, 6, 96)]:
        fp8.fp8_linear_cuda(torch.randn(shape, device=device), layer.weight, layer.weight_scale, None, None)
    assert large_calls == [(17, 96), (3, 6, 96)]
    assert fp8.W8A16_MAX_M == 16


def test_a_few_tokens_take_the_few_token_gemv_where_tuned(
    monkeypatch: pytest.MonkeyPatch, device: torch.device
) -> None:
    """``fp8_cuda_gemm(rows=)``: the token counts ``rows`` binds (here 2 and 4) go through
    ``gemv_rows`` (run here in the interpreter); one token, 3 and 5.. through the W8A16 kernel."""
    from lightllm_grpc_kernels.gemv import GemvConfig

    from lightllm_grpc.layers import fp8

    x_all, w, scale, b = _inputs(6, 40, 96, torch.float32, device, True)
    rows = (GemvConfig(8, 64), None, GemvConfig(4, 32))
    gemm = fp8.fp8_cuda_gemm(None, None, rows)
    assert gemm is fp8.fp8_cuda_gemm(None, None, rows)  # shared by the layers that chose it
    calls: dict[str, list[int]] = {"fp8_linear_gemv_rows": [], "fp8_linear_w8a16": []}
    for name, seen in calls.items():
        real = getattr(fp8, name)
        monkeypatch.setattr(fp8, name, lambda x, *a, seen=seen, real=real: seen.append(len(x)) or real(x, *a))
    rows_calls, w8a16_calls = calls.values()
    for m in range(1, 7):
        x = x_all[:m]
        _check(gemm(x, w, scale, None, b), fp8_gemv_ref(x, w, scale, b))
    assert rows_calls == [2, 4] and w8a16_calls == [1, 3, 5, 6]
    rows_calls.clear()
    fp8.fp8_cuda_gemm()(x_all[:2], w, scale, None, b)  # untuned: never
    assert rows_calls == []


def test_the_few_token_gemv_is_chosen_per_token_count() -> None:
    from lightllm_grpc_kernels.gemv import GemvConfig

    from lightllm_grpc.layers.matmul_tuning import pick_gemv_rows

    a, b = GemvConfig(8, 256), GemvConfig(4, 512)
    timed = {2: (0.028, [(0.018, a), (0.017, b)]), 3: (0.020, [(0.025, a)]), 4: (0.030, [(0.020, a)])}
    assert pick_gemv_rows(timed) == (b, None, a)  # each count its fastest tiles, or None
    assert pick_gemv_rows({**timed, 4: (0.020, [(0.020, a)])}) == (b,)  # a tie loses; trailing Nones go
    assert pick_gemv_rows({**timed, 2: (0.028, [])}) == (None, None, a)  # no tile right at 2
    assert pick_gemv_rows({2: (0.010, [(0.0098, a)])}, min_gain=0.03) == ()  # under the margin
    assert pick_gemv_rows({2: (0.010, [(0.0096, a)])}, min_gain=0.03) == (a,)
    assert pick_gemv_rows({2: (0.028, [])}) == ()


def test_the_few_token_gemv_choice_is_logged_with_its_timings() -> None:
    from lightllm_grpc_kernels.gemv import GemvConfig

    from lightllm_grpc.layers.matmul_tuning import _describe_rows

    a = GemvConfig(8, 256)
    timed = {2: (0.028, []), 3: (0.030, [(0.025, a)]), 4: (0.020, [(0.025, a)])}
    line = _describe_rows(timed, (None, a), "tl.dot")
    assert line.startswith(
        "2 tokens: no tile gave tl.dot's numbers; 3 tokens 25.0 vs tl.dot 30.0 us -> GEMV Gemv"
    )
    assert line.endswith("; 4 tokens 25.0 vs tl.dot 20.0 us -> tl.dot")
