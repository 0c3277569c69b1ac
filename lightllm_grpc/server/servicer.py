"""The client-facing ``lightllm.v1.Generation`` service. Handlers stay short: validation,
tokenization and error mapping live in helpers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from lightllm_grpc import __version__
from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import generation_pb2_grpc
from lightllm_grpc.scheduler.engine import Engine
from lightllm_grpc.scheduler.request import FinishReason, Request, RequestOutput
from lightllm_grpc.server.errors import RequestError, stream_errors, unary_errors
from lightllm_grpc.server.request_builder import RequestBuilder

T = TypeVar("T")


@dataclass(frozen=True)
class StaticInfo:
    model: pb.ModelInfo
    max_waiting_requests: int
    max_running_requests: int
    device: str


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, engine: Engine, builder: RequestBuilder, info: StaticInfo) -> None:
        self.engine = engine
        self.builder = builder
        self.info = info
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    @stream_errors
    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        req = await self._submit(request)
        async for out in self._outputs(req):
            yield pb.GenerateStreamResponse(**_fields(req, out))

    @unary_errors
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        req = await self._submit(request)
        total = RequestOutput()
        async for out in self._outputs(req):
            total.merge(out)
        return pb.GenerateResponse(**_fields(req, total))

    @unary_errors
    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        return await self._off_loop(self.builder.tokenize, request)

    @unary_errors
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return self.info.model

    @unary_errors
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerInfo:
        stats = self.engine.scheduler.stats()
        return pb.ServerInfo(
            version=__version__,
            kv_total_tokens=stats.total,
            kv_free_tokens=stats.total - stats.used,
            kv_cached_tokens=0,  # no prefix cache holds slots beyond live requests yet
            kv_used_tokens=stats.used,
            running_requests=stats.running,
            waiting_requests=stats.waiting,
            max_running_requests=self.info.max_running_requests,
            device=self.info.device,
        )

    @unary_errors
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(aborted=self.engine.abort(request.request_id))

    async def _off_loop(self, fn: Callable[[Any], T], arg: Any) -> T:
        """Run tokenization-heavy work on the tokenizer thread, never on the serving event loop.

        One thread: the HF tokenizer object is not safe to call from several threads at
        once, and the Rust tokenizer releases the GIL, so streams keep flowing meanwhile.
        """
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, arg)

    def _check_admissible(self) -> None:
        if self.engine.dead:
            reason = self.engine.dead
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"the server can no longer serve: {reason}")
        if len(self.engine.scheduler.waiting) >= self.info.max_waiting_requests:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the queue is full ({self.info.max_waiting_requests} waiting requests); retry later",
            )

    async def _submit(self, request: pb.GenerateRequest) -> Request:
        self._check_admissible()  # refuse before tokenizing when it is clear already
        req = await self._off_loop(self.builder.build, request)
        self._check_admissible()  # the engine or the queue may have changed meanwhile
        if req.request_id in self.engine.scheduler.by_id:
            raise RequestError(
                grpc.StatusCode.ALREADY_EXISTS, f"request_id {req.request_id!r} is already running"
            )
        self.engine.submit(req)
        return req

    async def _outputs(self, req: Request) -> AsyncIterator[RequestOutput]:
        """Yield the request's deltas; abort it if the caller goes away (cancel, deadline)."""
        try:
            while True:
                out = await req.next_output()
                if out.error:
                    code = grpc.StatusCode.UNAVAILABLE if self.engine.dead else grpc.StatusCode.INTERNAL
                    raise RequestError(code, f"generation failed: {out.error}")
                yield out
                if out.finish_reason is not FinishReason.NONE:
                    return
        finally:
            if not req.finished:
                self.engine.abort(req.request_id)


def _fields(req: Request, out: RequestOutput) -> dict:
    fields: dict = {"request_id": req.request_id, "text": out.text, "token_ids": out.token_ids}
    if out.logprobs:
        fields["logprobs"] = [
            pb.TokenLogprob(
                token_id=lp.token_id,
                logprob=lp.logprob,
                top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
            )
            for lp in out.logprobs
        ]
    if out.finish_reason is not FinishReason.NONE:
        fields["finish_reason"] = int(out.finish_reason)
        fields["stop_reason"] = out.stop_reason
        fields["usage"] = pb.Usage(
            prompt_tokens=req.prompt_len,
            completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens,
        )
    return fields
