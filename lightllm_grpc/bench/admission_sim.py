"""Scheduling by simulation: the real ``Scheduler`` against a fake shard and a step-time model.

It compares admission rules (KV use, preemptions, throughput) and per-step prefill policies
(TTFT, TPOT and inter-token latency under Poisson arrivals; docs/scheduling.md).

No GPU, no engine, no asyncio. The loop is the engine's (``scheduler/engine.py``): up to
``PIPELINE_DEPTH`` steps in flight, the next step built before the previous one's tokens
are delivered, and tokens of a step sent before its request ended or was preempted dropped
by epoch, so preemption and the pipelined paths run as in production.

The fake shard knows, for each sampled row, which output position its token is for (the
row's KV length minus the prompt when the step was built) and answers with a token that is
a function of the request and that position. Delivery asserts that position equals the
request's output length, so a lost or duplicated token under preemption fails at once.

Simulated time is a step-time model (``StepCost``, optionally with multiplicative noise),
and each step's simulated duration is fed back to the scheduler as the engine feeds the
measured one; output lengths are drawn in advance (long-tailed, or uniform) and play the
role of EOS.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from lightllm_grpc.config import SchedulerConfig
from lightllm_grpc.scheduler.engine import PIPELINE_DEPTH
from lightllm_grpc.scheduler.request import (
    FinishReason,
    OutputOptions,
    Request,
    SamplingOptions,
    State,
    StopOptions,
)
from lightllm_grpc.scheduler.scheduler import Scheduler, StepPlan

VOCAB = 32_000


@dataclass(frozen=True)
class StepCost:
    """Milliseconds one step takes on the GPU: ``a + e*[prefill > 0] + b*rows + c*prefill + d*context``.

    Defaults approximate an 8B Llama-3 on one H100 (BENCHMARKS.md): ``a`` the weight read of a
    decode step (batch-1 graph 6.07 ms), ``b`` per decode row (GEMM compute and sampling),
    ``c`` per prefill token (~16 GFLOP/token at ~270 TFLOP/s; pessimistic for short prompts,
    so recompute after preemption is not undercharged), ``d`` per token of context a decode
    row attends over (128 KiB of K/V per token at ~3.3 TB/s): without it a bigger batch would
    look free of the KV reads it brings. ``e`` is the fixed cost of a step that prefills at
    all (its eager launch; it was a second read of every weight before a step's prefill and
    decode rows shared one forward pass); 0 by default, so
    the admission figures in BENCHMARKS.md stay reproducible.
    """

    a_ms: float = 6.0
    b_ms_per_row: float = 0.03
    c_ms_per_prefill_token: float = 0.06
    d_ms_per_context_token: float = 0.00004
    e_ms_per_prefill_step: float = 0.0

    def seconds(self, rows: int, prefill_tokens: int, context_tokens: int) -> float:
        ms = (
            self.a_ms
            + (self.e_ms_per_prefill_step if prefill_tokens else 0.0)
            + self.b_ms_per_row * rows
            + self.c_ms_per_prefill_token * prefill_tokens
            + self.d_ms_per_context_token * context_tokens
        )
        return ms / 1e3


@dataclass(frozen=True)
class Workload:
    """Prompts ~U[prompt_min, prompt_max]; output lengths lognormal with the given median and
    p99, clipped to [1, max_new_tokens]; arrivals all at once or Poisson at ``request_rate``.

    With ``output_max`` set, output lengths are ~U[output_min, output_max] instead and each is
    also the request's ``max_new_tokens`` (as ``bench serve --ignore-eos`` sends them).
    """

    requests: int = 2000
    prompt_min: int = 128
    prompt_max: int = 512
    output_median: float = 200.0
    output_p99: float = 2000.0
    max_new_tokens: int = 4096
    request_rate: float = math.inf
    seed: int = 0
    output_min: int = 0
    output_max: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1 or not 1 <= self.prompt_min <= self.prompt_max:
            raise ValueError("need requests >= 1 and 1 <= prompt_min <= prompt_max")
        if not 0 < self.output_median < self.output_p99:
            raise ValueError("need 0 < output_median < output_p99")
        if self.max_new_tokens < 1 or self.request_rate <= 0:
            raise ValueError("need max_new_tokens >= 1 and request_rate > 0")
        if self.output_max and not 1 <= self.output_min <= self.output_max <= self.max_new_tokens:
            raise ValueError("need 1 <= output_min <= output_max <= max_new_tokens")


@dataclass(frozen=True)
class SimRequest:
    prompt_ids: list[int]
    output_len: int  # where this request stops (its EOS), at most max_new_tokens
    arrival_s: float
    max_new_tokens: int = 0  # 0: the workload's


def sample_workload(w: Workload) -> list[SimRequest]:
    rng = np.random.default_rng(w.seed)
    sigma = math.log(w.output_p99 / w.output_median) / statistics.NormalDist().inv_cdf(0.99)
    outs = rng.lognormal(math.log(w.output_median), sigma, w.requests)
    outs = np.clip(np.rint(outs), 1, w.max_new_tokens).astype(int)
    lens = rng.integers(w.prompt_min, w.prompt_max + 1, w.requests)
    if w.output_max:
        outs = rng.integers(w.output_min, w.output_max + 1, w.requests)
    if math.isinf(w.request_rate):
        arrivals = np.zeros(w.requests)
    else:
        arrivals = np.cumsum(rng.exponential(1.0 / w.request_rate, w.requests))
    # Random token ids: prompts share at most a few leading tokens, as unrelated prompts do.
    return [
        SimRequest(rng.integers(0, VOCAB, int(n)).tolist(), int(o), float(t), int(o) if w.output_max else 0)
        for n, o, t in zip(lens, outs, arrivals)
    ]


@dataclass(frozen=True)
class SimConfig:
    kv_tokens: int = 200_000
    max_running_requests: int = 256
    max_prefill_tokens: int = 8192
    admission: str = "past-future"
    admission_quantile: float = 0.6
    prefix_cache: bool = True
    cost: StepCost = field(default_factory=StepCost)
    step_time_budget_ms: float = SchedulerConfig.step_time_budget_ms  # 0: fixed token budget
    min_prefill_tokens: int = SchedulerConfig.min_prefill_tokens
    # Each step's simulated time is multiplied by exp(N(0, cost_noise)): the learned model
    # sees noisy samples, as the engine does.
    cost_noise: float = 0.0

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_running_requests=self.max_running_requests,
            max_prefill_tokens=self.max_prefill_tokens,
            step_time_budget_ms=self.step_time_budget_ms,
            min_prefill_tokens=self.min_prefill_tokens,
            prefix_cache=self.prefix_cache,
            admission=self.admission,
            admission_quantile=self.admission_quantile,
        )

    @property
    def label(self) -> str:
        if self.admission == "conservative":
            return "conservative"
        return f"past-future q={self.admission_quantile:g}"

    @property
    def prefill_policy(self) -> str:
        if not self.step_time_budget_ms:
            return f"fixed {self.max_prefill_tokens} tokens"
        lo, hi = self.min_prefill_tokens, self.max_prefill_tokens
        return f"{self.step_time_budget_ms:g} ms budget (min {lo}, max {hi})"


@dataclass
class SimResult:
    label: str
    requests: int
    steps: int
    sim_seconds: float
    output_tokens: int
    mean_batch: float  # decode rows per step, weighted by step time
    max_batch: int
    preemptions: int
    preempted_requests: int  # requests preempted at least once
    max_kv_used: int  # most slots held by live requests (cached-only tokens excluded)
    prefill_tokens: int  # includes re-prefill after preemption
    void_tokens: int  # sampled by steps sent before their request ended or was preempted
    schedule_ms_mean: float  # wall time of Scheduler.schedule() on this machine
    schedule_ms_at_full: float  # same, over steps with >= 90% of the rows decoding
    prefill_policy: str = ""
    # Latencies in simulated ms (bench/metrics.py's definitions): TTFT from arrival to the
    # step that delivers the first token; TPOT (last - first token) / (tokens - 1) per
    # request; ITL every gap between a request's tokens; step: each step's simulated time.
    ttft_ms_p50: float = 0.0
    ttft_ms_p99: float = 0.0
    tpot_ms_p50: float = 0.0
    tpot_ms_p99: float = 0.0
    itl_ms_p99: float = 0.0
    step_ms_p99: float = 0.0
    budget_limited_steps: int = 0

    @property
    def throughput(self) -> float:
        return self.output_tokens / self.sim_seconds

    @property
    def preempted_share(self) -> float:
        return self.preempted_requests / self.requests

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "throughput": self.throughput, "preempted_share": self.preempted_share}


class InvariantError(AssertionError):
    """The scheduler broke a bookkeeping rule the simulation checks."""


def output_token(index: int, pos: int) -> int:
    """The fake model: request ``index``'s token at output position ``pos``."""
    return (index * 1_000_003 + pos * 7_919 + 11) % VOCAB


