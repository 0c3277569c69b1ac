"""``bench serve``'s driver: sends a workload to one or more servers over ``grpc.aio`` and times it.

Every workload is a list of conversations; a single-turn dataset is conversations of one
turn. Conversations start at Poisson arrival times (all at once for an infinite rate) and
run concurrently; the turns of one conversation run one after another, each prompt being
the previous prompt + the answer's token ids + the turn's new tokens. ``--max-concurrency``
bounds requests in flight (a conversation between two turns holds no slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from tqdm import tqdm

from lightllm_grpc.bench.datasets import BenchRequest, Conversation
from lightllm_grpc.bench.metrics import Chunk, RequestOutcome, Summary, summarize
from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import generation_pb2_grpc

# A turn not sent because an earlier turn of its conversation failed.
SKIPPED = "SKIPPED"


@dataclass(frozen=True)
class Traffic:
    """How the workload is sent."""

    request_rate: float = math.inf  # conversation starts per second (Poisson)
    max_concurrency: int | None = None  # requests in flight at most (None: no bound)
    ignore_eos: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"request rate must be > 0 (got {self.request_rate})")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max concurrency must be >= 1 (got {self.max_concurrency})")


def as_conversations(requests: list[BenchRequest]) -> list[Conversation]:
    return [Conversation((r.prompt,), r.output_len) for r in requests]


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Start offsets (s) of ``n`` arrivals of a Poisson process of ``rate`` per second."""
    if math.isinf(rate):
        return [0.0] * n
    # A generator of its own, so the arrival times do not depend on how the dataset was drawn.
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def generate_request(prompt: tuple[int, ...], output_len: int, ignore_eos: bool) -> pb.GenerateRequest:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt))
    req.sampling.temperature = 0.0  # greedy: repeated runs send and get the same tokens
    req.stopping.max_new_tokens = output_len
    req.stopping.ignore_eos = ignore_eos
    req.response.return_token_ids = True  # counted, and fed back by multi-turn
    return req


async def timed_stream(
    stub: generation_pb2_grpc.GenerationStub, req: pb.GenerateRequest
) -> tuple[RequestOutcome, list[int]]:
    """One GenerateStream call: its timings and usage, and the token ids it returned."""
    start = time.perf_counter()
    chunks: list[Chunk] = []
    ids: list[int] = []
    usage: pb.Usage | None = None
    try:
        async for msg in stub.GenerateStream(req):
            if msg.token_ids:
                chunks.append(Chunk(time.perf_counter() - start, len(msg.token_ids)))
                ids += msg.token_ids
            if msg.HasField("usage"):
                usage = msg.usage
    except grpc.aio.AioRpcError as exc:
        return RequestOutcome(error=exc.code().name), ids
    e2e = time.perf_counter() - start
    prompt_tokens = usage.prompt_tokens if usage else len(req.token_ids.ids)
    cached = usage.cached_tokens if usage else 0
    return RequestOutcome(tuple(chunks), e2e, prompt_tokens, cached), ids


@contextlib.asynccontextmanager
async def open_stubs(targets: list[str]) -> AsyncIterator[list[generation_pb2_grpc.GenerationStub]]:
    options = [("grpc.max_receive_message_length", 64 << 20)]
    channels = [grpc.aio.insecure_channel(t, options=options) for t in targets]
    try:
        yield [generation_pb2_grpc.GenerationStub(c) for c in channels]
    finally:
        await asyncio.gather(*(c.close() for c in channels))


async def drive(
    stubs: list[generation_pb2_grpc.GenerationStub], conversations: list[Conversation], traffic: Traffic
) -> tuple[list[RequestOutcome], float]:
    """Run every conversation; return each request's outcome and the run's duration (s).

    Conversation ``i`` goes to ``stubs[i % len(stubs)]`` for all its turns, so with several
    servers its later turns meet the prefix cache its earlier turns filled.
    """
    outcomes: list[RequestOutcome] = []
    limit = asyncio.Semaphore(traffic.max_concurrency) if traffic.max_concurrency else None
    bar = tqdm(total=sum(len(c.turns) for c in conversations), disable=not traffic.progress)

    async def converse(stub: generation_pb2_grpc.GenerationStub, conv: Conversation) -> None:
        history: tuple[int, ...] = ()
        for turn, new_tokens in enumerate(conv.turns):
            prompt = history + new_tokens
            async with limit or contextlib.nullcontext():
                outcome, ids = await timed_stream(
                    stub, generate_request(prompt, conv.output_len, traffic.ignore_eos)
                )
            outcomes.append(outcome)
            bar.update(1)
            if outcome.error is not None:
                rest = len(conv.turns) - turn - 1
                outcomes.extend(RequestOutcome(error=SKIPPED) for _ in range(rest))
                bar.update(rest)
                return
            history = prompt + tuple(ids)

    arrivals = arrival_times(len(conversations), traffic.request_rate, traffic.seed)
    start = time.perf_counter()
    tasks = []
    for i, (conv, at) in enumerate(zip(conversations, arrivals)):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(converse(stubs[i % len(stubs)], conv)))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return outcomes, duration


async def serve_benchmark(
    targets: list[str], build: Callable[[pb.ModelInfo], list[Conversation]], traffic: Traffic
) -> tuple[Summary, pb.ModelInfo]:
    """Ask every target for its model (which also connects), build the workload, run it."""
    async with open_stubs(targets) as stubs:
        infos = await asyncio.gather(*(s.GetModelInfo(pb.GetModelInfoRequest(), timeout=30) for s in stubs))
        if len({i.vocab_size for i in infos}) > 1:
            raise ValueError(f"targets serve different vocabularies: {[i.vocab_size for i in infos]}")
        outcomes, duration = await drive(stubs, build(infos[0]), traffic)
    return summarize(outcomes, duration), infos[0]
