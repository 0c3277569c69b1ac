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
from lightllm_grpc.proto import generation_pb2_grpc, shard_pb2
from lightllm_grpc.scheduler.engine import Engine
from lightllm_grpc.scheduler.request import FinishReason, Request, RequestOutput, next_outputs
from lightllm_grpc.scheduler.shard_client import ShardError
from lightllm_grpc.server.errors import RequestError, invalid, stream_errors, unary_errors
from lightllm_grpc.server.request_builder import RequestBuilder

T = TypeVar("T")


@dataclass(frozen=True)
class StaticInfo:
    model: pb.ModelInfo
    max_waiting_requests: int
    max_running_requests: int
    device: str


class GenerationService(generation_pb2_grpc.GenerationServicer):
    """``identity`` (set when callers are authenticated) names a call's caller: a request id
    is then bound to the caller that submitted it, and ``Abort`` touches only the caller's
    own requests."""

    def __init__(
        self,
        engine: Engine,
        builder: RequestBuilder,
        info: StaticInfo,
        identity: Callable[[grpc.aio.ServicerContext], str] | None = None,
    ) -> None:
        self.engine = engine
        self.builder = builder
        self.info = info
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self.identity = identity
        self.owners: dict[str, str] = {}  # live request id -> its caller (with identity)
        self.draining = False  # shutting down: new generation calls are refused
        # Called with each submitted request's completions, in the call's context (tracing).
        self.on_submit: Callable[[list[Request]], None] | None = None

    @stream_errors
    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        reqs = await self._submit(request, context)
        async for out in self._outputs(reqs):
            req = reqs[out.index]
            yield pb.GenerateStreamResponse(index=out.index, **_fields(req, out), **_usage(out, [req]))

    @unary_errors
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        reqs = await self._submit(request, context)
        totals = [RequestOutput(index=r.index) for r in reqs]
        async for out in self._outputs(reqs):
            totals[out.index].merge(out)
        response = pb.GenerateResponse(**_fields(reqs[0], totals[0]), **_usage(totals[0], reqs))
        if len(reqs) > 1:
            response.completions.extend(_completion(r, t) for r, t in zip(reqs, totals))
        return response

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
        scheduler = self.engine.scheduler
        stats, counters, cfg = scheduler.stats(), scheduler.counters, scheduler.config
        return pb.ServerInfo(
            version=__version__,
            kv_total_tokens=stats.total,
            kv_cache_dtype=self.info.model.kv_cache_dtype,
            kv_free_tokens=stats.free,
            kv_cached_tokens=stats.cached,
            kv_used_tokens=stats.used,
            running_requests=stats.running,
            waiting_requests=stats.waiting,
            max_running_requests=self.info.max_running_requests,
            device=self.info.device,
            prefix_cache_query_tokens=counters.prefix_query_tokens,
            prefix_cache_hit_tokens=counters.prefix_hit_tokens,
            num_preemptions=counters.preemptions,
            num_partial_prefills=counters.partial_prefills,
            num_cascade_decode_steps=counters.cascade_steps,
            prefix_cache_enabled=cfg.prefix_cache,
            admission=cfg.admission,
            scheduling_policy=cfg.scheduling_policy,
        )

    @unary_errors
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        if self.identity is not None and self.owners.get(request.request_id) != self.identity(context):
            return pb.AbortResponse(aborted=False)  # another caller's: as if unknown, telling nothing
        return pb.AbortResponse(aborted=self.engine.abort(request.request_id))

    @unary_errors
    async def FlushCache(
        self, request: pb.FlushCacheRequest, context: grpc.aio.ServicerContext
    ) -> pb.FlushCacheResponse:
        return pb.FlushCacheResponse(freed_tokens=self.engine.scheduler.clear_cache())

    async def _off_loop(self, fn: Callable[[Any], T], arg: Any) -> T:
        """Run tokenization-heavy work on the tokenizer thread, never on the serving event loop.

        One thread: the HF tokenizer object is not safe to call from several threads at
        once, and the Rust tokenizer releases the GIL, so streams keep flowing meanwhile.
        """
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, arg)

    def _check_admissible(self) -> None:
        if self.draining:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                "the server is draining (shutting down); retry on another replica",
            )
        if self.engine.dead:
            reason = self.engine.dead
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"the server can no longer serve: {reason}")
        if len(self.engine.scheduler.waiting) >= self.info.max_waiting_requests:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the queue is full ({self.info.max_waiting_requests} waiting requests); retry later",
            )

    async def _submit(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> list[Request]:
        self._check_admissible()  # refuse before tokenizing when it is clear already
        reqs = await self._off_loop(self.builder.build, request)
        if reqs[0].constraint is not None:
            await self._compile(reqs[0].constraint)
        self._check_admissible()  # the engine or the queue may have changed meanwhile
        request_id = reqs[0].request_id
        if request_id in self.engine.scheduler.by_id:
            raise RequestError(
                grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is already running"
            )
        if self.identity is not None:
            self.owners[request_id] = self.identity(context)
        for req in reqs:
            self.engine.submit(req)
        if self.on_submit is not None:
            self.on_submit(reqs)
        return reqs

    async def _compile(self, constraint: shard_pb2.Constraint) -> None:
        try:
            await self.engine.compile_constraint(constraint)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        except ShardError as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None

    async def _outputs(self, reqs: list[Request]) -> AsyncIterator[RequestOutput]:
        """Yield the completions' deltas until all have finished; abort them all if the
        caller goes away (cancel, deadline)."""
        queue, left = reqs[0].queue, len(reqs)
        try:
            while left:
                for out in await next_outputs(queue):
                    if out.error:
                        code = grpc.StatusCode.UNAVAILABLE if self.engine.dead else grpc.StatusCode.INTERNAL
                        raise RequestError(code, f"generation failed: {out.error}")
                    yield out
                    left -= out.finish_reason is not FinishReason.NONE
        finally:
            if any(not r.finished for r in reqs):
                self.engine.abort(reqs[0].request_id)
            self.owners.pop(reqs[0].request_id, None)


def _fields(req: Request, out: RequestOutput) -> dict:
    fields: dict = {"request_id": req.request_id, "text": out.text, "token_ids": out.token_ids}
    if out.logprobs:
        fields["logprobs"] = _logprobs(out)
    if out.prompt_logprobs:
        fields["prompt_logprobs"] = [
            pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob) for lp in out.prompt_logprobs
        ]
    if out.finish_reason is not FinishReason.NONE:
        fields["finish_reason"] = int(out.finish_reason)
        fields["stop_reason"] = out.stop_reason
        if out.finish_reason is FinishReason.STOP:
            fields["matched_stop"] = _matched_stop(out)
    return fields


def _matched_stop(out: RequestOutput) -> pb.MatchedStop:
    if out.stop_token is not None:
        return pb.MatchedStop(token_id=out.stop_token)
    return pb.MatchedStop(text=out.stop_reason)


def _usage(out: RequestOutput, reqs: list[Request]) -> dict:
    """Usage on a final message: the prompt once, the completion tokens of ``reqs``, and
    the prompt tokens the first of them took from the prefix cache."""
    if out.finish_reason is FinishReason.NONE:
        return {}
    usage = pb.Usage(
        prompt_tokens=reqs[0].prompt_len,
        completion_tokens=sum(len(r.output_ids) for r in reqs),
        cached_tokens=reqs[0].cached_tokens,
    )
    return {"usage": usage}


def _logprobs(out: RequestOutput) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in out.logprobs
    ]


def _completion(req: Request, out: RequestOutput) -> pb.Completion:
    return pb.Completion(
        index=req.index,
        text=out.text,
        token_ids=out.token_ids,
        finish_reason=int(out.finish_reason),
        logprobs=_logprobs(out),
        stop_reason=out.stop_reason,
        completion_tokens=len(req.output_ids),
        matched_stop=_matched_stop(out) if out.finish_reason is FinishReason.STOP else None,
    )
