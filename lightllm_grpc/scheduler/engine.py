"""The coordinator's step loop: schedule, run on the shards, hand tokens to the output processor.

Up to ``PIPELINE_DEPTH`` steps are in flight. The next step is sent before the previous
one's tokens are processed, so the GPU runs step N+1 while this process detokenizes and
streams step N; the shard keeps each row's last token, so nothing waits for the round trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler.observer import RequestObserver
from lightllm_grpc.scheduler.output_processor import OutputProcessor
from lightllm_grpc.scheduler.request import FinishReason, Request, RequestOutput, TokenLogprob
from lightllm_grpc.scheduler.scheduler import Scheduler, StepPlan
from lightllm_grpc.scheduler.shard_client import ShardClient, ShardError
from lightllm_grpc.scheduler.step_trace import StepTrace

log = logging.getLogger(__name__)
PIPELINE_DEPTH = 2
STATS_INTERVAL_S = 10.0
# A JSON schema over a 128k vocabulary compiles in ~0.05-1 s; far longer means a pathological one.
CONSTRAINT_COMPILE_TIMEOUT_S = 60.0


@dataclass
class LoopStats:
    """Where the step loop's time goes, logged every STATS_INTERVAL_S while busy."""

    steps: int = 0
    tokens: int = 0
    wait_s: float = 0.0  # blocked on the shards' results
    deliver_s: float = 0.0  # stop checks, detokenization, emission
    shard_s: float = 0.0  # the shards' own launch-to-result time, summed
    since: float = 0.0

    def due(self, now: float) -> bool:
        return self.steps > 0 and now - self.since >= STATS_INTERVAL_S

    def log(self, now: float) -> None:
        span, per_step = now - self.since, 1e3 / self.steps
        log.info(
            "%.1f steps/s, %.0f tokens/s, %.1f tokens/step; per step: waiting on shards %.2f ms, "
            "delivering %.2f ms, shard launch-to-result %.2f ms",
            self.steps / span, self.tokens / span, self.tokens / self.steps,
            self.wait_s * per_step, self.deliver_s * per_step, self.shard_s * per_step,
        )  # fmt: skip


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        outputs: OutputProcessor,
        shards: ShardClient,
        depth: int = PIPELINE_DEPTH,
        step_timeout: float | None = None,
        trace: StepTrace | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.outputs = outputs
        self.shards = shards
        self.depth = depth
        # Longest wait for one step's result before the shards count as stuck (None: forever).
        # The first step is exempt: it may compile kernels or allocate lazily.
        self.step_timeout = step_timeout
        self._steps_received = 0
        self.dead: str | None = None  # why the engine can no longer serve, once it cannot
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: deque[StepPlan] = deque()
        self.stats = LoopStats(since=time.perf_counter())
        # Monotonic time of the last completed step, or of work arriving at an idle engine:
        # pending work with no step for a while means the engine is stuck (readiness).
        self.last_step_at = time.monotonic()
        self.observer: RequestObserver | None = None
        self._last_result_at = 0.0
        self.trace = trace  # --step-trace: a line per completed step; closed by stop()

    def observe(self, observer: RequestObserver) -> None:
        """Install the one observer of request and step times (the frontend's metrics)."""
        self.observer = observer
        self.outputs.observer = observer

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for req in self.scheduler.live():
            self.outputs.abort(req, "server is shutting down")
        if self.trace is not None:
            self.trace.close()

    def drain(self) -> None:
        """Shutting down: refuse new requests and end live ones with FINISH_REASON_ABORT.

        Their streams get a normal last message (the proto's documented shutdown outcome)
        rather than an error status; ``stop`` then ends the loop.
        """
        if self.dead is None:
            self.dead = "the server is shutting down"
        for req in self.scheduler.live():
            self.outputs.abort(req)

    def submit(self, req: Request) -> None:
        if not self.scheduler.has_work():
            self.last_step_at = time.monotonic()  # an idle engine was not stalled
        self.scheduler.submit(req)
        self._wake.set()

    async def compile_constraint(self, constraint: shard_pb2.Constraint) -> None:
        """Compile ``constraint`` on the shards before its request is queued, so no step waits
        for it. ValueError (the shards' message) when it is invalid."""
        await self.shards.compile_constraint(constraint, timeout=CONSTRAINT_COMPILE_TIMEOUT_S)

    def abort(self, request_id: str) -> bool:
        """Abort every live completion of ``request_id``; False when there is none."""
        group = list(self.scheduler.by_id.get(request_id, ()))
        for req in group:
            self.outputs.abort(req)
        return bool(group)

    async def _loop(self) -> None:
        """Run steps until cancelled; any unexpected exception fails every call and kills the engine.

        A loop that died quietly would leave live streams waiting forever and accept new
        requests it never serves; failing loudly lets the server exit and be restarted.
        """
        try:
            await self._steps()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("the engine loop failed")
            self.fail_all(f"internal error in the engine loop: {type(exc).__name__}: {exc}")

    async def _receive(self, step_id: int) -> shard_pb2.StepResult:
        first = self._steps_received == 0
        timeout = None if first else self.step_timeout
        try:
            result = await asyncio.wait_for(self.shards.receive(step_id), timeout)
        except asyncio.TimeoutError as exc:
            raise ShardError(f"step {step_id} took longer than the step timeout of {timeout:g}s") from exc
        self._steps_received += 1
        return result

    async def _steps(self) -> None:
        while True:
            try:
                await self._fill()
            except ShardError as exc:
                self._fail(None, exc)
                continue
            if not self._inflight:
                if self.trace is not None:
                    self.trace.flush()  # idle: the trace on disk is complete up to now
                self._wake.clear()
                await self._wake.wait()
                continue
            plan = self._inflight[0]
            waited = time.perf_counter()
            try:
                result = await self._receive(plan.message.step_id)
            except ShardError as exc:
                self._inflight.popleft()
                self._fail(plan, exc)
                continue
            self._inflight.popleft()
            period = self._observe_step(plan, result)  # before the next schedule(), which the time informs
            filling = time.perf_counter()
            try:
                await self._fill()  # keep the GPU busy while this step's tokens are processed
            except ShardError as exc:
                self._fail(None, exc)
            delivered = time.perf_counter()
            if self.trace is not None and self.trace.on:
                self._deliver_traced(plan, result, period, delivered - filling)
            else:
                self._deliver(plan, result)
            self._account(result, waited, delivered)
            await asyncio.sleep(0)  # let handlers stream what was just delivered

    async def _fill(self) -> None:
        while len(self._inflight) < self.depth:
            plan = self.scheduler.schedule()
            if plan is None:
                return
            self._inflight.append(plan)
            plan.sent_at = time.monotonic()
            await self.shards.send(plan.message)

    def _observe_step(self, plan: StepPlan, result: shard_pb2.StepResult) -> float:
        """Step time: from when the shards could start on it (sent, or the previous result
        came back, whichever is later) to its result: the period that sets decode speed.

        The step-time model gets the smaller of that and the shard's own launch-to-result
        time: the period includes the round trip when the pipeline ran dry, the shard's
        time includes waiting behind the previous step when it did not."""
        now = time.monotonic()
        period = now - max(plan.sent_at, self._last_result_at)
        if self.observer is not None:
            self.observer.on_step(period)
        self._last_result_at = now
        shard = result.forward_seconds
        self.scheduler.observe_step(plan, min(period, shard) if shard > 0 else period)
        return period

    def _account(self, result: shard_pb2.StepResult, waited: float, delivered: float) -> None:
        self.last_step_at = time.monotonic()
        now = time.perf_counter()
        st = self.stats
        st.steps += 1
        st.tokens += len(result.token_ids)
        st.wait_s += delivered - waited
        st.deliver_s += now - delivered
        st.shard_s += result.forward_seconds
        if st.due(now):
            st.log(now)
            if self.scheduler.step_time is not None:
                log.info("step time model: %s", self.scheduler.step_time.describe())
            self.stats = LoopStats(since=now)

    def _deliver(self, plan: StepPlan, result: shard_pb2.StepResult) -> None:
        if plan.prompt_lp:
            _deliver_prompt_logprobs(plan, result)
        k = result.top_k
        items: list[tuple[Request, int, TokenLogprob | None]] = []
        for i, (req, epoch, token) in enumerate(zip(plan.sampled, plan.epochs, result.token_ids)):
            if req.finished or req.epoch != epoch:
                continue  # ended or preempted after this step was sent: the token is void
            lp = _logprob(result, i, k, req.output.top_logprobs) if req.output.logprobs else None
            items.append((req, token, lp))
        self.outputs.process(items)

    def _deliver_traced(
        self, plan: StepPlan, result: shard_pb2.StepResult, period: float, fill_s: float
    ) -> None:
        """``_deliver``, then the step's line in the step trace."""
        assert self.trace is not None
        # Exact: a token voided by a preemption or an end sets no first_token_at.
        first = [req for req in plan.sampled if req.first_token_at is None]
        start = time.perf_counter()
        self._deliver(plan, result)
        deliver_s = time.perf_counter() - start
        first = [req for req in first if req.first_token_at is not None]
        result_at = self._last_result_at  # this step's, set by _observe_step
        self.trace.record(
            plan, result, result_at=result_at, period=period, fill_s=fill_s, deliver_s=deliver_s, first=first
        )

    def _fail(self, plan: StepPlan | None, exc: ShardError) -> None:
        """Fail the requests of a step that failed; if the shards are gone, fail everything."""
        log.error("step failed: %s", exc)
        if plan is not None:
            for req in plan.requests:
                self.outputs.abort(req, str(exc))
        if exc.fatal:
            self.fail_all(str(exc))

    def lose_shards(self, reason: str) -> None:
        """The shards are gone: fail every live request; new ones are refused from now on."""
        self.fail_all(f"the shards are gone: {reason}")

    def fail_all(self, reason: str) -> None:
        """Fail every live request; new ones are refused from now on (``dead`` is set)."""
        if self.dead is None:
            self.dead = reason
        self._inflight.clear()
        for req in self.scheduler.live():
            try:
                self.outputs.abort(req, reason)
            except Exception:  # the bookkeeping may be what broke; the caller must still hear
                log.exception("freeing request %s failed", req.request_id)
                req.emit(RequestOutput(finish_reason=FinishReason.ABORT, error=reason))


def _deliver_prompt_logprobs(plan: StepPlan, result: shard_pb2.StepResult) -> None:
    """Attach each chunk's prompt logprobs to its request (position p scores token p + 1)."""
    values, off = result.prompt_logprobs, 0
    for req, epoch, start, n in plan.prompt_lp:
        chunk, off = values[off : off + n], off + n
        if req.finished or req.epoch != epoch:
            continue
        prompt = req.prompt_ids
        req.prompt_lps += [
            TokenLogprob(prompt[start + j + 1], v, [])
            for j, v in enumerate(chunk)
            if start + j + 1 < len(prompt)
        ]


def _logprob(result: shard_pb2.StepResult, i: int, k: int, want: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if k and want:
        ids = result.top_ids[i * k : (i + 1) * k]
        lps = result.top_logprobs[i * k : (i + 1) * k]
        top = [(t, lp) for t, lp in zip(ids, lps) if t >= 0][:want]
    return TokenLogprob(result.token_ids[i], result.logprobs[i], top)
