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

FP8 = torch.float8_e4m3fn

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


def _run(
    case: tuple,
    dtype: torch.dtype,
    device: torch.device,
    paged_kv: Callable[..., PagedKV],
    merge: bool = False,
) -> None:
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

    # With ``merge``: the splits merged in the one launch, twice (each call leaves the counters zero).
    counters = (
        torch.zeros(len(seq_lens) * num_kv_heads + 3, dtype=torch.int32, device=device) if merge else None
    )

    for _ in range(2 if merge else 1):
        decode_attention(
            *args, scale, num_splits=splits, mid_o=mid_o, mid_lse=mid_lse, out=out, counters=counters
        )

        tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(out, decode_attention_ref(*args, scale), atol=tol, rtol=tol)
        assert counters is None or not counters.any()
        out.fill_(float("nan"))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [c for c in CASES if c[4] != 1])
def test_decode_attention_merges_its_splits_in_one_launch(
    case: tuple, dtype: torch.dtype, device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    """With ``counters`` the last program of each (sequence, kv head) merges the splits: no
    second kernel, the same result, and the counters back at zero for the next call."""
    _run(case, dtype, device, paged_kv, merge=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("case", [c for c in CASES + GPU_CASES if c[4] != 1])
def test_decode_attention_merges_its_splits_in_one_launch_gpu(
    case: tuple, dtype: torch.dtype, device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    _run(case, dtype, device, paged_kv, merge=True)


@pytest.mark.gpu
def test_decode_attention_merged_replays_in_cuda_graph(
    device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    """Batch 1 at 32 splits, merged in one launch, captured once and replayed 200 times: every
    replay right (the programs that merge race only through the counters), counters at zero."""
    seq_lens, num_heads, num_kv_heads, head_dim = [3000], 32, 8, 128
    kv = paged_kv([s - 1 for s in seq_lens], [1], num_kv_heads, head_dim, torch.bfloat16, device)
    q = torch.randn(1, num_heads, head_dim, dtype=torch.bfloat16, device=device)
    args = (q, kv.k_buf, kv.v_buf, kv.req_to_token, kv.req_rows, kv.seq_lens, head_dim**-0.5)
    counters = torch.zeros(num_kv_heads, dtype=torch.int32, device=device)
    mid_o = torch.empty(1, num_heads, MAX_SPLITS, head_dim, device=device)
    mid_lse = torch.empty(1, num_heads, MAX_SPLITS, device=device)
    call = {"num_splits": MAX_SPLITS, "mid_o": mid_o, "mid_lse": mid_lse, "counters": counters}
    decode_attention(*args, **call)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(*args, **call)
    expected = decode_attention_ref(*args)
    for _ in range(200):
        out.fill_(float("nan"))
        graph.replay()
        torch.testing.assert_close(out, expected, atol=1.6e-2, rtol=1.6e-2)
    assert not counters.any()


@pytest.mark.parametrize(("num_splits", "merge"), [(None, False), (1, False), (None, True)])
def test_decode_attention_empty_sequence_gives_zeros(
    num_splits: int | None, merge: bool, device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    """A padded batch entry (seq_len 0) must come out finite, not NaN, and leave the others alone."""
    kv = paged_kv([4, 0], [1, 1], 2, 64, torch.float32, device)
    kv.seq_lens[1] = 0
    q = torch.randn(2, 2, 64, device=device)
    out = torch.full_like(q, float("nan"))
    counters = torch.zeros(4, dtype=torch.int32, device=device) if merge else None
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
        counters=counters,
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


def _cascade_case(
    groups: list[tuple[int, int]],
    own: list[int],
    num_heads: int,
    num_kv_heads: int,
    device,
    dtype,
    splits,
    fp8: bool = False,
) -> None:
    """Rows in groups (size, shared prefix length) and alone (prefix 0), each with `own` keys
    after it; ``fp8``: the pool in e4m3 with K and V scales."""
    from lightllm_grpc_kernels.decode_attention import cascade_decode_attention

    head_dim = 64
    sizes = [s for s, _ in groups for _ in range(s)] + [1] * (len(own) - sum(s for s, _ in groups))
    batch = len(own)
    prefix, starts, pos = [], [], 0
    for size, length in groups:
        prefix += [length] * size
        starts += [1] + [0] * (size - 1)
    prefix += [0] * (batch - len(prefix))
    starts += [0] * (batch - len(starts))
    seq = [p + o for p, o in zip(prefix, own)]
    total = sum(length for _, length in groups) + sum(own) + 8
    perm = torch.randperm(total, device=device)
    r2t = torch.zeros(batch + 2, max(seq) + 3, dtype=torch.int32, device=device)
    b = 0
    for size, length in groups:
        shared = perm[pos : pos + length]
        pos += length
        for _ in range(size):
            r2t[b + 1, :length] = shared
            b += 1
    for b in range(batch):
        r2t[b + 1, prefix[b] : seq[b]] = perm[pos : pos + own[b]]
        pos += own[b]
    k = torch.randn(total, num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    scales: dict[str, torch.Tensor] = {}
    if fp8:
        scales = {"k_scale": torch.tensor(0.04, device=device), "v_scale": torch.tensor(0.5, device=device)}
        k, v = (k.float() / scales["k_scale"]).to(FP8), (v.float() / scales["v_scale"]).to(FP8)
    q = torch.randn(batch, num_heads, head_dim, dtype=dtype, device=device)
    rows = torch.arange(1, batch + 1, dtype=torch.int32, device=device)
    seq_t = torch.tensor(seq, dtype=torch.int32, device=device)
    group_sizes = torch.tensor(
        [s if first else 0 for s, first in zip(sizes, starts)], dtype=torch.int32, device=device
    )
    out = cascade_decode_attention(
        q, k, v, r2t, rows, seq_t, torch.tensor(prefix, dtype=torch.int32, device=device), group_sizes,
        head_dim**-0.5, num_splits=splits, **scales,
    )  # fmt: skip
    ref = decode_attention_ref(q, k, v, r2t, rows, seq_t, head_dim**-0.5, **scales)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("groups", "own", "heads", "kv_heads", "splits"),
    [
        ([(3, 40)], [1, 5, 17, 9], 8, 2, 1),  # a group of 3 and one row alone
        ([(2, 33), (4, 7)], [3, 1, 2, 20, 4, 1, 50], 4, 4, 2),  # two groups, MHA, split suffixes
        ([(16, 24), (16, 24)], [2] * 32, 8, 8, 1),  # two full groups of MAX_GROUP_ROWS rows, MHA
        ([(16, 70)], [3] * 17, 8, 1, 2),  # 16 rows x 8 query heads per kv head: a 128-row tile
        ([(2, 0), (2, 0)], [1, 4, 2, 3, 1], 4, 2, 4),  # groups sharing no key (warm-up's mixed steps)
    ],
)
def test_cascade_decode_attention_matches_reference(
    groups, own, heads, kv_heads, splits, dtype, device
) -> None:
    _cascade_case(groups, own, heads, kv_heads, device, dtype, splits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("groups", "own", "heads", "kv_heads", "splits"),
    [
        ([(16, 1024), (4, 1024)], [64 + i for i in range(20)] + [300] * 5, 32, 8, 1),
        ([(2, 100), (8, 513)], [1, 2] + [130] * 8 + [7, 4096], 32, 8, 4),
        ([(3, 2000)], [5, 6, 7], 28, 4, None),
    ],
)
def test_cascade_decode_attention_matches_reference_gpu(
    groups, own, heads, kv_heads, splits, dtype, device
) -> None:
    _cascade_case(groups, own, heads, kv_heads, device, dtype, splits)


# An FP8 pool (e4m3 with per-layer K and V scales) read directly; the reference dequantizes it.
FP8_CASES = [([1], 4, 4, 64, None), ([64, 1, 100], 8, 2, 64, 3), ([5, 17, 1, 40, 9], 4, 1, 128, 1)]


def _run_fp8(case: tuple, dtype: torch.dtype, device: torch.device, paged_kv, fp8_pool) -> None:
    seq_lens, num_heads, num_kv_heads, head_dim, num_splits = case
    kv = paged_kv([s - 1 for s in seq_lens], [1] * len(seq_lens), num_kv_heads, head_dim, dtype, device)
    k_buf, v_buf, k_scale, v_scale = fp8_pool(kv)
    q = torch.randn(len(seq_lens), num_heads, head_dim, dtype=dtype, device=device)
    scale = head_dim**-0.5
    args = (q, k_buf, v_buf, kv.req_to_token, kv.req_rows, kv.seq_lens, scale)
    out = decode_attention(*args, num_splits=num_splits, k_scale=k_scale, v_scale=v_scale)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out, decode_attention_ref(*args, k_scale, v_scale), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", FP8_CASES)
def test_decode_attention_reads_fp8_cache(
    case: tuple, dtype: torch.dtype, device, paged_kv, fp8_pool
) -> None:
    _run_fp8(case, dtype, device, paged_kv, fp8_pool)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", FP8_CASES + GPU_CASES)
def test_decode_attention_reads_fp8_cache_gpu(
    case: tuple, dtype: torch.dtype, device, paged_kv, fp8_pool
) -> None:
    _run_fp8(case, dtype, device, paged_kv, fp8_pool)


def test_decode_attention_rejects_fp8_cache_without_scales(device, paged_kv, fp8_pool) -> None:
    kv = paged_kv([3], [1], 1, 64, torch.float32, device)
    k_buf, v_buf, k_scale, _ = fp8_pool(kv)
    q = torch.randn(1, 1, 64, device=device)
    with pytest.raises(AssertionError, match="needs v_scale"):
        decode_attention(q, k_buf, v_buf, kv.req_to_token, kv.req_rows, kv.seq_lens, 0.1, k_scale=k_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cascade_decode_attention_reads_fp8_cache(dtype, device) -> None:
    """The shared-prefix pass and the per-row pass both apply the scales."""
    _cascade_case([(3, 40), (2, 9)], [1, 5, 17, 2, 3, 9], 8, 2, device, dtype, 2, fp8=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_cascade_decode_attention_reads_fp8_cache_gpu(dtype, device) -> None:
    own = [64 + i for i in range(20)] + [300] * 5
    _cascade_case([(16, 1024), (4, 1024)], own, 32, 8, device, dtype, 1, fp8=True)
