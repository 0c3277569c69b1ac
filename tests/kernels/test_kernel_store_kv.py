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
