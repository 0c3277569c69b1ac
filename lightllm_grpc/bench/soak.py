"""``make soak``: mixed load for a while, then what it did to the server.

Workers send streams of mixed length, greedy or seeded sampling, some cancelled mid-stream
and some with short deadlines, until the duration is up. The report: requests served,
outcomes by status code, p99 latency of completed calls, and the server's KV use and RSS
at start and end (RSS only for a server this command started itself).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lightllm_grpc.aio import run
from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import generation_pb2_grpc

CANCEL_SHARE = 0.10
SHORT_DEADLINE_SHARE = 0.05


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # completed calls, seconds

    def p99_ms(self) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3


def _request(rng: random.Random, vocab: int) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[rng.randrange(vocab) for _ in range(rng.randint(4, 64))])
    )
    req.stopping.max_new_tokens = rng.choice([8, 16, 32, 64])
    req.stopping.ignore_eos = True
    if rng.random() < 0.3:
        req.sampling.temperature, req.sampling.top_p, req.sampling.seed = 0.8, 0.9, rng.randrange(2**32)
    else:
        req.sampling.temperature = 0.0
    return req


async def _call(
    stub: generation_pb2_grpc.GenerationStub, rng: random.Random, vocab: int, tally: Tally
) -> None:
    roll = rng.random()
    timeout = rng.uniform(0.05, 0.5) if roll < SHORT_DEADLINE_SHARE else 600.0
    cancel_after = (
        rng.randint(1, 4) if SHORT_DEADLINE_SHARE <= roll < SHORT_DEADLINE_SHARE + CANCEL_SHARE else 0
    )
    start, tokens = time.perf_counter(), 0
    call = stub.GenerateStream(_request(rng, vocab), timeout=timeout)
    try:
        async for msg in call:
            tokens += len(msg.token_ids)
            if cancel_after and tokens >= cancel_after:
                call.cancel()
                tally.outcomes["CANCELLED (by the client)"] += 1
                return
        tally.outcomes["OK"] += 1
        tally.latencies.append(time.perf_counter() - start)
    except grpc.aio.AioRpcError as err:
        tally.outcomes[err.code().name] += 1


async def _worker(stub, rng: random.Random, vocab: int, until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        await _call(stub, rng, vocab, tally)


async def soak(
    address: str, duration: float, concurrency: int, seed: int = 0
) -> tuple[Tally, list[pb.ServerInfo]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        vocab = (await stub.GetModelInfo(pb.GetModelInfoRequest())).vocab_size
        infos = [await stub.GetServerInfo(pb.GetServerInfoRequest())]
        tally, until = Tally(), time.monotonic() + duration
        await asyncio.gather(
            *(_worker(stub, random.Random(seed + i), vocab, until, tally) for i in range(concurrency))
        )
        await asyncio.sleep(0.5)  # let aborted requests leave the engine
        infos.append(await stub.GetServerInfo(pb.GetServerInfoRequest()))
    return tally, infos


def _rss_mb(pid: int | None) -> str:
    if pid is None:
        return "n/a"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return f"{int(line.split()[1]) / 1024:.0f} MB"
    return "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=64, help="streams in flight at once")
    p.add_argument("--address", default=None, help="a running server; default: start one on the CPU")
    p.add_argument("--model", type=Path, default=None, help="model folder for the started server")
    args = p.parse_args(argv)
    server = None
    if args.address is None:
        from lightllm_grpc.bench.server import LocalServer

        log = Path(tempfile.mkdtemp(prefix="lightllm-soak-")) / "server.log"
        server = LocalServer(
            args.model, log, "--device", "cpu", "--max-waiting-requests", str(4 * args.concurrency)
        )
    address = args.address or server.address
    pid = server.proc.pid if server else None
    try:
        rss_start = _rss_mb(pid)
        tally, (start, end) = run(soak(address, args.duration, args.concurrency))
        rss_end = _rss_mb(pid)
    finally:
        if server is not None:
            server.stop()
    served = sum(tally.outcomes.values())
    print(f"{served} requests in {args.duration:.0f} s at concurrency {args.concurrency}")
    for name, n in sorted(tally.outcomes.items()):
        print(f"  {name}: {n}")
    print(f"p99 latency of completed calls: {tally.p99_ms():.0f} ms")
    print(f"KV used tokens: {start.kv_used_tokens} at start, {end.kv_used_tokens} at end")
    print(f"server RSS: {rss_start} at start, {rss_end} at end")
    unexpected = served - tally.outcomes["OK"] - tally.outcomes["CANCELLED (by the client)"]
    unexpected -= tally.outcomes["DEADLINE_EXCEEDED"]
    return 1 if unexpected or end.kv_used_tokens else 0


if __name__ == "__main__":
    sys.exit(main())
