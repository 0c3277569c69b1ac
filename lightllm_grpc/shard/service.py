"""The shard's gRPC service: info, health, warm-up and the per-step stream."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator

import grpc

from lightllm_grpc.gc_freeze import freeze_startup_objects
from lightllm_grpc.proto import shard_pb2, shard_pb2_grpc
from lightllm_grpc.shard.grammar import ConstraintError
from lightllm_grpc.shard.runner import PendingStep
from lightllm_grpc.shard.warmup import warmup
from lightllm_grpc.shard.worker import Shard, dtype_name

log = logging.getLogger(__name__)
# How often to look for the next step while the device runs the current one.
POLL_S = 0.0001


class ShardService(shard_pb2_grpc.ShardServicer):
    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        # Set when the coordinator's step stream ends: the coordinator closed it or died (a
        # remote coordinator, whose death no parent-death signal reports). Either way no one
        # will send this shard another step, so its process exits.
        self.stream_ended = asyncio.Event()
        self.open_streams = 0

    async def Info(self, request: shard_pb2.InfoRequest, context: grpc.aio.ServicerContext):
        s, m = self.shard, self.shard.model_config
        return shard_pb2.InfoResponse(
            rank=s.rank,
            world_size=s.world_size,
            device=str(s.device),
            dtype=dtype_name(s.dtype),
            kv_capacity=s.runner.kv_capacity,
            max_rows=s.runner.max_rows,
            max_context=s.runner.max_context,
            model_name=m.name,
            architecture=m.architecture,
            vocab_size=m.vocab_size,
            eos_token_ids=list(m.eos_token_ids),
            kv_bytes_per_token=s.kv_bytes_per_token,
            kv_cache_dtype=s.kv_cache_dtype,
            graph_batch_sizes=list(s.graph_batch_sizes),
            host=socket.gethostname(),
        )

    async def Health(self, request: shard_pb2.HealthRequest, context: grpc.aio.ServicerContext):
        return shard_pb2.HealthResponse(ok=True, detail=f"rank {self.shard.rank}")

    async def Warmup(self, request: shard_pb2.WarmupRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        warmup(self.shard, request.max_prefill_tokens, request.max_batch_size)
        # Here, not in warmup(): a test process that builds several shards must not freeze them.
        freeze_startup_objects("shard")  # the model and the graphs live as long as the process
        return shard_pb2.WarmupResponse(seconds=time.perf_counter() - start)

    async def ClearCache(self, request: shard_pb2.ClearCacheRequest, context: grpc.aio.ServicerContext):
        # Resetting rows a coordinator still steps would silently corrupt its requests.
        live = self.shard.runner.live_rows()
        if live or self.open_streams:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"ClearCache refused: {live} rows are live and {self.open_streams} step streams are open",
            )
        self.shard.runner.reset()
        return shard_pb2.ClearCacheResponse()

    async def CompileConstraint(self, request: shard_pb2.Constraint, context: grpc.aio.ServicerContext):
        compiler = self.shard.grammar
        if compiler is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this shard has no grammar support")
        start = time.perf_counter()
        try:
            # xgrammar releases the GIL while compiling, so steps keep running meanwhile.
            await asyncio.to_thread(compiler.compile, request)
        except ConstraintError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        seconds = time.perf_counter() - start
        return shard_pb2.CompileConstraintResponse(seconds=seconds)

    async def Steps(
        self, requests: AsyncIterator[shard_pb2.StepRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.StepResult]:
        """Answer each step in order, launching the next one before waiting for this one's tokens.

        The forward pass is launched inline (this process exists to run it). While step N
        runs on the device, step N+1 is taken from the stream as soon as it arrives and
        launched behind it, so the device does not idle while N's result goes out.
        """
        queue: asyncio.Queue[shard_pb2.StepRequest | None] = asyncio.Queue()
        reader = asyncio.create_task(_pump(requests, queue))
        self.open_streams += 1
        try:
            pending = None
            while True:
                if pending is None:
                    msg = await queue.get()
                    if msg is None:
                        return
                    pending = self._launch(msg)
                following = await _next_before_done(queue, pending)
                after = self._launch(following) if following is not None else None
                yield self._finish(pending)
                if following is None and reader.done() and queue.empty():
                    return  # the coordinator closed the stream
                pending = after
        finally:
            reader.cancel()
            self.open_streams -= 1
            self.stream_ended.set()

    def _launch(self, msg: shard_pb2.StepRequest) -> PendingStep | shard_pb2.StepResult:
        try:
            return self.shard.runner.launch(msg)
        except Exception as exc:
            log.exception("step %d failed", msg.step_id)
            return shard_pb2.StepResult(step_id=msg.step_id, error=f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _finish(pending: PendingStep | shard_pb2.StepResult) -> shard_pb2.StepResult:
        if isinstance(pending, shard_pb2.StepResult):
            return pending  # it failed at launch
        try:
            return pending.finish()
        except Exception as exc:
            log.exception("step %d failed", pending.step_id)
            return shard_pb2.StepResult(step_id=pending.step_id, error=f"{type(exc).__name__}: {exc}")


async def _pump(requests: AsyncIterator[shard_pb2.StepRequest], queue: asyncio.Queue) -> None:
    try:
        async for msg in requests:
            queue.put_nowait(msg)
    finally:
        queue.put_nowait(None)


async def _next_before_done(
    queue: asyncio.Queue, pending: PendingStep | shard_pb2.StepResult
) -> shard_pb2.StepRequest | None:
    """The next step if it arrives before ``pending`` finishes on the device, else None."""
    while True:
        if not queue.empty():
            return queue.get_nowait()  # None when the stream ended
        if isinstance(pending, shard_pb2.StepResult) or pending.done():
            return None
        await asyncio.sleep(POLL_S)
