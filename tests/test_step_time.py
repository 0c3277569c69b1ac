"""The per-step time budget: the learned step-time model and the scheduler's prefill choice."""

from __future__ import annotations

import numpy as np
import pytest

from lightllm_grpc.bench import admission_sim as sim
from lightllm_grpc.config import SchedulerConfig
from lightllm_grpc.scheduler.request import OutputOptions, Request, SamplingOptions, StopOptions
from lightllm_grpc.scheduler.scheduler import DRAIN_STEPS, Scheduler
from lightllm_grpc.scheduler.step_time import PRIOR, StepTimeModel

TRUE = np.array([4e-3, 3e-3, 2e-5, 2.5e-5, 3e-8])  # a, e (prefill step), b (row), c (prefill), d (context)


def samples(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, 257, n)
    prefill = np.where(rng.random(n) < 0.5, rng.integers(1, 4097, n), 0)
    context = rows * rng.integers(64, 1500, n)
    return rows, prefill, context


def truth(rows: np.ndarray, prefill: np.ndarray, context: np.ndarray) -> np.ndarray:
    a, e, b, c, d = TRUE
    return a + e * (prefill > 0) + b * rows + c * prefill + d * context


def feed(model: StepTimeModel, rows, prefill, context, seconds) -> None:
    for r, p, c, t in zip(rows, prefill, context, seconds):
        model.observe(int(r), int(p), int(c), float(t))


def test_fit_recovers_known_coefficients() -> None:
    model = StepTimeModel(window=512)
    rows, prefill, context = samples(512)
    feed(model, rows, prefill, context, truth(rows, prefill, context))
    model.refit()
    np.testing.assert_allclose(model.coeffs, TRUE, rtol=0.02)


def test_fit_is_robust_to_noise_and_outliers() -> None:
    rng = np.random.default_rng(1)
    model = StepTimeModel(window=512)
    rows, prefill, context = samples(512, seed=2)
    t = truth(rows, prefill, context) * np.exp(rng.normal(0, 0.05, rows.size))  # 5% noise
    bad = rng.random(rows.size) < 0.05
    t[bad] *= rng.uniform(3, 50, bad.sum())  # 5% GC pauses, compiles: 3x-50x slower
    t[0] = 5.0  # the first step compiled kernels for seconds
    feed(model, rows, prefill, context, t)
    model.refit()
    # What matters is the prediction over the range the scheduler asks about.
    r, p, c = samples(200, seed=3)
    np.testing.assert_allclose([model.predict(*x) for x in zip(r, p, c)], truth(r, p, c), rtol=0.06)
    assert (model.coeffs >= 0).all()


def test_prior_until_enough_samples_and_no_negative_coefficients() -> None:
    model = StepTimeModel(min_samples=16)
    np.testing.assert_array_equal(model.coeffs, PRIOR)
    assert model.predict(0, 0, 0) == PRIOR[0]
    for _ in range(15):
        model.observe(10, 0, 1000, 0.5)
    assert not model.learned and model.predict(10, 0, 1000) < 0.05  # still the prior
    model.observe(0, 0, 0, 1.0)  # release-only steps and untimed steps are no samples
    model.observe(10, 0, 1000, 0.0)
    assert model.samples == 15
    model.observe(10, 0, 1000, 0.5)
    assert model.learned and model.predict(10, 0, 1000) == pytest.approx(0.5, rel=0.05)
    # Constant decode-only steps say nothing of prefill: its cost stays near the prior's.
    assert model.coeffs[3] == pytest.approx(PRIOR[3], rel=0.5)
    assert (model.coeffs >= 0).all()


def test_prefill_room_fills_the_budget() -> None:
    model = StepTimeModel(prior=tuple(TRUE))
    room = model.prefill_room(100, 50_000, 0.030)
    assert model.predict(100, int(room), 50_000) == pytest.approx(0.030, rel=1e-3)
    assert model.prefill_room(2000, 5_000_000, 0.030) == 0.0  # decode alone is over budget


# ---- the scheduler's choice ---------------------------------------------------------------
def request(i: int, prompt_len: int, max_new: int = 10_000) -> Request:
    return Request(
        request_id=f"r{i}",
        prompt_ids=[(i * 13 + j) % 900 + 20 for j in range(prompt_len)],
        sampling=SamplingOptions(temperature=0.0),
        stopping=StopOptions(max_new_tokens=max_new, ignore_eos=True),
        output=OutputOptions(),
    )


