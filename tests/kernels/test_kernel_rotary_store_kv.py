"""The fused rotary + KV store against rotary-then-store: bit for bit, every pool dtype."""

from __future__ import annotations

import pytest
import torch
from lightllm_grpc_kernels.rotary import apply_rotary
from lightllm_grpc_kernels.store_kv import rotary_store_kv, rotary_store_kv_ref, store_kv

GPU = pytest.mark.gpu
FP8 = torch.float8_e4m3fn


def _cos_sin(max_pos: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.arange(max_pos, device=device).float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def _case(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device):
    """q, k, v as views of one fused qkv output (the model's layout), scaled so that an FP8 pool
    sees values from its subnormals to past its range; slots and positions at random."""
    width = num_heads + 2 * num_kv_heads
    qkv = torch.randn(num_tokens, width, head_dim, device=device)
    qkv *= torch.logspace(-3, 1.5, qkv.numel(), device=device)[
        torch.randperm(qkv.numel(), device=device)
    ].view_as(qkv)
    qkv = qkv.to(dtype)
    q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    positions = torch.randint(0, 4096, (num_tokens,), device=device)
    slots = torch.randperm(num_tokens + 9, device=device)[:num_tokens]
    return qkv, q, k, v, positions, slots


def _pool(num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> torch.Tensor:
    # NaN in every slot: a slot the kernel should not touch stays NaN (e4m3 has a NaN too).
    return torch.full((num_slots, num_kv_heads, head_dim), float("nan"), device=device).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return (
        t.view(torch.uint8)
        if t.dtype == FP8
        else t.view(torch.int16 if t.element_size() == 2 else torch.int32)
    )


@pytest.mark.parametrize(
    "num_tokens, num_heads, num_kv_heads, head_dim, dtype, pool",
    [
        (1, 4, 4, 64, torch.float32, "same"),
        (7, 8, 2, 128, torch.float16, "same"),
        (33, 8, 1, 64, torch.float32, "same"),
        (5, 12, 3, 80, torch.float16, "same"),  # odd head counts, a half (40) not a power of two
        (1, 4, 4, 64, torch.float32, "fp8"),
        (9, 6, 2, 80, torch.float16, "fp8"),
        (17, 8, 1, 128, torch.float32, "fp8"),
        pytest.param(1000, 32, 8, 128, torch.bfloat16, "same", marks=GPU),
        pytest.param(1, 32, 8, 128, torch.bfloat16, "same", marks=GPU),
        pytest.param(5, 28, 4, 128, torch.bfloat16, "fp8", marks=GPU),
        pytest.param(300, 32, 8, 128, torch.bfloat16, "fp8", marks=GPU),
        pytest.param(3, 14, 2, 64, torch.float16, "fp8", marks=GPU),
    ],
)
def test_rotary_store_kv_is_rotary_then_store_bit_for_bit(
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    pool: str,
    device: torch.device,
) -> None:
    """Against the two kernels it replaces (and their torch references): q and k rotated in
    place, k and v in the pool exactly as rotary-then-store leaves them, v in qkv untouched,
    every other slot untouched."""
    qkv, q, k, v, positions, slots = _case(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device)
    cos, sin = _cos_sin(4096, head_dim, device)
    num_slots = num_tokens + 9
    pool_dtype = FP8 if pool == "fp8" else dtype
    scales = (
        (torch.tensor(0.07, device=device), torch.tensor(1.9, device=device))
        if pool == "fp8"
        else (None, None)
    )
    k_buf = _pool(num_slots, num_kv_heads, head_dim, pool_dtype, device)
    v_buf = k_buf.clone()
    v_before = v.clone()

    # The unfused path: rotary kernel (in place on a copy), then the store kernel.
    two = qkv.clone()
    q2, k2, v2 = two.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    k_two, v_two = k_buf.clone(), v_buf.clone()
    apply_rotary(positions, q2, k2, cos, sin)
    store_kv(k_two, v_two, k2, v2, slots, *scales)
    # The torch reference.
    q_ref, k_ref, v_ref, kr = q.clone(), k_buf.clone(), v_buf.clone(), k.clone()
    rotary_store_kv_ref(k_ref, v_ref, q_ref, kr, v, slots, positions, cos, sin, *scales)

    out = rotary_store_kv(k_buf, v_buf, q, k, v, slots, positions, cos, sin, *scales)

    assert out is q
    for got, unfused, ref in ((q, q2, q_ref), (k, k2, kr), (k_buf, k_two, k_ref), (v_buf, v_two, v_ref)):
        assert torch.equal(_bits(got), _bits(unfused)), "differs from rotary-then-store"
        assert torch.equal(_bits(got), _bits(ref)), "differs from the torch reference"
    assert torch.equal(_bits(v), _bits(v_before)), "v is an input only"
    if pool == "fp8":  # the scales were applied (k's values exceed ±448 x scale somewhere)
        assert k_buf[slots].float().abs().max() == 448


def test_rotary_store_kv_checks_its_inputs(device: torch.device) -> None:
    cos, sin = _cos_sin(8, 64, device)
    q, k = torch.randn(2, 2, 64, device=device), torch.randn(2, 1, 64, device=device)
    buf = torch.zeros(4, 1, 64, device=device)
    slots, positions = torch.tensor([0, 1], device=device), torch.tensor([0, 1], device=device)
    with pytest.raises(AssertionError, match="slots"):
        rotary_store_kv(buf, buf.clone(), q, k, k, slots.int(), positions, cos, sin)
    with pytest.raises(AssertionError, match="positions"):
        rotary_store_kv(buf, buf.clone(), q, k, k, slots, positions.int(), cos, sin)
    with pytest.raises(AssertionError, match="needs k_scale"):
        rotary_store_kv(buf.to(FP8), buf.to(FP8), q, k, k, slots, positions, cos, sin)
