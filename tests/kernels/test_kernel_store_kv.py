from __future__ import annotations

import pytest
import torch
from lightllm_grpc_kernels.store_kv import store_kv, store_kv_ref

GPU = pytest.mark.gpu


@pytest.mark.parametrize(
    "num_tokens, num_kv_heads, head_dim, num_slots, dtype",
    [
        (1, 1, 64, 5, torch.float32),
        (7, 8, 128, 40, torch.float16),
        (33, 2, 64, 33, torch.float32),
        pytest.param(1000, 8, 128, 4096, torch.bfloat16, marks=GPU),
        pytest.param(3, 4, 80, 17, torch.bfloat16, marks=GPU),
    ],
)
def test_store_kv_matches_reference(
    num_tokens: int,
    num_kv_heads: int,
    head_dim: int,
    num_slots: int,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    # Views of a fused qkv output: token stride wider than a row, as the model produces them.
    kv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, dtype=dtype, device=device)
    k, v = kv[:, :num_kv_heads], kv[:, 2 * num_kv_heads :]
    slots = torch.randperm(num_slots, device=device)[:num_tokens]
    k_buf = torch.full((num_slots, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_buf = torch.full_like(k_buf, float("nan"))
    k_ref, v_ref = k_buf.clone(), v_buf.clone()

    store_kv(k_buf, v_buf, k, v, slots)
    store_kv_ref(k_ref, v_ref, k, v, slots)

    # Exact copies; untouched slots must stay NaN (equal_nan compares them).
    torch.testing.assert_close(k_buf, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_buf, v_ref, rtol=0, atol=0, equal_nan=True)


def test_store_kv_rejects_wrong_slot_dtype(device: torch.device) -> None:
    k = torch.randn(2, 1, 64, device=device)
    buf = torch.zeros(4, 1, 64, device=device)
    with pytest.raises(AssertionError, match="slots"):
        store_kv(buf, buf.clone(), k, k, torch.tensor([0, 1], dtype=torch.int32, device=device))


FP8 = torch.float8_e4m3fn


def _wide_range(
    num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """Values from e4m3's subnormals (after the scale) to past its ±448 (clamped), each sign."""
    x = torch.randn(num_tokens, num_kv_heads, head_dim, device=device)
    sizes = torch.logspace(-4, 1.5, x.numel(), device=device)
    x *= sizes[torch.randperm(x.numel(), device=device)].view_as(x)
    x.view(-1)[:6] = torch.tensor([1e3, -1e3, 1e-4, -1e-4, 1e-2, -1e-2], device=device)
    return x.to(dtype)


@pytest.mark.parametrize(
    "num_tokens, num_kv_heads, head_dim, dtype",
    [
        (1, 1, 64, torch.float32),
        (9, 4, 128, torch.float16),
        (33, 2, 80, torch.float32),
        pytest.param(1000, 8, 128, torch.bfloat16, marks=GPU),
    ],
)
def test_store_kv_fp8_matches_reference(
    num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> None:
    """Divided by the layer's scale, clamped to ±448 and rounded to nearest even, bit for bit."""
    num_slots = num_tokens + 11
    k = _wide_range(num_tokens, num_kv_heads, head_dim, dtype, device)
    v = _wide_range(num_tokens, num_kv_heads, head_dim, dtype, device)
    k_scale, v_scale = torch.tensor(0.07, device=device), torch.tensor(1.9, device=device)
    slots = torch.randperm(num_slots, device=device)[:num_tokens]
    k_buf = torch.full((num_slots, num_kv_heads, head_dim), float("nan"), device=device).to(FP8)
    v_buf = k_buf.clone()
    k_ref, v_ref = k_buf.clone(), v_buf.clone()

    store_kv(k_buf, v_buf, k, v, slots, k_scale, v_scale)
    store_kv_ref(k_ref, v_ref, k, v, slots, k_scale, v_scale)

    assert torch.equal(k_buf.view(torch.uint8), k_ref.view(torch.uint8))  # NaN slots untouched too
    assert torch.equal(v_buf.view(torch.uint8), v_ref.view(torch.uint8))
    for stored in (k_buf[slots].float(), v_buf[slots].float()):  # clamped; subnormals kept
        assert stored.abs().max() == 448 and stored[stored != 0].abs().min() < 2**-6


def test_fp8_round_trip_error_is_half_a_step() -> None:
    """Dequantized (stored times scale) values are within half an e4m3 step of the originals: a
    sixteenth relative (3 mantissa bits), or half the smallest subnormal (2**-10) times the scale."""
    from lightllm_grpc_kernels._launch import dequantize_kv_ref, quantize_kv_ref

    x = torch.randn(4096) * torch.logspace(-5, 1, 4096)
    scale = torch.tensor(0.02)
    back = dequantize_kv_ref(quantize_kv_ref(x, scale), scale)
    inside = x.abs() <= 448 * scale
    assert inside.float().mean() > 0.9
    err = (back - x).abs()[inside]
    assert (err <= x.abs()[inside] / 16 + scale * 2.0**-10).all()
    assert torch.equal(back[~inside], 448 * scale * x[~inside].sign())  # clamped, not NaN


def test_store_kv_fp8_needs_scales(device: torch.device) -> None:
    k = torch.randn(2, 1, 64, device=device)
    buf = torch.zeros(4, 1, 64, device=device).to(FP8)
    slots = torch.tensor([0, 1], device=device)
    with pytest.raises(AssertionError, match="needs k_scale"):
        store_kv(buf, buf.clone(), k, k, slots)
    with pytest.raises(AssertionError, match="FP8"):
        one = torch.ones((), device=device)
        store_kv(buf.float(), buf.float(), k, k, slots, one, one)
