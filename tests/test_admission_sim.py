"""The admission simulation: the real scheduler, pipelined two deep, under both rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lightllm_grpc.bench import admission_sim as sim
from lightllm_grpc.cli import main

SMALL = sim.Workload(
    requests=200, prompt_min=16, prompt_max=64, output_median=50, output_p99=500, max_new_tokens=1024
)


@pytest.fixture(scope="module")
def small() -> list[sim.SimRequest]:
    return sim.sample_workload(SMALL)


def run(reqs: list[sim.SimRequest], **cfg: object) -> sim.SimResult:
    return sim.simulate(reqs, sim.SimConfig(max_running_requests=64, **cfg), SMALL.max_new_tokens)  # type: ignore[arg-type]


def test_workload_is_long_tailed() -> None:
    w = sim.Workload(requests=4000, prompt_min=4, prompt_max=8)
    outs = np.array([r.output_len for r in sim.sample_workload(w)])
    assert 180 <= np.median(outs) <= 220
    assert 1600 <= np.percentile(outs, 99) <= 2500
    assert outs.min() >= 1 and outs.max() <= w.max_new_tokens


def test_past_future_batches_more_than_conservative(small: list[sim.SimRequest]) -> None:
    # simulate() checks the invariants every step and raises InvariantError on any break.
    cons = run(small, kv_tokens=20_000, admission="conservative")
    pf = run(small, kv_tokens=20_000, admission="past-future")
    total = sum(r.output_len for r in small)
    for res in (cons, pf):
        assert res.output_tokens == total
        assert res.max_kv_used <= 20_000
    assert cons.preemptions == 0  # worst-case reservations never run out
    assert pf.mean_batch > cons.mean_batch
    assert pf.sim_seconds < cons.sim_seconds


def test_tiny_pool_preempts_without_losing_tokens(small: list[sim.SimRequest]) -> None:
    res = run(small, kv_tokens=3_000, admission_quantile=0.3)
    assert res.preemptions > 0 and res.preempted_requests > 0
    assert res.output_tokens == sum(r.output_len for r in small)
    assert res.prefill_tokens > sum(len(r.prompt_ids) for r in small)  # resumed requests re-prefilled


def test_stale_tokens_would_be_caught(small: list[sim.SimRequest]) -> None:
    """Delivering tokens of steps sent before a preemption must trip the position check."""

    class IgnoresEpochs(sim._Simulation):
        def _deliver(self, sent: sim._Sent) -> None:
            sent.plan.epochs = [r.epoch for r in sent.plan.sampled]
            super()._deliver(sent)

    cfg = sim.SimConfig(kv_tokens=3_000, max_running_requests=64, admission_quantile=0.3)
    with pytest.raises(sim.InvariantError, match="position"):
        IgnoresEpochs(small, cfg, SMALL.max_new_tokens).run()


def test_poisson_arrivals_without_prefix_cache() -> None:
    w = sim.Workload(requests=100, prompt_min=16, prompt_max=32, output_median=20, output_p99=200,
                     max_new_tokens=256, request_rate=50.0)  # fmt: skip
    reqs = sim.sample_workload(w)
    res = sim.simulate(reqs, sim.SimConfig(kv_tokens=2_000, max_running_requests=32, prefix_cache=False), 256)
    assert res.output_tokens == sum(r.output_len for r in reqs)
    assert res.sim_seconds >= reqs[-1].arrival_s


def test_cli_prints_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim.json"
    argv = ["bench", "sim", "--requests", "40", "--kv-tokens", "8000", "--max-running-requests", "16",
            "--prompt-min", "8", "--prompt-max", "16", "--output-median", "20", "--output-p99", "200",
            "--max-new-tokens", "256", "--quantiles", "0.6,0.9", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| conservative |" in table and "| past-future q=0.9 |" in table
    record = json.loads(out.read_text())
    labels = [r["label"] for r in record["results"]]
    assert labels == ["conservative", "past-future q=0.6", "past-future q=0.9"]
    assert main([*argv[:-2], "--quantiles", "1.5"]) == 2
