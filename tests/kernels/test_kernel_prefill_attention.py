from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch
from lightllm_grpc_kernels.prefill_attention import prefill_attention, prefill_attention_ref, use_tma

if TYPE_CHECKING:
    from conftest import PagedKV

GPU = pytest.mark.gpu

# (prefix_lens, q_lens, num_heads, num_kv_heads, head_dim)
CASES = [
    ([0], [1], 4, 4, 64),
    ([0, 0], [7, 33], 8, 2, 128),
    ([12, 40, 3], [5, 1, 17], 8, 1, 64),
    ([0, 9, 33, 1, 20], [1, 7, 3, 16, 2], 4, 1, 128),
    ([5, 0, 70, 2], [33, 20, 1, 3], 8, 2, 64),
]
GPU_CASES = [
    ([0, 1000, 7, 300], [1, 100, 513, 37], 32, 8, 128),
    ([0], [2048], 32, 8, 128),
    ([4000, 0, 17], [1, 1, 300], 16, 16, 64),
    ([55, 0], [70, 129], 28, 4, 128),
]


def _run(
    case: tuple,
    dtype: torch.dtype,
    device: torch.device,
    paged_kv: Callable[..., PagedKV],
    chunk: str = "pool",
) -> None:
    """``chunk``: where the new tokens' K/V are read: "pool" (through the slots), "ptr" or "tma"
    (the layer's k/v, by pointers or TMA descriptors; the pool's copies of them are then NaN, so
    reading them there fails)."""
    prefix_lens, q_lens, num_heads, num_kv_heads, head_dim = case
    kv = paged_kv(prefix_lens, q_lens, num_kv_heads, head_dim, dtype, device)
    # q, k, v as views of a fused qkv output (token stride wider than H * D).
    qkv = torch.randn(sum(q_lens), num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=device)
    q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    k.copy_(kv.k_buf[kv.out_slots])
    v.copy_(kv.v_buf[kv.out_slots])
    scale = head_dim**-0.5
    args = (q, kv.k_buf, kv.v_buf, kv.req_to_token, kv.req_rows, kv.seq_lens, kv.q_starts, kv.q_lens)
    ref = prefill_attention_ref(*args, scale)
    out = torch.full_like(q, float("nan"))

    if chunk == "pool":
        prefill_attention(*args, kv.max_q_len, scale, out=out)
    else:
        kv.k_buf[kv.out_slots] = float("nan")
        kv.v_buf[kv.out_slots] = float("nan")
        prefill_attention(*args, kv.max_q_len, scale, out=out, k=k, v=v, tma=chunk == "tma")

    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("chunk", ["pool", "ptr", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_prefill_attention_matches_reference(
    case: tuple, dtype: torch.dtype, chunk: str, device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    _run(case, dtype, device, paged_kv, chunk)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", ["pool", "ptr", "tma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES + GPU_CASES)
def test_prefill_attention_matches_reference_gpu(
    case: tuple, dtype: torch.dtype, chunk: str, device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    if chunk == "tma" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA needs a Hopper-class GPU")
    _run(case, dtype, device, paged_kv, chunk)


@pytest.mark.gpu
@pytest.mark.parametrize("q_len", [1024, 1025, 3000])
def test_prefill_attention_large_tiles_gpu(
    q_len: int, device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    """TMA's 128 x 128 tiles and the pointer path on long chunks, with a prefix and ragged ends."""
    _run(([17, 0], [q_len, 300], 32, 8, 128), torch.bfloat16, device, paged_kv, "tma")
    _run(([0], [q_len], 32, 8, 128), torch.bfloat16, device, paged_kv, "ptr")


@pytest.mark.gpu
def test_tma_is_chosen_where_the_work_pays_its_launch(device: torch.device) -> None:
    """Three host-side descriptors cost 40-130 µs more host time a launch: only big chunks take TMA."""
    if torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA needs a Hopper-class GPU")
    qkv = torch.zeros(4096, 48, 128, dtype=torch.bfloat16, device=device)
    q, k, v = qkv.split([32, 8, 8], dim=1)
    assert use_tma(q, k, v, 4096) and not use_tma(q, k, v, 2048)
    assert not use_tma(q[:512], k[:512], v[:512], 8192)  # 2^34: host-bound
    assert not use_tma(q, k, v[:, :, :80], 4096)  # not a power-of-two head_dim
    assert not use_tma(q.float(), k.float(), v.float(), 4096)  # fp32 tiles were not measured


def test_prefill_attention_chunk_kv_is_ignored_for_an_fp8_pool(
    device: torch.device, paged_kv: Callable[..., PagedKV], fp8_pool
) -> None:
    """An FP8 pool holds rounded keys: reading the layer's bf16 ones would disagree with decode."""
    kv = paged_kv([3, 0], [2, 5], 2, 64, torch.float32, device)
    k_buf, v_buf, k_scale, v_scale = fp8_pool(kv)
    q = torch.randn(7, 2, 64, device=device)
    nan = torch.full((7, 2, 64), float("nan"), device=device)
    args = (q, k_buf, v_buf, kv.req_to_token, kv.req_rows, kv.seq_lens, kv.q_starts, kv.q_lens)
    out = prefill_attention(*args, 5, 0.125, k_scale=k_scale, v_scale=v_scale, k=nan, v=nan)
    ref = prefill_attention_ref(*args, 0.125, k_scale, v_scale)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_prefill_attention_host_bound_may_exceed_q_lens(
    device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    """max_q_len is an upper bound: extra query blocks must write nothing."""
    kv = paged_kv([3, 0], [2, 5], 2, 64, torch.float32, device)
    q = torch.randn(7, 2, 64, device=device)
    args = (q, kv.k_buf, kv.v_buf, kv.req_to_token, kv.req_rows, kv.seq_lens, kv.q_starts, kv.q_lens)
    out = prefill_attention(*args, 40, 0.125)
    torch.testing.assert_close(out, prefill_attention_ref(*args, 0.125), atol=1e-4, rtol=1e-4)


def _run_fp8(case: tuple, dtype: torch.dtype, device: torch.device, paged_kv, fp8_pool) -> None:
    """An FP8 pool (e4m3, per-layer K and V scales) read directly; the reference dequantizes it."""
    prefix_lens, q_lens, num_heads, num_kv_heads, head_dim = case
    kv = paged_kv(prefix_lens, q_lens, num_kv_heads, head_dim, dtype, device)
    k_buf, v_buf, k_scale, v_scale = fp8_pool(kv)
    q = torch.randn(sum(q_lens), num_heads, head_dim, dtype=dtype, device=device)
    scale = head_dim**-0.5
    args = (q, k_buf, v_buf, kv.req_to_token, kv.req_rows, kv.seq_lens, kv.q_starts, kv.q_lens)
    out = prefill_attention(*args, kv.max_q_len, scale, k_scale=k_scale, v_scale=v_scale)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    ref = prefill_attention_ref(*args, scale, k_scale, v_scale)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [CASES[2], CASES[4]])
def test_prefill_attention_reads_fp8_cache(
    case: tuple, dtype: torch.dtype, device, paged_kv, fp8_pool
) -> None:
    _run_fp8(case, dtype, device, paged_kv, fp8_pool)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES + GPU_CASES)
def test_prefill_attention_reads_fp8_cache_gpu(
    case: tuple, dtype: torch.dtype, device, paged_kv, fp8_pool
) -> None:
    _run_fp8(case, dtype, device, paged_kv, fp8_pool)
