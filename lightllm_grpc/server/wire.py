"""Registers the ``Generation`` service with deserializers that never raise.

grpc.aio answers a request it cannot deserialize with ``UNKNOWN``, the exception's class
in the message and an ERROR traceback per call: anyone who can connect could flood the
log. Here a bad message deserializes to ``Malformed`` instead, and the handler answers
``INVALID_ARGUMENT`` with at most one log line every ``LOG_INTERVAL_S``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from lightllm_grpc.proto import generation_pb2 as pb

log = logging.getLogger(__name__)
SERVICE = "lightllm.v1.Generation"
LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Malformed:
    """What a request that is not a valid ``type_name`` message deserializes to."""

    type_name: str
    reason: str

    @property
    def message(self) -> str:
        return f"the request is not a valid {self.type_name} message ({self.reason})"


class RateLimitedLog:
    """One warning per interval at most, counting the ones it held back."""

    def __init__(self, interval: float = LOG_INTERVAL_S) -> None:
        self.interval = interval
        self._last = -interval
        self._held = 0

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        suffix = f" ({held} more since the last report)" if held else ""
        log.warning("%s%s", message, suffix)


_MALFORMED_LOG = RateLimitedLog()


def _deserializer(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:  # invalid UTF-8 is a DecodeError
            return Malformed(name, type(exc).__name__ if not str(exc) else str(exc))

    return parse


async def _refuse(bad: Malformed, context: grpc.aio.ServicerContext) -> None:
    _MALFORMED_LOG.warn(f"refused a malformed request from {context.peer()}: {bad.message}")
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)


class LateService:
    """The ``Generation`` service, registered before the model loads.

    grpc.aio takes no services once started, and health must answer from the moment the
    port is bound; until ``target`` is set (the shards are warm), every call is
    ``UNAVAILABLE``. ``on_error`` (optional) sees the status code of every failed call.
    """

    def __init__(self, target: Any = None) -> None:
        self.target = target
        self.on_error: Callable[[grpc.StatusCode], None] | None = None

    async def behavior(self, name: str, context: grpc.aio.ServicerContext) -> Callable[..., Any]:
        if self.target is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the server is starting (the model is loading); retry when grpc.health.v1 "
                f"reports {SERVICE} SERVING",
            )
        return getattr(self.target, name)

    def failed(self, context: grpc.aio.ServicerContext) -> None:
        if self.on_error is not None and context.code() is not None:
            self.on_error(context.code())


def _unary(service: LateService, name: str) -> Callable[..., Any]:
    async def handler(request: Message | Malformed, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, Malformed):
                await _refuse(request, context)
            behavior = await service.behavior(name, context)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            service.failed(context)
            raise

    return handler


def _stream(service: LateService, name: str) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Message | Malformed, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            if isinstance(request, Malformed):
                await _refuse(request, context)
            behavior = await service.behavior(name, context)
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            service.failed(context)
            raise

    return handler


def add_generation_service(servicer: Any, server: grpc.aio.Server) -> LateService:
    """Register every ``Generation`` method, unary or server-streaming, from the proto's descriptor.

    ``servicer`` may be a ``LateService`` whose target is set later; anything else is wrapped
    in one. Handlers look the method up on each call.
    """
    service = servicer if isinstance(servicer, LateService) else LateService(servicer)
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in pb.DESCRIPTOR.services_by_name["Generation"].methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        wrap = _stream if method.server_streaming else _unary
        handlers[method.name] = make(
            wrap(service, method.name),
            request_deserializer=_deserializer(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
    return service
