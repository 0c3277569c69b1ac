"""The shard's gRPC service: info, health, warm-up and the per-step stream."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc

from lightllm_grpc.proto import shard_pb2, shard_pb2_grpc
from lightllm_grpc.shard.warmup import warmup
from lightllm_grpc.shard.worker import Shard

log = logging.getLogger(__name__)


class ShardService(shard_pb2_grpc.ShardServicer):
    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    async def Info(self, request: shard_pb2.InfoRequest, context: grpc.aio.ServicerContext):
        s, m = self.shard, self.shard.model_config
        return shard_pb2.InfoResponse(
            rank=s.rank,
            world_size=s.world_size,
            device=str(s.device),
            dtype=str(s.dtype).removeprefix("torch."),
            kv_capacity=s.runner.kv_capacity,
            max_rows=s.runner.max_rows,
            max_context=s.runner.max_context,
            model_name=m.name,
            architecture=m.architecture,
            vocab_size=m.vocab_size,
            eos_token_ids=list(m.eos_token_ids),
            kv_bytes_per_token=s.kv_bytes_per_token,
            graph_batch_sizes=list(s.graph_batch_sizes),
        )

    async def Health(self, request: shard_pb2.HealthRequest, context: grpc.aio.ServicerContext):
        return shard_pb2.HealthResponse(ok=True, detail=f"rank {self.shard.rank}")

    async def Warmup(self, request: shard_pb2.WarmupRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        warmup(self.shard, request.max_prefill_tokens, request.max_batch_size)
        return shard_pb2.WarmupResponse(seconds=time.perf_counter() - start)

    async def ClearCache(self, request: shard_pb2.ClearCacheRequest, context: grpc.aio.ServicerContext):
        self.shard.runner.reset()
        return shard_pb2.ClearCacheResponse()

    async def Steps(
        self, requests: AsyncIterator[shard_pb2.StepRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.StepResult]:
        # The forward pass runs inline: this process exists to run it, and a thread hop
        # per step would only add latency.
        async for step in requests:
            try:
                yield self.shard.runner.step(step)
            except Exception as exc:
                log.exception("step %d failed", step.step_id)
                yield shard_pb2.StepResult(step_id=step.step_id, error=f"{type(exc).__name__}: {exc}")
