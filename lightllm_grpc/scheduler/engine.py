"""The coordinator's step loop: schedule, run on the shards, hand tokens to the output processor."""

from __future__ import annotations

import asyncio
import logging

from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler.request import Request, TokenLogprob
from lightllm_grpc.scheduler.scheduler import Scheduler, StepPlan
from lightllm_grpc.scheduler.shard_client import ShardClient, ShardError
from lightllm_grpc.server.output_processor import OutputProcessor

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, scheduler: Scheduler, outputs: OutputProcessor, shards: ShardClient) -> None:
        self.scheduler = scheduler
        self.outputs = outputs
        self.shards = shards
        self.dead: str | None = None  # why the engine can no longer serve, once it cannot
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for req in list(self.scheduler.by_id.values()):
            self.outputs.abort(req, "server is shutting down")

    def submit(self, req: Request) -> None:
        self.scheduler.submit(req)
        self._wake.set()

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.by_id.get(request_id)
        if req is None:
            return False
        self.outputs.abort(req)
        return True

    async def _loop(self) -> None:
        while True:
            plan = self.scheduler.schedule()
            if plan is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                result = await self.shards.step(plan.message)
            except ShardError as exc:
                self._fail(plan, str(exc), exc.fatal)
                continue
            self._deliver(plan, result)
            self.steps += 1
            # Let handlers run (new submissions, stream writes) between steps.
            await asyncio.sleep(0)

    def _deliver(self, plan: StepPlan, result: shard_pb2.StepResult) -> None:
        rows = list(result.rows)
        owners = self.scheduler.owners(rows)
        k = result.top_k
        items: list[tuple[Request, int, TokenLogprob | None]] = []
        for i, (req, token) in enumerate(zip(owners, result.token_ids)):
            if req is None or req.finished:
                continue  # aborted while the step ran; its slots are already back
            lp = _logprob(result, i, k, req.output.top_logprobs) if req.output.logprobs else None
            items.append((req, token, lp))
        self.outputs.process(items)

    def _fail(self, plan: StepPlan, error: str, fatal: bool) -> None:
        log.error("step failed: %s", error)
        for req in plan.requests:
            self.outputs.abort(req, error)
        if fatal:
            self.dead = error
            for req in list(self.scheduler.by_id.values()):
                self.outputs.abort(req, error)


def _logprob(result: shard_pb2.StepResult, i: int, k: int, want: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if k and want:
        ids = result.top_ids[i * k : (i + 1) * k]
        lps = result.top_logprobs[i * k : (i + 1) * k]
        top = [(t, lp) for t, lp in zip(ids, lps) if t >= 0][:want]
    return TokenLogprob(result.token_ids[i], result.logprobs[i], top)
