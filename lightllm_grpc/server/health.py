"""``grpc.health.v1`` for load balancers and probes, and server reflection.

``""`` is liveness: SERVING while this process can serve at all (also while the model
loads and while draining, so an orchestrator does not kill a server that is starting or
finishing its streams). ``lightllm.v1.Generation`` is readiness: SERVING only while new
requests can be taken (see ``readiness_problem``), so a balancer stops sending them at
once when the server drains, loses its shards or stalls.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lightllm_grpc.scheduler.engine import Engine
from lightllm_grpc.server.wire import SERVICE

log = logging.getLogger(__name__)
LIVENESS = health.OVERALL_HEALTH
READINESS = SERVICE
CHECK_INTERVAL_S = 0.25
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def readiness_problem(
    engine: Engine | None, draining: bool, stall_timeout: float | None, now: float
) -> str | None:
    """Why the server should not get new requests now; None when it should."""
    if engine is None:
        return "starting: the shards are not warm yet"
    if draining:
        return "draining: finishing in-flight requests before exit"
    if engine.dead:
        return f"the engine cannot serve: {engine.dead}"
    idle_for = now - engine.last_step_at
    if stall_timeout and engine.scheduler.has_work() and idle_for > stall_timeout:
        return f"stalled: requests are pending and no step completed for {idle_for:.0f}s"
    return None


class Health:
    """Publishes liveness and readiness through the library's aio servicer (Check and Watch).

    Readiness is recomputed every ``CHECK_INTERVAL_S`` (a stall shows only as time passing)
    and at once on ``drain``; ``set`` is called only on a change, which ``Watch`` streams.
    """

    def __init__(self, stall_timeout: float | None) -> None:
        self.servicer = health.aio.HealthServicer()
        self.stall_timeout = stall_timeout
        self.engine: Engine | None = None  # set once the shards are warm
        self.draining = False
        self._ready: bool | None = None
        self._task: asyncio.Task[None] | None = None

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        await self.servicer.set(LIVENESS, SERVING)
        await self.update()
        self._task = asyncio.create_task(self._poll(), name="health")

    async def update(self) -> None:
        problem = readiness_problem(self.engine, self.draining, self.stall_timeout, time.monotonic())
        ready = problem is None
        if ready == self._ready:
            return
        self._ready = ready
        log.info("readiness: %s", "SERVING" if ready else f"NOT_SERVING ({problem})")
        await self.servicer.set(READINESS, SERVING if ready else NOT_SERVING)
        if self.engine is not None and self.engine.dead:
            await self.servicer.set(LIVENESS, NOT_SERVING)  # it cannot recover: restart it

    async def drain(self) -> None:
        self.draining = True
        await self.update()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.servicer.enter_graceful_shutdown()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            await self.update()


def enable_reflection(server: grpc.aio.Server) -> None:
    """List the API and health services (and reflection itself), so grpcurl needs no protos."""
    names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
