from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch
from lightllm_grpc_kernels.decode_attention import (
    MAX_SPLITS,
    decode_attention,
    decode_attention_ref,
    decode_num_splits,
    decode_workspace_rows,
)

if TYPE_CHECKING:
    from conftest import PagedKV

# (seq_lens, num_heads, num_kv_heads, head_dim, num_splits or None for the default)
CASES = [
    ([1], 4, 4, 64, None),
    ([7, 33], 8, 1, 128, None),
    ([64, 1, 100], 8, 2, 64, 3),
    ([5, 17, 1, 40, 9], 4, 1, 128, 1),
    ([300, 2], 4, 4, 64, 2),  # several tiles per split
    ([3, 50, 1, 19], 8, 1, 64, None),
]
GPU_CASES = [
    ([4096], 32, 8, 128, None),
    ([513, 4000, 1, 77] * 8, 32, 8, 128, None),
    ([1000] * 128, 32, 8, 128, None),
    ([2500, 3], 32, 32, 128, None),
    ([999, 1500], 16, 1, 64, None),
    ([130, 4097], 28, 4, 128, MAX_SPLITS),
]


def _run(case: tuple, dtype: torch.dtype, device: torch.device, paged_kv: Callable[..., PagedKV]) -> None:
    seq_lens, num_heads, num_kv_heads, head_dim, num_splits = case
    kv = paged_kv([s - 1 for s in seq_lens], [1] * len(seq_lens), num_kv_heads, head_dim, dtype, device)
    qkv = torch.randn(len(seq_lens), num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=device)
    q = qkv[:, :num_heads]
    scale = head_dim**-0.5
    args = (q, kv.k_buf, kv.v_buf, kv.req_to_token, kv.req_rows, kv.seq_lens)
    # Poisoned workspace too: stage 2 must not read partials that stage 1 did not write.
    splits = decode_num_splits(len(seq_lens)) if num_splits is None else num_splits
    mid_o = torch.full((len(seq_lens), num_heads, splits, head_dim), float("nan"), device=device)
    mid_lse = torch.full(mid_o.shape[:3], float("nan"), device=device)
    out = torch.full_like(q, float("nan"))

    decode_attention(*args, scale, num_splits=splits, mid_o=mid_o, mid_lse=mid_lse, out=out)

    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out, decode_attention_ref(*args, scale), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_decode_attention_matches_reference(
    case: tuple, dtype: torch.dtype, device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    _run(case, dtype, device, paged_kv)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES + GPU_CASES)
def test_decode_attention_matches_reference_gpu(
    case: tuple, dtype: torch.dtype, device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    _run(case, dtype, device, paged_kv)


@pytest.mark.parametrize("num_splits", [None, 1])
def test_decode_attention_empty_sequence_gives_zeros(
    num_splits: int | None, device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    """A padded batch entry (seq_len 0) must come out finite, not NaN, and leave the others alone."""
    kv = paged_kv([4, 0], [1, 1], 2, 64, torch.float32, device)
    kv.seq_lens[1] = 0
    q = torch.randn(2, 2, 64, device=device)
    out = torch.full_like(q, float("nan"))
    decode_attention(
        q,
        kv.k_buf,
        kv.v_buf,
        kv.req_to_token,
        kv.req_rows,
        kv.seq_lens,
        0.125,
        num_splits=num_splits,
        out=out,
    )
    torch.testing.assert_close(out[1], torch.zeros_like(out[1]), rtol=0, atol=0)
    expected = decode_attention_ref(
        q[:1], kv.k_buf, kv.v_buf, kv.req_to_token, kv.req_rows[:1], kv.seq_lens[:1], 0.125
    )
    torch.testing.assert_close(out[:1], expected, atol=1e-4, rtol=1e-4)


def test_decode_num_splits_fits_workspace() -> None:
    for batch in range(1, 300):
        splits = decode_num_splits(batch)
        assert 1 <= splits <= MAX_SPLITS
        assert batch * splits <= decode_workspace_rows(300)
