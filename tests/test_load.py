"""Load: 1,000 concurrent streams with cancels, short deadlines and seeded sampling. Every call
ends in exactly one way, completed outputs equal solo runs, and nothing is left behind."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import generation_pb2_grpc
from tests.server_harness import ServerProcess, make_served_model

STREAMS = 1000
SOLO_CHECKS = 40


@dataclass
class Outcome:
    req: pb.GenerateRequest
    kind: str  # "done", "cancelled", "deadline"
    token_ids: list[int]
    finish_reason: int = 0


def _request(rng: random.Random, i: int) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[rng.randrange(10, 500) for _ in range(rng.randint(2, 24))])
    )
    req.request_id = f"load-{i}"
    req.stopping.max_new_tokens = rng.choice([4, 8, 16, 32, 48])
    req.stopping.ignore_eos = True
    if rng.random() < 0.3:
        req.sampling.temperature = 0.8
        req.sampling.top_p = 0.9
        req.sampling.top_k = 50
        req.sampling.seed = rng.randrange(2**32)
    else:
        req.sampling.temperature = 0.0
    return req


async def _one(stub, req: pb.GenerateRequest, cancel_after: int | None, timeout: float | None) -> Outcome:
    call = stub.GenerateStream(req, timeout=timeout)
    ids: list[int] = []
    try:
        async for msg in call:
            ids += msg.token_ids
            if msg.finish_reason:
                return Outcome(req, "done", ids, msg.finish_reason)
            if cancel_after is not None and len(ids) >= cancel_after:
                call.cancel()
                return Outcome(req, "cancelled", ids)
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
            return Outcome(req, "deadline", ids)
        raise
    except asyncio.CancelledError:
        return Outcome(req, "cancelled", ids)
    raise AssertionError(f"{req.request_id} ended without a finish reason")


async def _load(address: str, seed: int, n: int) -> list[Outcome]:
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        jobs = []
        for i in range(n):
            roll = rng.random()
            cancel_after = rng.randint(1, 3) if roll < 0.10 else None
            timeout = rng.uniform(0.05, 0.5) if 0.10 <= roll < 0.15 else None
            jobs.append(_one(stub, _request(rng, i), cancel_after, timeout))
        return list(await asyncio.gather(*jobs))


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_served_model("llama", tmp_path_factory.mktemp("model") / "llama")
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = ServerProcess(
        model_dir, log, "--max-total-tokens", "16384", "--max-running-requests", "256",
        "--max-waiting-requests", "2000",
    )  # fmt: skip
    yield srv
    srv.stop()


def test_thousand_concurrent_streams(server) -> None:
    asyncio.run(_load(server.address, seed=1, n=200))  # warm the allocators before measuring
    server.wait_idle()
    rss_before = _rss_kb(server.proc.pid)
    outcomes = asyncio.run(_load(server.address, seed=2, n=STREAMS))
    kinds = {k: sum(o.kind == k for o in outcomes) for k in ("done", "cancelled", "deadline")}
    assert sum(kinds.values()) == STREAMS and kinds["done"] > 0.8 * STREAMS, kinds
    for o in outcomes:
        if o.kind == "done":
            assert o.finish_reason == pb.FINISH_REASON_LENGTH
            assert len(o.token_ids) == o.req.stopping.max_new_tokens, o.req.request_id
    done = [o for o in outcomes if o.kind == "done"]
    for o in random.Random(3).sample(done, SOLO_CHECKS):
        solo = server.stub.Generate(o.req, timeout=60)
        assert list(solo.token_ids) == o.token_ids, o.req.request_id
    info = server.wait_idle(30)
    assert (info.kv_used_tokens, info.running_requests, info.waiting_requests) == (0, 0, 0)
    rss_after = _rss_kb(server.proc.pid)
    print(f"outcomes {kinds}; coordinator RSS {rss_before} kB -> {rss_after} kB")  # for -s runs
    assert rss_after <= rss_before * 1.05, (rss_before, rss_after)
