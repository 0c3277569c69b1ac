"""The shard's gRPC service: info, health, warm-up and the per-step stream."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from lightllm_grpc.gc_freeze import freeze_startup_objects
from lightllm_grpc.proto import shard_pb2, shard_pb2_grpc
from lightllm_grpc.shard.grammar import ConstraintError
from lightllm_grpc.shard.runner import PendingStep
from lightllm_grpc.shard.warmup import warmup
from lightllm_grpc.shard.worker import Shard, dtype_name
from lightllm_grpc.step_socket import frame, read_frame

log = logging.getLogger(__name__)
# How often to look for the next step while the device runs the current one.
POLL_S = 0.0001
# Once the step stream has ended, how long a step still on the device may take before the
# shard gives up on it: no one will read its result, and a step that never finishes (a peer
# shard died inside an all-reduce: the barrier-free one has no watchdog, NCCL's fires after
# minutes) would otherwise block this process in ``finish`` for ever.
ABANDON_S = 30.0


def _exit_abandoned(step_id: int, waited: float) -> None:
    log.error(
        "step %d still on the device %.0f s after the coordinator's step stream ended (a peer "
        "shard died inside a collective, or the device hangs): exiting without it",
        step_id, waited,
    )  # fmt: skip
    logging.shutdown()
    os._exit(1)  # a normal exit would wait on the device too


class ShardService(shard_pb2_grpc.ShardServicer):
    def __init__(
        self,
        shard: Shard,
        abandon_after_s: float = ABANDON_S,
        on_abandon: Callable[[int, float], None] = _exit_abandoned,
        step_socket: str = "",
    ) -> None:
        self.shard = shard
        self.step_socket = step_socket  # the path serve_step_socket listens on, "" for none
        self.abandon_after_s = abandon_after_s
        self.on_abandon = on_abandon  # (step id, seconds waited): the default exits the process
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
            step_socket=self.step_socket,
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
        async for result in self.run_steps(requests):
            yield result

    async def serve_step_socket(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """``Steps`` over one connection to the step socket (lightllm_grpc/step_socket.py)."""

        async def requests() -> AsyncIterator[shard_pb2.StepRequest]:
            try:
                while (payload := await read_frame(reader)) is not None:
                    yield shard_pb2.StepRequest.FromString(payload)
            except (ConnectionError, DecodeError) as exc:  # ends the stream, as a broken gRPC one
                log.error("step socket: %s", exc)

        try:
            async for result in self.run_steps(requests()):
                writer.write(frame(result.SerializeToString()))
                await writer.drain()
        except ConnectionError as exc:  # the coordinator went away: as a cancelled gRPC stream
            log.info("step socket closed: %s", exc)
        finally:
            writer.close()

    async def run_steps(
        self, requests: AsyncIterator[shard_pb2.StepRequest]
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
                stranded = following is None and not _is_done(pending)  # the stream ended mid-step
                if stranded and not await _settles(pending, self.abandon_after_s):
                    self.on_abandon(pending.step_id, self.abandon_after_s)
                    return
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


def _is_done(pending: PendingStep | shard_pb2.StepResult) -> bool:
    return isinstance(pending, shard_pb2.StepResult) or pending.done()


async def _settles(pending: PendingStep, seconds: float) -> bool:
    """Whether ``pending`` finishes on the device within ``seconds`` (waiting without blocking)."""
    deadline = time.monotonic() + seconds
    while not pending.done():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def _next_before_done(
    queue: asyncio.Queue, pending: PendingStep | shard_pb2.StepResult
) -> shard_pb2.StepRequest | None:
    """The next step if it arrives before ``pending`` finishes on the device, else None."""
    while True:
        if not queue.empty():
            return queue.get_nowait()  # None when the stream ended
        if _is_done(pending):
            return None
        await asyncio.sleep(POLL_S)
