from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch

from lightllm_grpc.layers.attention.base import FP8, KVCache, quantize_kv
from lightllm_grpc.layers.attention.torch_backend import TorchAttentionBackend
from lightllm_grpc.layers.attention.triton_backend import TritonAttentionBackend
from lightllm_grpc.layers.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from conftest import PagedKV

LAYER = 1


def _setup(
    prefix_lens: list[int],
    q_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    paged_kv: Callable[..., PagedKV],
    num_prefill: int | None = None,
    groups: list[tuple[int, int]] | None = None,
) -> tuple[KVCache, ForwardBatch]:
    """A two-layer pool whose layer LAYER holds the prefixes; the new tokens' slots hold NaN.

    With ``num_prefill`` the batch is MIXED: its first ``num_prefill`` sequences are prefill
    entries, the rest decode rows (q_len 1). ``groups`` gives the decode rows' (shared_len,
    group_size): each group's rows are pointed at its first row's slots for the shared positions.
    """
    paged = paged_kv(prefix_lens, q_lens, num_kv_heads, head_dim, dtype, device)
    first = 0 if num_prefill is None else num_prefill
    for i, (shared, size) in enumerate(groups or []):
        lead = paged.req_rows[first + i].long()
        for m in range(first + i + 1, first + i + size):
            paged.req_to_token[paged.req_rows[m].long(), :shared] = paged.req_to_token[lead, :shared]
    cache = KVCache(2, paged.k_buf.shape[0], num_kv_heads, head_dim, dtype, device)
    cache.k[LAYER].copy_(paged.k_buf)
    cache.v[LAYER].copy_(paged.v_buf)
    cache.k[LAYER][paged.out_slots] = float("nan")
    cache.v[LAYER][paged.out_slots] = float("nan")
    decode = all(q == 1 for q in q_lens)
    mode = ForwardMode.DECODE if decode else ForwardMode.PREFILL
    batch = ForwardBatch(
        mode=mode if num_prefill is None else ForwardMode.MIXED,
        positions=paged.positions,
        out_slots=paged.out_slots,
        req_rows=paged.req_rows,
        seq_lens=paged.seq_lens,
        q_starts=paged.q_starts,
        q_lens=paged.q_lens,
        req_to_token=paged.req_to_token,
        logits_indices=(paged.q_starts + paged.q_lens - 1).to(torch.int64),
        max_q_len=paged.max_q_len,
        max_seq_len=paged.max_seq_len,
        num_prefill=num_prefill or 0,
        num_prefill_tokens=sum(q_lens[:num_prefill]) if num_prefill else 0,
    )
    if groups is not None:
        shared, sizes = zip(*groups)
        batch.shared_lens = torch.tensor(shared, dtype=torch.int32, device=device)
        batch.group_sizes = torch.tensor(sizes, dtype=torch.int32, device=device)
    return cache, batch


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, cache: KVCache, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract spelled out in torch: store, then causal GQA attention per sequence in fp32."""
    k_pool, v_pool = cache.k[LAYER].clone(), cache.v[LAYER].clone()
    k_pool[batch.out_slots] = k
    v_pool[batch.out_slots] = v
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for b in range(batch.batch_size):
        row, seq_len = int(batch.req_rows[b]), int(batch.seq_lens[b])
        start, q_len = int(batch.q_starts[b]), int(batch.q_lens[b])
        slots = batch.req_to_token[row, :seq_len].long()
        keys = k_pool[slots].float().repeat_interleave(group, dim=1)
        values = v_pool[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start : start + q_len].float(), keys) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        hidden = torch.arange(seq_len, device=q.device)[None, :] > q_pos[:, None]
        probs = scores.masked_fill(hidden, float("-inf")).softmax(-1)
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out, k_pool, v_pool


def _check(
    backend: TritonAttentionBackend,
    prefix_lens: list[int],
    q_lens: list[int],
    num_kv_heads: int,
    dtype: torch.dtype,
    device: torch.device,
    paged_kv: Callable[..., PagedKV],
    num_prefill: int | None = None,
    groups: list[tuple[int, int]] | None = None,
) -> None:
    head_dim, num_heads = backend.head_dim, backend.num_heads
    cache, batch = _setup(
        prefix_lens, q_lens, num_kv_heads, head_dim, dtype, device, paged_kv, num_prefill, groups
    )
    num_tokens, scale = sum(q_lens), head_dim**-0.5
    q = torch.randn(num_tokens, num_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    expected, k_pool, v_pool = _reference(q, k, v, batch, cache, scale)

    out = backend.forward(q, k, v, LAYER, batch, cache, scale)

    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    torch.testing.assert_close(cache.k[LAYER], k_pool, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(cache.v[LAYER], v_pool, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(cache.k[0]).sum() == 0 and cache.k[0].abs().sum() == 0, "other layers untouched"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backend_prefill_with_and_without_prefix(
    dtype: torch.dtype, device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    backend = TritonAttentionBackend(4, 8, 64, device, dtype)
    _check(backend, [0, 13, 0], [9, 4, 1], 2, dtype, device, paged_kv)


@pytest.mark.parametrize("num_prefill", [None, 2])
def test_backend_prefill_reads_the_chunk_from_new_kv(
    num_prefill: int | None, device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    """With ``new_kv``, prefill reads a chunk's own keys from it, not the pool: the pool's copies
    are NaN here (the cached prefix and the decode rows still come from the pool)."""
    dtype, num_kv_heads, head_dim = torch.float32, 2, 64
    backend = TritonAttentionBackend(4, 8, head_dim, device, dtype)
    cache, batch = _setup([0, 13, 6], [9, 4, 1], num_kv_heads, head_dim, dtype, device, paged_kv, num_prefill)
    q = torch.randn(batch.num_tokens, 8, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch.num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    expected, _, _ = _reference(q, k, v, batch, cache, 0.125)
    backend.store(k, v, LAYER, batch.out_slots, cache)
    chunk = batch.out_slots[: batch.num_prefill_tokens or batch.num_tokens]
    cache.k[LAYER][chunk] = float("nan")
    cache.v[LAYER][chunk] = float("nan")

    out = backend.attend(q, LAYER, batch, cache, 0.125, new_kv=(k, v))

    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_splits", [None, 3])
def test_backend_decode_batches_share_workspace(
    num_splits: int | None, device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    backend = TritonAttentionBackend(5, 4, 128, device, torch.float16, num_splits=num_splits)
    _check(backend, [20, 0, 47, 6, 1], [1] * 5, 1, torch.float16, device, paged_kv)
    _check(backend, [70], [1], 4, torch.float16, device, paged_kv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grouped", [False, True])
def test_backend_mixed_prefill_and_decode_rows(
    dtype: torch.dtype, grouped: bool, device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    """One output: prefill entries (a cached prefix, a one-token chunk) then decode rows of
    different lengths, with or without a prefix group (cascade decode) among the decode rows."""
    backend = TritonAttentionBackend(4, 8, 32, device, dtype)
    groups = [(16, 2), (16, 0), (0, 0)] if grouped else None
    _check(backend, [0, 13, 4, 20, 30, 6], [9, 4, 1, 1, 1, 1], 2, dtype, device, paged_kv, 3, groups)


def test_backend_merges_decode_splits_in_one_launch(
    device: torch.device, paged_kv: Callable[..., PagedKV], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``merge_splits``: decode (and a mixed batch's decode rows) merged in the decode kernel (no
    second stage runs), twice in a row (its counters come back to zero), batch sizes sharing them."""
    import importlib

    kernels = importlib.import_module(
        "lightllm_grpc_kernels.decode_attention"
    )  # the module, not the function

    def no_second_stage(*args: object) -> None:
        raise AssertionError("the second stage ran")

    monkeypatch.setattr(kernels, "_stage2", no_second_stage)
    backend = TritonAttentionBackend(5, 4, 64, device, torch.float16, merge_splits=True)
    for _ in range(2):
        _check(backend, [20, 0, 47, 6, 1], [1] * 5, 1, torch.float16, device, paged_kv)
        _check(backend, [70], [1], 2, torch.float16, device, paged_kv)
    _check(backend, [0, 13, 4, 20], [9, 4, 1, 1], 2, torch.float16, device, paged_kv, 2)
    assert backend._counters is not None and not backend._counters.any()


