from __future__ import annotations

import pytest
import torch
from lightllm_grpc_kernels.rotary import apply_rotary, apply_rotary_ref

GPU = pytest.mark.gpu


def _cos_sin(max_pos: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.arange(max_pos, device=device).float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


@pytest.mark.parametrize(
    "num_tokens, num_heads, num_kv_heads, head_dim, dtype",
    [
        (1, 4, 4, 64, torch.float32),
        (7, 8, 2, 128, torch.float16),
        (33, 8, 1, 64, torch.float32),
        pytest.param(1000, 32, 8, 128, torch.bfloat16, marks=GPU),
        pytest.param(5, 28, 4, 128, torch.bfloat16, marks=GPU),
    ],
)
def test_rotary_matches_reference(
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    max_pos = 4096
    cos, sin = _cos_sin(max_pos, head_dim, device)
    # q and k as views of one fused qkv output, as the model hands them over.
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=device)
    q, k = qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]
    v_before = qkv[:, num_heads + num_kv_heads :].clone()
    positions = torch.randint(0, max_pos, (num_tokens,), device=device)
    q_ref, k_ref = q.clone(), k.clone()

    apply_rotary(positions, q, k, cos, sin)
    apply_rotary_ref(positions, q_ref, k_ref, cos, sin)

    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_ref)
    torch.testing.assert_close(qkv[:, num_heads + num_kv_heads :], v_before, rtol=0, atol=0)


def test_rotary_position_zero_is_identity(device: torch.device) -> None:
    cos, sin = _cos_sin(8, 64, device)
    q, k = torch.randn(3, 2, 64, device=device), torch.randn(3, 1, 64, device=device)
    q0, k0 = q.clone(), k.clone()
    apply_rotary(torch.zeros(3, dtype=torch.int64, device=device), q, k, cos, sin)
    torch.testing.assert_close(q, q0, rtol=0, atol=0)
    torch.testing.assert_close(k, k0, rtol=0, atol=0)


@pytest.mark.parametrize(
    "dtype", [torch.float16, pytest.param(torch.bfloat16, marks=GPU), pytest.param(torch.float16, marks=GPU)]
)
def test_rotary_matches_the_model_bit_for_bit(dtype: torch.dtype, device: torch.device) -> None:
    """16-bit products are rounded as the torch path (and HF) round them: no drift between backends."""
    from lightllm_grpc.layers.ops import Ops
    from lightllm_grpc.layers.rotary import RotaryEmbedding

    with torch.device(device):
        rope = RotaryEmbedding(64, 512, 500000.0, None, Ops.native())
    q, k = (
        torch.randn(9, 4, 64, dtype=dtype, device=device),
        torch.randn(9, 2, 64, dtype=dtype, device=device),
    )
    positions = torch.randint(0, 512, (9,), device=device)
    q_model, k_model = rope(positions, q.clone(), k.clone())

    apply_rotary(positions, q, k, rope.cos_cache, rope.sin_cache)

    torch.testing.assert_close(q, q_model, rtol=0, atol=0)
    torch.testing.assert_close(k, k_model, rtol=0, atol=0)