@dataclass
class _Sent:
    """A step in flight: the plan, the output position of each sampled token, its cost."""

    plan: StepPlan
    positions: list[int]
    seconds: float


class _Simulation:
    def __init__(self, reqs: list[SimRequest], cfg: SimConfig, max_new_tokens: int) -> None:
        self.cfg = cfg
        self.sched = Scheduler(cfg.scheduler_config(), cfg.kv_tokens, cfg.max_running_requests)
        self.specs = reqs
        self.reqs = [_request(i, r, max_new_tokens) for i, r in enumerate(reqs)]
        self.index = {id(r): i for i, r in enumerate(self.reqs)}
        self.finishes = [0] * len(reqs)
        self.pending = deque(range(len(reqs)))  # not yet arrived, in arrival order
        self.inflight: deque[_Sent] = deque()
        self.clock = 0.0
        self.busy = 0.0
        self.row_seconds = 0.0
        self.steps = self.max_batch = self.max_used = self.prefill = self.void = self.delivered = 0
        self.sched_wall: list[float] = []
        self.sched_wall_full: list[float] = []
        self.noise = np.random.default_rng(1)
        self.first_at = [math.nan] * len(reqs)  # simulated time of each request's first token
        self.last_at = [math.nan] * len(reqs)
        self.itl: list[float] = []
        self.step_s: list[float] = []

    def run(self) -> SimResult:
        while True:
            self._arrive()
            self._fill()
            if not self.inflight:
                if self.pending:
                    self.clock = max(self.clock, self.specs[self.pending[0]].arrival_s)
                    continue
                if self.sched.has_work():
                    raise InvariantError("stalled: requests wait but no step can be built")
                break
            sent = self.inflight.popleft()
            self.clock += sent.seconds  # the GPU ran it while the next one was being built
            self.sched.observe_step(sent.plan, sent.seconds)  # as the engine does, before the next build
            self._arrive()
            self._fill()  # keep the pipeline full before delivering, as the engine does
            self._deliver(sent)
            self._check_pool()
        self._check_end()
        return self._result()

    def _arrive(self) -> None:
        while self.pending and self.specs[self.pending[0]].arrival_s <= self.clock:
            self.sched.submit(self.reqs[self.pending.popleft()])

    def _fill(self) -> None:
        while len(self.inflight) < PIPELINE_DEPTH:
            t0 = time.perf_counter()
            plan = self.sched.schedule()
            wall = time.perf_counter() - t0
            if plan is None:
                return
            self.inflight.append(self._sent(plan, wall))
            self._check_pool()

    def _sent(self, plan: StepPlan, wall: float) -> _Sent:
        msg = plan.message
        rows, prefill = len(msg.decode.rows), len(msg.prefill.token_ids)
        decodes = plan.requests[len(plan.requests) - rows :] if rows else []
        context = sum(r.num_kv for r in decodes)
        seconds = self.cfg.cost.seconds(rows, prefill, context)
        if self.cfg.cost_noise:
            seconds *= float(np.exp(self.noise.normal(0.0, self.cfg.cost_noise)))
        self.step_s.append(seconds)
        # What the shard's row holds when it runs this step: K/V of prompt + output so far.
        positions = [r.num_kv - r.prompt_len for r in plan.sampled]
        self.steps += 1
        self.busy += seconds
        self.row_seconds += rows * seconds
        self.max_batch = max(self.max_batch, rows)
        self.prefill += prefill
        self.sched_wall.append(wall)
        if rows >= 0.9 * self.sched.rows.capacity:
            self.sched_wall_full.append(wall)
        for req in self.sched.live():
            if req.scheduled_tokens > req.stopping.max_new_tokens:
                raise InvariantError(f"{req.request_id} scheduled past max_new_tokens")
        return _Sent(plan, positions, seconds)

    def _deliver(self, sent: _Sent) -> None:
        plan = sent.plan
        for req, epoch, pos in zip(plan.sampled, plan.epochs, sent.positions):
            if req.finished or req.epoch != epoch:
                self.void += 1
                continue  # ended or preempted after this step was sent: the token is void
            i = self.index[id(req)]
            if pos != len(req.output_ids):
                raise InvariantError(
                    f"{req.request_id}: shard sampled position {pos}, stream is at {len(req.output_ids)}"
                )
            req.output_ids.append(output_token(i, pos))
            self.delivered += 1
            if pos == 0:
                self.first_at[i] = self.clock
            else:
                self.itl.append(self.clock - self.last_at[i])
            self.last_at[i] = self.clock
            n = len(req.output_ids)
            if n > req.stopping.max_new_tokens:
                raise InvariantError(f"{req.request_id} got more than max_new_tokens")
            if n == self.specs[i].output_len or n == req.stopping.max_new_tokens:
                reason = FinishReason.LENGTH if n == req.stopping.max_new_tokens else FinishReason.STOP
                self.sched.finish(req, reason)
                self.finishes[i] += 1

    def _check_pool(self) -> None:
        s, st = self.sched, self.sched.stats()
        if st.used + st.free + st.cached != st.total or st.used < 0 or st.free < 0:
            raise InvariantError(f"pool accounting off: {st}")
        # Every allocated slot is in the tree or owned by exactly one live request.
        tree = s.cache.total_tokens if s.cache else 0
        own = sum(r.num_kv - r.tree_len + sum(d.size for d in r.dup_slots) for r in s.live())
        if st.total - st.free != tree + own:
            raise InvariantError(f"slots allocated {st.total - st.free} != tree {tree} + owned {own}")
        self.max_used = max(self.max_used, st.used)

    def _check_end(self) -> None:
        st = self.sched.stats()
        if st.used != 0 or self.sched.rows.num_free != self.sched.rows.capacity or self.sched.by_id:
            raise InvariantError(f"leak at the end: {st}, rows free {self.sched.rows.num_free}")
        for i, (req, spec) in enumerate(zip(self.reqs, self.specs)):
            if self.finishes[i] != 1 or req.state is not State.FINISHED:
                raise InvariantError(f"{req.request_id} finished {self.finishes[i]} times")
            if req.output_ids != [output_token(i, p) for p in range(spec.output_len)]:
                raise InvariantError(f"{req.request_id}: output differs from its predetermined tokens")

    def _latencies(self) -> dict[str, float]:
        ttft = [f - s.arrival_s for f, s in zip(self.first_at, self.specs)]
        tpot = [
            (last - first) / (s.output_len - 1)
            for first, last, s in zip(self.first_at, self.last_at, self.specs)
            if s.output_len > 1
        ]
        p = lambda v, q: float(np.percentile(np.asarray(v) * 1e3, q)) if v else 0.0  # noqa: E731
        return {
            "ttft_ms_p50": p(ttft, 50), "ttft_ms_p99": p(ttft, 99),
            "tpot_ms_p50": p(tpot, 50), "tpot_ms_p99": p(tpot, 99),
            "itl_ms_p99": p(self.itl, 99), "step_ms_p99": p(self.step_s, 99),
        }  # fmt: skip

    def _result(self) -> SimResult:
        walls, full = self.sched_wall, self.sched_wall_full
        return SimResult(
            label=self.cfg.label,
            requests=len(self.reqs),
            steps=self.steps,
            sim_seconds=self.clock,
            output_tokens=self.delivered,
            mean_batch=self.row_seconds / self.busy if self.busy else 0.0,
            max_batch=self.max_batch,
            preemptions=self.sched.counters.preemptions,
            preempted_requests=sum(r.preemptions > 0 for r in self.reqs),
            max_kv_used=self.max_used,
            prefill_tokens=self.prefill,
            void_tokens=self.void,
            schedule_ms_mean=1e3 * sum(walls) / len(walls) if walls else 0.0,
            schedule_ms_at_full=1e3 * sum(full) / len(full) if full else math.nan,
            prefill_policy=self.cfg.prefill_policy,
            budget_limited_steps=self.sched.counters.budget_limited_steps,
            **self._latencies(),
        )


