"""Times each kernel against its torch counterpart on 8B-Llama shapes (needs CUDA).

    python -m lightllm_grpc_kernels.bench [--only decode_attention,rmsnorm] [--graph]

Each row prints the median time of the kernel and of torch, and the bandwidth each reaches
over the bytes the operation must move at least (attention also prints TFLOP/s). Small
shapes are dominated by launch latency; --graph times through CUDA graphs to remove it.
Fusions (``rotary_store_kv``) print the fused kernel against the kernels it replaces
("fused" vs "split"), and ``decode_stages`` flash-decoding in one launch against its two
stages; with --graph the difference is what the launches cost in a graph.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.testing

from lightllm_grpc_kernels.activation import silu_and_mul, silu_and_mul_ref
from lightllm_grpc_kernels.decode_attention import decode_attention, decode_num_splits
from lightllm_grpc_kernels.prefill_attention import prefill_attention
from lightllm_grpc_kernels.rmsnorm import fused_add_rmsnorm, fused_add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from lightllm_grpc_kernels.rotary import apply_rotary, apply_rotary_ref
from lightllm_grpc_kernels.store_kv import rotary_store_kv, store_kv, store_kv_ref

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTER = 32, 8, 128, 4096, 14336  # Llama-3 8B
DTYPE = torch.bfloat16
DEVICE = "cuda"


@dataclass
class Result:
    name: str
    shape: str
    bytes_moved: int
    kernel_ms: float
    torch_ms: float
    flops: int = 0
    labels: tuple[str, str] = ("triton", "torch")

    def _gbs(self, ms: float) -> float:
        return self.bytes_moved / ms / 1e6

    def _tflops(self, ms: float) -> float:
        return self.flops / ms / 1e9

    def row(self) -> str:
        text = (
            f"{self.name:<28} {self.shape:<28} {self.bytes_moved / 1e6:>9.2f} MB  "
            f"{self.labels[0]} {self.kernel_ms * 1e3:>9.1f} us {self._gbs(self.kernel_ms):>7.0f} GB/s  "
            f"{self.labels[1]} {self.torch_ms * 1e3:>9.1f} us {self._gbs(self.torch_ms):>7.0f} GB/s  "
            f"x{self.torch_ms / self.kernel_ms:.2f}"
        )
        if self.flops:
            text += f"  {self._tflops(self.kernel_ms):.0f} vs {self._tflops(self.torch_ms):.0f} TFLOP/s"
        return text


def _time(fn: Callable[[], object], graph: bool) -> float:
    if graph:
        return triton.testing.do_bench_cudagraph(fn, return_mode="median")
    return triton.testing.do_bench(fn, return_mode="median")


def _compare(
    name: str, shape: str, nbytes: int, kernel: Callable, ref: Callable, graph: bool, flops: int = 0
) -> Result:
    return Result(name, shape, nbytes, _time(kernel, graph), _time(ref, graph), flops)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE, device=DEVICE)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_store_kv(graph: bool) -> list[Result]:
    results = []
    for tokens in (1, 128, 8192):
        k, v = _randn(tokens, KV_HEADS, HEAD_DIM), _randn(tokens, KV_HEADS, HEAD_DIM)
        k_buf, v_buf = _randn(200_000, KV_HEADS, HEAD_DIM), _randn(200_000, KV_HEADS, HEAD_DIM)
        slots = torch.randperm(200_000, device=DEVICE)[:tokens]
        args = (k_buf, v_buf, k, v, slots)
        nbytes = 2 * _nbytes(k, v) + _nbytes(slots)
        results.append(
            _compare(
                "store_kv",
                f"T={tokens}",
                nbytes,
                lambda a=args: store_kv(*a),
                lambda a=args: store_kv_ref(*a),
                graph,
            )
        )
    return results


def bench_rmsnorm(graph: bool) -> list[Result]:
    results = []
    weight = _randn(HIDDEN)
    for tokens in (1, 128, 8192):
        x, res = _randn(tokens, HIDDEN), _randn(tokens, HIDDEN)
        results.append(
            _compare(
                "rmsnorm",
                f"T={tokens} N={HIDDEN}",
                2 * _nbytes(x),
                lambda x=x: rmsnorm(x, weight, 1e-5),
                lambda x=x: rmsnorm_ref(x, weight, 1e-5),
                graph,
            )
        )
        results.append(
            _compare(
                "fused_add_rmsnorm",
                f"T={tokens} N={HIDDEN}",
                4 * _nbytes(x),
                lambda x=x, r=res: fused_add_rmsnorm(x, r, weight, 1e-5),
                lambda x=x, r=res: fused_add_rmsnorm_ref(x, r, weight, 1e-5),
                graph,
            )
        )
    return results


def bench_rotary(graph: bool) -> list[Result]:
    results = []
    cos = torch.randn(131072, HEAD_DIM // 2, device=DEVICE)
    sin = torch.randn_like(cos)
    for tokens in (1, 128, 8192):
        q, k = _randn(tokens, HEADS, HEAD_DIM), _randn(tokens, KV_HEADS, HEAD_DIM)
        pos = torch.randint(0, 131072, (tokens,), device=DEVICE)
        nbytes = 2 * _nbytes(q, k) + 2 * tokens * HEAD_DIM * cos.element_size()
        results.append(
            _compare(
                "rotary",
                f"T={tokens}",
                nbytes,
                lambda a=(pos, q, k, cos, sin): apply_rotary(*a),
                lambda a=(pos, q, k, cos, sin): apply_rotary_ref(*a),
                graph,
            )
        )
    return results


def bench_rotary_store_kv(graph: bool) -> list[Result]:
    """The fused rotary + KV store against the rotary kernel then the store kernel (bf16 and FP8 pools)."""
    cos = torch.randn(131072, HEAD_DIM // 2, device=DEVICE)
    sin = torch.randn_like(cos)
    return [
        _rotary_store_kv(pool, tokens, cos, sin, graph)
        for pool in ("bf16", "fp8")
        for tokens in (1, 128, 8192)
    ]


def _rotary_store_kv(pool: str, tokens: int, cos: torch.Tensor, sin: torch.Tensor, graph: bool) -> Result:
    qkv = _randn(tokens, HEADS + 2 * KV_HEADS, HEAD_DIM)
    q, k, v = qkv.split([HEADS, KV_HEADS, KV_HEADS], dim=1)
    pos = torch.randint(0, cos.shape[0], (tokens,), device=DEVICE)
    slots = torch.randperm(200_000, device=DEVICE)[:tokens]
    k_buf = _randn(200_000, KV_HEADS, HEAD_DIM)
    k_buf = k_buf.to(torch.float8_e4m3fn) if pool == "fp8" else k_buf
    v_buf = k_buf.clone()
    one = torch.ones((), device=DEVICE)
    scales = (one, one) if pool == "fp8" else (None, None)
    kv_bytes = 2 * tokens * KV_HEADS * HEAD_DIM * k_buf.element_size()
    nbytes = 2 * _nbytes(q) + 2 * _nbytes(k) + kv_bytes + 2 * tokens * HEAD_DIM * cos.element_size()

    def fused() -> None:
        rotary_store_kv(k_buf, v_buf, q, k, v, slots, pos, cos, sin, *scales)

    def split() -> None:
        apply_rotary(pos, q, k, cos, sin)
        store_kv(k_buf, v_buf, k, v, slots, *scales)

    result = _compare("rotary_store_kv " + pool, f"T={tokens}", nbytes, fused, split, graph)
    return dataclasses.replace(result, labels=("fused", "split"))


def bench_silu_and_mul(graph: bool) -> list[Result]:
    results = []
    for tokens in (1, 128, 2048):
        x = _randn(tokens, 2 * INTER)
        results.append(
            _compare(
                "silu_and_mul",
                f"T={tokens} I={INTER}",
                _nbytes(x) * 3 // 2,
                lambda x=x: silu_and_mul(x),
                lambda x=x: silu_and_mul_ref(x),
                graph,
            )
        )
    return results


def _paged(
    seq_lens: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pool holding the sequences at shuffled slots, and their req_to_token rows."""
    total, max_len = sum(seq_lens), max(seq_lens)
    k_buf, v_buf = _randn(total, KV_HEADS, HEAD_DIM), _randn(total, KV_HEADS, HEAD_DIM)
    perm = torch.randperm(total, device=DEVICE).to(torch.int32)
    table = torch.zeros(len(seq_lens), max_len, dtype=torch.int32, device=DEVICE)
    start = 0
    for b, n in enumerate(seq_lens):
        table[b, :n] = perm[start : start + n]
        start += n
    rows = torch.arange(len(seq_lens), dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return k_buf, v_buf, table, rows, lens


def _decode_torch(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Torch decode as a framework would write it: gather the padded K/V, then masked SDPA."""
    slots = table[rows.long()].long()
    k = k_buf[slots].transpose(1, 2)
    v = v_buf[slots].transpose(1, 2)
    mask = torch.arange(slots.shape[1], device=q.device)[None, :] < lens[:, None]
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )
    return out[:, :, 0]


def bench_decode_attention(graph: bool) -> list[Result]:
    results = []
    for batch in (1, 32, 128):
        for seq in (512, 4096):
            k_buf, v_buf, table, rows, lens = _paged([seq] * batch)
            q = _randn(batch, HEADS, HEAD_DIM)
            args = (q, k_buf, v_buf, table, rows, lens, HEAD_DIM**-0.5)
            nbytes = _nbytes(k_buf, v_buf, table) + 2 * _nbytes(q)
            flops = 4 * batch * seq * HEADS * HEAD_DIM
            results.append(
                _compare(
                    "decode_attention",
                    f"B={batch} seq={seq}",
                    nbytes,
                    lambda a=args: decode_attention(*a),
                    lambda a=args: _decode_torch(*a),
                    graph,
                    flops,
                )
            )
    return results


def bench_decode_stages(graph: bool) -> list[Result]:
    """Flash-decoding at small batches and short contexts, where it is launch-bound: the default
    split count merged in the one launch (``counters``) against the two-stage kernels, and a
    single split (one launch, no merge, one program per kv head) against the two stages."""
    return [
        r for batch in (1, 8) for seq in (128, 512, 2048, 8192) for r in _decode_stages(batch, seq, graph)
    ]


def _decode_stages(batch: int, seq: int, graph: bool) -> list[Result]:
    k_buf, v_buf, table, rows, lens = _paged([seq] * batch)
    q = _randn(batch, HEADS, HEAD_DIM)
    args = (q, k_buf, v_buf, table, rows, lens, HEAD_DIM**-0.5)
    splits = decode_num_splits(batch)
    mid_o = torch.empty(batch, HEADS, splits, HEAD_DIM, device=DEVICE)
    mid_lse = torch.empty(batch, HEADS, splits, device=DEVICE)
    counters = torch.zeros(batch * KV_HEADS, dtype=torch.int32, device=DEVICE)
    nbytes = _nbytes(k_buf, v_buf, table) + 2 * _nbytes(q)
    shape = f"B={batch} seq={seq} splits={splits}"

    def two_stages() -> None:
        decode_attention(*args, num_splits=splits, mid_o=mid_o, mid_lse=mid_lse)

    def merged() -> None:
        decode_attention(*args, num_splits=splits, mid_o=mid_o, mid_lse=mid_lse, counters=counters)

    def single_split() -> None:
        decode_attention(*args, num_splits=1)

    return [
        dataclasses.replace(
            _compare(name, shape, nbytes, fn, two_stages, graph), labels=("1-launch", "2-stage")
        )
        for name, fn in (("decode merged in 1 launch", merged), ("decode 1 split", single_split))
    ]


def _prefill_torch(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    table: torch.Tensor,
    lens: torch.Tensor,
    q_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """Torch prefill per sequence: gather K/V, SDPA with a causal mask offset by the prefix."""
    out, start = torch.empty_like(q), 0
    for b, (seq_len, q_len) in enumerate(zip(lens.tolist(), q_lens, strict=True)):
        slots = table[b, :seq_len].long()
        k, v = k_buf[slots].transpose(0, 1), v_buf[slots].transpose(0, 1)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        rows = slice(start, start + q_len)
        out[rows] = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=True
        ).transpose(0, 1)
        start += q_len
    return out


def bench_prefill_attention(graph: bool) -> list[Result]:
    """Every key from the pool ("pool"), and the chunk's own K/V from the layer's output as the
    server runs it ("chunk k/v": TMA descriptors on Hopper), each against torch's SDPA loop."""
    del graph  # prefill is compute-bound and launched eagerly in the server
    results = []
    for prefix, q_len, batch in ((0, 2048, 1), (1024, 512, 4), (0, 256, 16), (0, 8192, 1), (8192, 8192, 1)):
        seq_lens = [prefix + q_len] * batch
        k_buf, v_buf, table, rows, lens = _paged(seq_lens)
        q = _randn(batch * q_len, HEADS, HEAD_DIM)
        new_slots = table[:, prefix:].reshape(-1).long()
        k, v = k_buf[new_slots], v_buf[new_slots]  # the chunk's K/V as the layer stored them
        q_lens = torch.full((batch,), q_len, dtype=torch.int32, device=DEVICE)
        q_starts = torch.arange(0, batch * q_len, q_len, dtype=torch.int32, device=DEVICE)
        scale = HEAD_DIM**-0.5
        args = (q, k_buf, v_buf, table, rows, lens, q_starts, q_lens, q_len, scale)
        ref_args = (q, k_buf, v_buf, table, lens, [q_len] * batch, scale)
        nbytes = _nbytes(k_buf, v_buf) + 2 * _nbytes(q)
        flops = 4 * batch * q_len * (prefix + (q_len + 1) / 2) * HEADS * HEAD_DIM
        for name, kernel in (
            ("prefill_attention pool", lambda a=args: prefill_attention(*a)),
            ("prefill_attention chunk k/v", lambda a=args, k=k, v=v: prefill_attention(*a, k=k, v=v)),
        ):
            results.append(
                _compare(
                    name,
                    f"B={batch} prefix={prefix} q={q_len}",
                    nbytes,
                    kernel,
                    lambda a=ref_args: _prefill_torch(*a),
                    False,  # the torch loop syncs on lens.tolist(), so never through a graph
                    int(flops),
                )
            )
    return results


VOCAB = 128256  # Llama-3
SAMPLING_CASES = {  # name -> RowSampling fields
    "greedy": dict(temperature=0.0),
    "T0.8 k50 p0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
    "T0.8 k50 p0.9 pres0.5": dict(temperature=0.8, top_k=50, top_p=0.9, presence_penalty=0.5),
    "T1 p0.95 rep1.1": dict(temperature=1.0, top_p=0.95, repetition_penalty=1.1),
}


def bench_sampling(graph: bool) -> list[Result]:
    """The shard's Sampler, kernel path vs torch path, on flat logits such as random weights give
    (top-k binds, as in the sampled W2 benchmark). Each call also restores the logits that the
    sampler penalises in place (2 x B x V x 4 bytes), in both columns alike."""
    del graph  # the sampler gathers host-side row state each step: timed eagerly
    import numpy as np

    # The server's sampler itself (the one place this package looks up at the server's code).
    from lightllm_grpc.proto import shard_pb2
    from lightllm_grpc.shard.sampler import Sampler

    results = []
    for rows in (1, 64, 512):
        logits = (torch.randn(rows, VOCAB, device=DEVICE) * 2).to(DTYPE).float()
        work = torch.empty_like(logits)
        batch = np.arange(rows)
        for name, fields in SAMPLING_CASES.items():
            timed = []
            for kernels in (True, False):
                sampler = Sampler(rows, VOCAB, torch.device(DEVICE), kernels=kernels)
                prompt = range(0, VOCAB, 31)  # ~4k distinct prompt tokens for the repetition penalty
                base = dict(top_k=-1, top_p=1.0, repetition_penalty=1.0, penalty_prompt_ids=prompt)
                for row in range(rows):
                    sampler.admit(shard_pb2.RowSampling(row=row, seed=row, **{**base, **fields}))
                timed.append(lambda s=sampler, w=work, x=logits, b=batch: s.sample(w.copy_(x), b))
            results.append(
                _compare("sample " + name, f"B={rows} V={VOCAB}", _nbytes(logits), timed[0], timed[1], False)
            )
    return results


BENCHES: dict[str, Callable[[bool], list[Result]]] = {
    "store_kv": bench_store_kv,
    "rmsnorm": bench_rmsnorm,
    "rotary": bench_rotary,
    "rotary_store_kv": bench_rotary_store_kv,
    "silu_and_mul": bench_silu_and_mul,
    "decode_attention": bench_decode_attention,
    "decode_stages": bench_decode_stages,
    "prefill_attention": bench_prefill_attention,
    "sampling": bench_sampling,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHES))
    parser.add_argument("--graph", action="store_true", help="time through CUDA graphs (no launch overhead)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the benchmark needs a CUDA device")
    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    unknown = set(names) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    print(f"{torch.cuda.get_device_name()}  dtype={DTYPE}  graph={args.graph}")
    for name in names:
        for result in BENCHES[name](args.graph):
            print(result.row(), flush=True)


if __name__ == "__main__":
    main()