def test_backend_rejects_batch_above_max(device: torch.device, paged_kv: Callable[..., PagedKV]) -> None:
    backend = TritonAttentionBackend(1, 2, 64, device, torch.float32)
    with pytest.raises(AssertionError, match="max_batch_size"):
        _check(backend, [3, 4], [1, 1], 1, torch.float32, device, paged_kv)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_backend_gpu_shapes(
    dtype: torch.dtype, device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    backend = TritonAttentionBackend(64, 32, 128, device, dtype)
    _check(backend, [0, 500, 3000], [700, 33, 1], 8, dtype, device, paged_kv)
    _check(backend, [int(x) for x in torch.randint(0, 4000, (64,))], [1] * 64, 8, dtype, device, paged_kv)


@pytest.mark.gpu
def test_backend_decode_replays_in_cuda_graph(device: torch.device, paged_kv: Callable[..., PagedKV]) -> None:
    """Decode captured once replays correctly after the sequences grow in place."""
    dtype, num_heads, num_kv_heads, head_dim = torch.bfloat16, 32, 8, 128
    backend = TritonAttentionBackend(8, num_heads, head_dim, device, dtype)
    cache, batch = _setup([100, 2000, 5, 900], [1] * 4, num_kv_heads, head_dim, dtype, device, paged_kv)
    q = torch.randn(4, num_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(4, num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    backend.forward(q, k, v, LAYER, batch, cache, 0.1)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, LAYER, batch, cache, 0.1)
    # Shorten every sequence by re-pointing it at fewer keys; the graph reads seq_lens on device.
    batch.seq_lens -= torch.tensor([50, 1000, 0, 1], dtype=torch.int32, device=device)
    new_last = batch.req_to_token[batch.req_rows.long(), batch.seq_lens.long() - 1].long()
    batch.out_slots.copy_(new_last)
    q.normal_()
    k.normal_()
    v.normal_()
    expected, _, _ = _reference(q, k, v, batch, cache, 0.1)
    graph.replay()
    torch.testing.assert_close(out, expected, atol=1.6e-2, rtol=1.6e-2)


def _fp8_copy(cache: KVCache, k_scale: float, v_scale: float) -> KVCache:
    """``cache`` as an FP8 pool with these scales on layer LAYER (1.0 on the other)."""
    fp8 = KVCache(2, cache.num_slots, cache.k[0].shape[1], cache.k[0].shape[2], FP8, cache.k[0].device,
                  k_scales=[1.0, k_scale], v_scales=[1.0, v_scale])  # fmt: skip
    # Slots no sequence owns hold large finite garbage, not NaN: the torch backend reads them
    # (then masks them out), as it may read stale slots of a live pool.
    fp8.k[LAYER].copy_(quantize_kv(cache.k[LAYER].nan_to_num(100.0), fp8.k_scale[LAYER]))
    fp8.v[LAYER].copy_(quantize_kv(cache.v[LAYER].nan_to_num(-100.0), fp8.v_scale[LAYER]))
    return fp8


def _clone(cache: KVCache) -> KVCache:
    """A byte-for-byte copy of an FP8 pool and its scales."""
    k0 = cache.k[0]
    other = KVCache(len(cache.k), cache.num_slots, k0.shape[1], k0.shape[2], cache.dtype, k0.device,
                    k_scales=cache.k_scale.tolist(), v_scales=cache.v_scale.tolist())  # fmt: skip
    for dst, src in zip(other.k + other.v, cache.k + cache.v, strict=True):
        dst.view(torch.uint8).copy_(src.view(torch.uint8))
    return other


@pytest.mark.parametrize(
    ("prefix_lens", "q_lens", "dtype"),
    [
        ([0, 13, 0], [9, 4, 1], torch.float32),  # prefill, with and without a cached prefix
        ([20, 0, 47, 6], [1, 1, 1, 1], torch.float32),  # decode
        ([5, 30], [1, 1], torch.float16),
    ],
)
def test_backend_fp8_cache_matches_torch_backend(
    prefix_lens: list[int], q_lens: list[int], dtype: torch.dtype, device: torch.device, paged_kv
) -> None:
    """The Triton backend on an FP8 pool (store, then prefill or decode attention) against the
    torch backend on the same pool: the same bytes stored, the same attention output."""
    num_kv_heads, num_heads, head_dim = 2, 4, 64
    cache, batch = _setup(prefix_lens, q_lens, num_kv_heads, head_dim, dtype, device, paged_kv)
    cache = _fp8_copy(cache, 0.04, 0.25)
    torch_cache = _clone(cache)
    num_tokens, scale = sum(q_lens), head_dim**-0.5
    q = torch.randn(num_tokens, num_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)

    out = TritonAttentionBackend(4, num_heads, head_dim, device, dtype).forward(
        q, k, v, LAYER, batch, cache, scale
    )
    expected = TorchAttentionBackend().forward(q, k, v, LAYER, batch, torch_cache, scale)

    assert torch.equal(cache.k[LAYER].view(torch.uint8), torch_cache.k[LAYER].view(torch.uint8))
    assert torch.equal(cache.v[LAYER].view(torch.uint8), torch_cache.v[LAYER].view(torch.uint8))
    tol = {torch.float32: 1e-4, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_backend_fp8_decode_replays_in_cuda_graph_reading_its_scales(
    device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    """Decode on an FP8 pool captured once matches the torch backend on the same pool, and the
    graph holds the scale tensors, not their values: after the V scale changes, a replay stores
    and reads with the new one."""
    dtype, num_heads, num_kv_heads, head_dim = torch.bfloat16, 32, 8, 128
    backend = TritonAttentionBackend(8, num_heads, head_dim, device, dtype)
    cache, batch = _setup([100, 2000, 5, 900], [1] * 4, num_kv_heads, head_dim, dtype, device, paged_kv)
    cache = _fp8_copy(cache, 0.02, 0.01)
    q = torch.randn(4, num_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(4, num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    backend.forward(q, k, v, LAYER, batch, cache, 0.1)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, LAYER, batch, cache, 0.1)
    results = []
    for v_scale in (0.01, 0.03):
        cache.v_scale[LAYER] = v_scale
        expected = TorchAttentionBackend().forward(q, k, v, LAYER, batch, _clone(cache), 0.1)
        graph.replay()
        torch.testing.assert_close(out, expected, atol=1.6e-2, rtol=1.6e-2)
        results.append(out.clone())
    assert not torch.allclose(results[0], results[1], atol=0.1, rtol=0.1)  # the scale mattered


@pytest.mark.parametrize(
    ("pool", "dtype"),
    [
        ("same", torch.float32),
        ("fp8", torch.float16),
        pytest.param("fp8", torch.bfloat16, marks=pytest.mark.gpu),
    ],
)
def test_backend_rotates_in_its_store_as_rotary_then_store(
    pool: str, dtype: torch.dtype, device: torch.device, paged_kv: Callable[..., PagedKV]
) -> None:
    """``rotate_and_store`` (the fused rotary + store kernel), then ``attend``, on a MIXED batch
    equals the rotary op, ``store`` and ``attend``: the same pool bytes, the same q and output;
    and the torch backend's (the base class's two-op default) does the same."""
    from lightllm_grpc.layers.ops import Ops
    from lightllm_grpc.layers.rotary import RotaryEmbedding

    num_kv_heads, num_heads, head_dim = 2, 6, 32
    cache, batch = _setup(
        [0, 13, 4, 20, 30], [9, 4, 1, 1, 1], num_kv_heads, head_dim, dtype, device, paged_kv, 2
    )
    if pool == "fp8":
        cache = _fp8_copy(cache, 0.04, 0.25)
    else:  # finite garbage in the slots no sequence owns: the torch backend reads them, then masks
        cache.k[LAYER].nan_to_num_(100.0)
        cache.v[LAYER].nan_to_num_(-100.0)
    with torch.device(device):
        rope = RotaryEmbedding(head_dim, 128, 10000.0, None, Ops.triton())
    q = torch.randn(batch.num_tokens, num_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch.num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    backend = TritonAttentionBackend(4, num_heads, head_dim, device, dtype)
    two_cache, torch_cache = _clone(cache), _clone(cache)

    expected = backend.forward(*rope(batch.positions, q.clone(), k.clone()), v, LAYER, batch, two_cache, 0.2)
    pos, slots = batch.positions, batch.out_slots
    rotated, rotated_k = backend.rotate_and_store(q.clone(), k.clone(), v, LAYER, pos, slots, cache, rope)
    out = backend.attend(rotated, LAYER, batch, cache, 0.2, new_kv=(rotated_k, v))
    pool_only = backend.attend(rotated, LAYER, batch, cache, 0.2)
    torch_backend = TorchAttentionBackend()
    torch_q, torch_k = torch_backend.rotate_and_store(
        q.clone(), k.clone(), v, LAYER, pos, slots, torch_cache, rope
    )
    torch_out = torch_backend.attend(torch_q, LAYER, batch, torch_cache, 0.2, new_kv=(torch_k, v))

    ref_q, ref_k = rope(pos, q.clone(), k.clone())
    assert torch.equal(rotated, ref_q) and torch.equal(torch_q, rotated)
    assert torch.equal(rotated_k, ref_k) and torch.equal(torch_k, rotated_k)
    assert torch.equal(out, expected)
    for a, b in ((cache, two_cache), (cache, torch_cache)):
        assert torch.equal(a.k[LAYER].view(torch.uint8), b.k[LAYER].view(torch.uint8))
        assert torch.equal(a.v[LAYER].view(torch.uint8), b.v[LAYER].view(torch.uint8))
    # The torch backend computes in fp32: within a 16-bit output's rounding of the kernels'.
    tol = 1.6e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(torch_out, expected, atol=tol, rtol=tol)
    # Reading the chunk's keys from the pool instead: another tiling, the same attention.
    torch.testing.assert_close(pool_only, out, atol=tol if dtype != torch.float32 else 1e-5, rtol=1e-3)
