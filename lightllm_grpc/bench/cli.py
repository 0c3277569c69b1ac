"""``lightllm-grpc bench``: load against a running server (``bench load``)."""

from __future__ import annotations

import argparse
import json

from lightllm_grpc.aio import run
from lightllm_grpc.bench.load import Workload, run_load


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    load = bsub.add_parser("load", help="send a fixed workload to a running server and report speed")
    load.add_argument("--address", default="127.0.0.1:50051")
    load.add_argument("--num-requests", type=int, default=64)
    load.add_argument("--input-len", type=int, default=128)
    load.add_argument("--output-len", type=int, default=128)
    load.add_argument("--concurrency", type=int, default=None, help="default: all at once")
    load.add_argument("--vocab-size", type=int, default=None, help="default: asked from the server")
    load.add_argument("--json", action="store_true", help="print the result as JSON")


async def _vocab(address: str) -> int:
    import grpc

    from lightllm_grpc.proto import generation_pb2 as pb
    from lightllm_grpc.proto import generation_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        info = await generation_pb2_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest())
        return info.vocab_size


def bench_main(args: argparse.Namespace) -> int:
    vocab = args.vocab_size or run(_vocab(args.address))
    w = Workload(
        args.num_requests, args.input_len, args.output_len, args.concurrency or args.num_requests, vocab
    )
    result = run(run_load(args.address, w))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(
            f"{w.num_requests} requests (in {w.input_len} / out {w.output_len}, "
            f"concurrency {w.concurrency}): "
            f"{result.output_tokens_per_s:.1f} output tok/s, TTFT p50 {result.ttft_p50_ms:.1f} ms, "
            f"TPOT p50 {result.tpot_p50_ms:.2f} ms over {result.seconds:.2f} s"
        )
    return 0