def _request(i: int, spec: SimRequest, max_new_tokens: int) -> Request:
    return Request(
        request_id=f"r{i}",
        prompt_ids=spec.prompt_ids,
        sampling=SamplingOptions(temperature=0.0),
        stopping=StopOptions(max_new_tokens=spec.max_new_tokens or max_new_tokens, ignore_eos=True),
        output=OutputOptions(),
    )


def simulate(reqs: list[SimRequest], cfg: SimConfig, max_new_tokens: int) -> SimResult:
    """Run ``reqs`` through a fresh scheduler; raise ``InvariantError`` on any broken rule."""
    return _Simulation(reqs, cfg, max_new_tokens).run()


def format_table(results: list[SimResult]) -> str:
    head = (
        "| admission | mean batch | max batch | sim time (s) | output tok/s | preemptions "
        "| requests preempted | max KV used | prefill tokens | schedule() ms mean / at ≥90% rows |"
    )
    lines = [head, "|" + " --- |" * 10]
    for r in results:
        lines.append(
            f"| {r.label} | {r.mean_batch:.1f} | {r.max_batch} | {r.sim_seconds:.1f} "
            f"| {r.throughput:,.0f} | {r.preemptions} | {100 * r.preempted_share:.1f}% "
            f"| {r.max_kv_used:,} | {r.prefill_tokens:,} "
            f"| {r.schedule_ms_mean:.2f} / {_ms(r.schedule_ms_at_full)} |"
        )
    return "\n".join(lines)


def format_latency_table(results: list[SimResult]) -> str:
    head = (
        "| admission | prefill per step | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p99 (ms) "
        "| step p99 (ms) | output tok/s | mean batch | steps the budget held prompts back |"
    )
    lines = [head, "|" + " --- |" * 9]
    for r in results:
        lines.append(
            f"| {r.label} | {r.prefill_policy} | {r.ttft_ms_p50:.0f} / {r.ttft_ms_p99:.0f} "
            f"| {r.tpot_ms_p50:.1f} / {r.tpot_ms_p99:.1f} | {r.itl_ms_p99:.1f} | {r.step_ms_p99:.1f} "
            f"| {r.throughput:,.0f} | {r.mean_batch:.1f} | {r.budget_limited_steps:,} / {r.steps:,} |"
        )
    return "\n".join(lines)


def _ms(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.2f}"  # no step reached that many rows