def plans(budget_ms: float, steps: int = 60, min_prefill: int = 64, cap: int = 2048, prompts: int = 20):
    cfg = SchedulerConfig(
        max_running_requests=64, max_prefill_tokens=cap, step_time_budget_ms=budget_ms,
        min_prefill_tokens=min_prefill,
    )  # fmt: skip
    sched = Scheduler(cfg, 400_000, 64)
    if sched.step_time is not None:  # a known model: 5 ms + 2 ms if prefilling + 0.1 ms/row + 0.02 ms/token
        sched.step_time = StepTimeModel(prior=(5e-3, 2e-3, 1e-4, 2e-5, 0.0))
    for i in range(8):  # running requests first, then a burst of long prompts
        sched.submit(request(i, 16))
    out = [sched.schedule()]
    for i in range(8, 8 + prompts):
        sched.submit(request(i, 1500 + 37 * i))
    for _ in range(steps):
        out.append(sched.schedule())
    return sched, [p for p in out if p is not None]


def test_prefill_stays_within_the_time_budget_and_always_progresses() -> None:
    # Three prompts (~5k tokens): an eighth of the backlog is below the budget's room.
    sched, steps = plans(budget_ms=22.0, prompts=3)
    model = sched.step_time
    assert model is not None
    limited = 0
    for plan in steps[1:]:
        rows, pre = len(plan.message.decode.rows), len(plan.message.prefill.token_ids)
        assert pre <= 2048
        assert pre >= 64 or not (sched.waiting or sched.prefilling)  # progress while prompts wait
        if rows:
            predicted = model.predict(rows, pre, plan.context_tokens)
            assert predicted <= 0.022 + 1e-9 or pre <= 64
            limited += pre < 2048
    # 22 ms - 5 - 2 - 0.1 per row leaves ~ (15 - 0.1 * rows) / 0.02 tokens, well below the cap.
    assert limited >= 5
    assert sched.counters.budget_limited_steps >= 5


def test_a_backlog_drains_within_drain_steps() -> None:
    """However tight the budget, a step takes an eighth of the waiting prompt tokens (so the
    backlog shrinks geometrically, then by min_prefill_tokens a step)."""
    _, steps = plans(budget_ms=5.0, min_prefill=1, cap=4096, prompts=6)
    waiting = sum(1500 + 37 * i for i in range(8, 14))
    assert len(steps[1].message.prefill.token_ids) >= waiting // DRAIN_STEPS
    done = sum(len(p.message.prefill.token_ids) for p in steps[1 : 1 + 3 * DRAIN_STEPS])
    assert done >= 0.95 * waiting  # 1 - (7/8)^24 = 0.96


def test_minimum_prefill_when_decode_alone_is_over_budget() -> None:
    _, steps = plans(budget_ms=5.0, min_prefill=100)  # decode alone is predicted at > 5 ms
    assert all(len(p.message.prefill.token_ids) >= 100 for p in steps[1:12])


def test_budget_off_is_the_fixed_token_budget() -> None:
    """Off (0) builds byte-identical steps to a budget so large it never binds, and takes up
    to max_prefill_tokens every step."""
    sched_off, off = plans(budget_ms=0.0)
    _, huge = plans(budget_ms=1e9)
    assert sched_off.step_time is None
    assert [p.message.SerializeToString() for p in off] == [p.message.SerializeToString() for p in huge]
    assert max(len(p.message.prefill.token_ids) for p in off) == 2048


def test_no_decode_rows_means_the_full_cap() -> None:
    cfg = SchedulerConfig(max_prefill_tokens=4096, step_time_budget_ms=1.0, min_prefill_tokens=8)
    sched = Scheduler(cfg, 100_000, 16)
    for i in range(4):
        sched.submit(request(i, 2000))
    plan = sched.schedule()
    assert plan is not None and len(plan.message.prefill.token_ids) == 4096  # nobody's token waits on it


# ---- simulation: the engine's loop with a synthetic step cost -----------------------------
def test_simulated_budget_bounds_step_time_and_keeps_ttft_bounded() -> None:
    w = sim.Workload(requests=300, prompt_min=64, prompt_max=1024, output_min=8, output_max=64,
                     max_new_tokens=64, request_rate=60.0)  # fmt: skip
    reqs = sim.sample_workload(w)
    cost = sim.StepCost(a_ms=6.0, b_ms_per_row=0.02, c_ms_per_prefill_token=0.015,
                        d_ms_per_context_token=0.00002, e_ms_per_prefill_step=5.0)  # fmt: skip
    run = lambda b: sim.simulate(  # noqa: E731
        reqs, sim.SimConfig(kv_tokens=100_000, cost=cost, step_time_budget_ms=b, cost_noise=0.05), 64
    )
    fixed, timed = run(0.0), run(30.0)
    total = sum(r.output_len for r in reqs)
    assert fixed.output_tokens == timed.output_tokens == total  # invariants checked every step
    assert fixed.step_ms_p99 > 40 and timed.step_ms_p99 < 34
    assert timed.itl_ms_p99 < 0.8 * fixed.itl_ms_p99
    assert timed.ttft_ms_p99 < 2 * fixed.ttft_ms_p99
