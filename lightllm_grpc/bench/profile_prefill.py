"""Eager vs CUDA-graph prefill of one prompt (8B Llama-3 shape, dummy weights, bf16).

``python -m lightllm_grpc.bench.profile_prefill --tokens 128``: builds a shard as ``serve``
does (prefill graphs captured at warm-up), then times a one-prompt prefill step (forward,
sampling of the first token and its copy to the host: the shard's share of time to first
token) with the eager forward and with the captured graphs, for each length in ``--tokens``,
optionally after a cached prefix (``--prefix``). Also prints the replay of the bucket's graph
alone (GPU time): what is left once launches cost nothing. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lightllm_grpc.bench.gpu import prepare_model_dir
from lightllm_grpc.config import ShardConfig
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.shard.cuda_graph import replay_ms
from lightllm_grpc.shard.prefill_graph import CudaGraphPrefill
from lightllm_grpc.shard.runner import ModelRunner
from lightllm_grpc.shard.warmup import warmup
from lightllm_grpc.shard.worker import build_shard, prefill_step


def _step(runner: ModelRunner, tokens: int, prefix: int) -> shard_pb2.StepRequest:
    """Row 0 prefills ``tokens`` new tokens after ``prefix`` cached ones (slots 0..prefix-1)."""
    step = prefill_step(0, tokens, runner.kv_capacity)
    p = step.prefill
    p.starts[0] = prefix
    p.slots[:] = [prefix + i for i in range(tokens)]
    p.prefix_lens[0] = prefix
    p.prefix_slots.extend(range(prefix))
    return step


def _time_steps(runner: ModelRunner, step: shard_pb2.StepRequest, iters: int) -> float:
    """Median ms of ``runner.step`` (launch to tokens on the host)."""
    times = []
    for _ in range(iters + 3):
        runner.reset()
        torch.cuda.synchronize()
        start = time.perf_counter()
        runner.step(step)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[3:])


def _time_replay(graphs: CudaGraphPrefill, size: int, iters: int) -> float:
    return replay_ms(graphs.graphs[size], iters, warmup=1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="128", help="comma-separated prompt lengths (new tokens)")
    p.add_argument("--prefix", type=int, default=0, help="cached prefix tokens before the prompt")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--max-graph-tokens", type=int, default=ShardConfig.cuda_graph_max_prefill_tokens)
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.tokens.split(",")]
    model_dir = prepare_model_dir(Path(tempfile.mkdtemp()))
    max_prefill = max(max(lengths), args.max_graph_tokens)
    cfg = ShardConfig(
        model=model_dir, device="cuda", dtype="bfloat16", load_format="dummy",
        max_total_tokens=args.prefix + max_prefill + 64, max_rows=8, max_prefill_tokens=max_prefill,
        cuda_graph_max_prefill_tokens=args.max_graph_tokens,
    )  # fmt: skip
    shard = build_shard(cfg, 0, 1, None)
    warmup(shard, max_prefill, 8)
    runner = shard.runner
    graphs = runner.prefill_forward
    assert isinstance(graphs, CudaGraphPrefill), "no prefill graphs were captured"
    if args.prefix:  # fill the prefix's K/V once (dummy tokens at slots 0..prefix-1)
        runner.step(_step(runner, args.prefix, 0))
    print(f"{torch.cuda.get_device_name()}, 8B Llama-3 shape, bf16; buckets {graphs.sizes}")
    print(" tokens prefix bucket  eager ms  graph ms speed-up replay ms")
    for n in lengths:
        step = _step(runner, n, args.prefix)
        runner.prefill_forward = runner.forward
        eager = _time_steps(runner, step, args.iters)
        runner.prefill_forward = graphs
        before = graphs.replays
        graph = _time_steps(runner, step, args.iters)
        if graphs.replays == before:
            print(f"{n:7d} {args.prefix:6d} {'-':>6} {eager:9.2f} {'eager':>9}")
            continue
        size = min(s for s in graphs.sizes if s >= n)
        replay = _time_replay(graphs, size, args.iters)
        gain = eager / graph
        print(f"{n:7d} {args.prefix:6d} {size:6d} {eager:9.2f} {graph:9.2f} {gain:7.2f}x {replay:9.2f}")


if __name__ == "__main__":
    main()
