"""`lightllm-grpc bench serve`: its datasets and metrics (pure), and runs against a live server."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lightllm_grpc.bench.datasets import (
    Vocab,
    length_range,
    multi_turn_conversations,
    random_requests,
    shared_prefix_requests,
    uniform_requests,
)
from lightllm_grpc.bench.metrics import Chunk, Distribution, RequestOutcome, summarize
from lightllm_grpc.bench.report import format_summary
from lightllm_grpc.bench.serve import arrival_times
from lightllm_grpc.bench.server import LocalServer

VOCAB = Vocab(100, 600, frozenset({101, 102}))


# --- datasets ---------------------------------------------------------------------------


def test_length_range_bounds() -> None:
    assert length_range(100, 0.0) == (100, 100)
    assert length_range(100, 0.5) == (50, 150)
    assert length_range(1, 0.9) == (1, 1)  # never an empty prompt
    with pytest.raises(ValueError):
        length_range(100, 1.0)


def test_random_requests_lengths_ids_and_seed() -> None:
    reqs = random_requests(200, 40, 10, 0.25, VOCAB, seed=3)
    assert len(reqs) == 200
    assert {len(r.prompt) for r in reqs} <= set(range(30, 51))
    assert {r.output_len for r in reqs} <= set(range(7, 13))
    assert len({len(r.prompt) for r in reqs}) > 10  # the range is actually used
    ids = {t for r in reqs for t in r.prompt}
    assert min(ids) >= 100 and max(ids) < 600 and not ids & {101, 102}
    assert random_requests(200, 40, 10, 0.25, VOCAB, seed=3) == reqs
    assert random_requests(200, 40, 10, 0.25, VOCAB, seed=4) != reqs
    fixed = random_requests(5, 16, 8, 0.0, VOCAB, seed=0)
    assert all(len(r.prompt) == 16 and r.output_len == 8 for r in fixed)


def test_uniform_requests_cover_inclusive_ranges() -> None:
    reqs = uniform_requests(400, (64, 80), (3, 5), VOCAB, seed=2)
    assert {len(r.prompt) for r in reqs} == set(range(64, 81))  # both ends reached
    assert {r.output_len for r in reqs} == {3, 4, 5}
    assert uniform_requests(400, (64, 80), (3, 5), VOCAB, seed=2) == reqs
    # the random dataset is this with bounds from the range ratio: same seed, same prompts
    assert random_requests(50, 40, 10, 0.25, VOCAB, seed=3) == uniform_requests(
        50, length_range(40, 0.25), length_range(10, 0.25), VOCAB, seed=3
    )
    with pytest.raises(ValueError):
        uniform_requests(1, (10, 9), (1, 1), VOCAB, seed=0)
    with pytest.raises(ValueError):
        uniform_requests(1, (0, 9), (1, 1), VOCAB, seed=0)


def test_shared_prefix_groups_share_prefixes_and_interleave() -> None:
    reqs = shared_prefix_requests(4, 5, 32, 6, 9, VOCAB, seed=1)
    assert len(reqs) == 20
    assert all(len(r.prompt) == 38 and r.output_len == 9 for r in reqs)
    groups = Counter(r.prompt[:32] for r in reqs)
    assert sorted(groups.values()) == [5, 5, 5, 5]
    assert len({r.prompt[32:] for r in reqs}) == 20  # suffixes distinct
    # Shuffled across groups, not 5 of one group then 5 of the next.
    order = [r.prompt[:32] for r in reqs]
    assert any(order[i] != order[i + 1] for i in range(4))
    assert shared_prefix_requests(4, 5, 32, 6, 9, VOCAB, seed=1) == reqs
    assert shared_prefix_requests(4, 5, 32, 6, 9, VOCAB, seed=2) != reqs


def test_shared_prefix_suffixes_stay_distinct_in_a_tiny_vocabulary() -> None:
    tiny = Vocab(0, 3)
    reqs = shared_prefix_requests(1, 9, 4, 2, 1, tiny, seed=0)
    assert len({r.prompt for r in reqs}) == 9  # all 3**2 suffixes, none twice
    with pytest.raises(ValueError):
        shared_prefix_requests(1, 10, 4, 2, 1, tiny, seed=0)


def test_multi_turn_conversations_shape_and_seed() -> None:
    convs = multi_turn_conversations(3, 4, 12, 7, VOCAB, seed=5)
    assert len(convs) == 3
    assert all(len(c.turns) == 4 and c.output_len == 7 for c in convs)
    assert all(len(t) == 12 for c in convs for t in c.turns)
    assert multi_turn_conversations(3, 4, 12, 7, VOCAB, seed=5) == convs


def test_vocab_of_model_skips_low_ids_and_eos() -> None:
    v = Vocab.of_model(2048, (2,))
    assert (v.low, v.high) == (512, 2048)
    assert Vocab.of_model(128256, (128001,)).low == 1000
    with pytest.raises(ValueError):
        Vocab(5, 6, frozenset({5}))


# --- arrivals -----------------------------------------------------------------------------


def test_arrival_times_inf_and_poisson() -> None:
    assert arrival_times(4, math.inf, 0) == [0.0] * 4
    times = arrival_times(4000, 20.0, seed=0)
    assert times == sorted(times) and times[0] == 0.0
    assert times[-1] / 3999 == pytest.approx(1 / 20, rel=0.05)  # mean gap 1/rate
    assert arrival_times(50, 20.0, seed=0) == times[:50]


# --- metrics ------------------------------------------------------------------------------


def _outcome(*chunks: tuple[float, int], e2e: float, prompt: int = 10, cached: int = 0) -> RequestOutcome:
    return RequestOutcome(tuple(Chunk(t, n) for t, n in chunks), e2e, prompt, cached)


def test_request_ttft_itl_tpot() -> None:
    o = _outcome((0.1, 1), (0.2, 1), (0.5, 3), (0.6, 1), e2e=0.7)
    assert o.ttft == 0.1
    assert o.output_tokens == 6
    # the 3-token message after a 0.3 s gap counts as three gaps of 0.1 s
    assert o.itls() == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1])
    assert sum(o.itls()) == pytest.approx(0.6 - 0.1)
    assert o.tpot == pytest.approx((0.7 - 0.1) / 5)
    first_carries_two = _outcome((0.1, 2), (0.3, 1), e2e=0.3)
    assert first_carries_two.itls() == pytest.approx([0.2])
    one = _outcome((0.1, 1), e2e=0.2)
    assert one.tpot is None and one.itls() == []
    assert RequestOutcome(error="UNAVAILABLE").ttft is None


def test_summarize_counts_throughput_and_hit_share() -> None:
    outcomes = [
        _outcome((0.1, 1), (0.2, 1), e2e=0.2, prompt=100, cached=60),
        _outcome((0.3, 2), (0.5, 2), e2e=0.6, prompt=50, cached=0),
        RequestOutcome(error="RESOURCE_EXHAUSTED"),
        RequestOutcome(error="UNAVAILABLE"),
        RequestOutcome(error="UNAVAILABLE"),
    ]
    s = summarize(outcomes, duration_s=2.0)
    assert s.completed == 2
    assert s.failed == {"RESOURCE_EXHAUSTED": 1, "UNAVAILABLE": 2} and s.num_failed == 3
    assert (s.total_input_tokens, s.total_output_tokens) == (150, 6)
    assert s.request_throughput == 1.0
    assert (s.input_token_throughput, s.output_token_throughput) == (75.0, 3.0)
    assert s.prefix_cache_hit_share == pytest.approx(60 / 150)
    assert s.ttft_ms.mean == pytest.approx(200.0) and s.ttft_ms.median == pytest.approx(200.0)
    # TPOT: (0.2-0.1)/1 and (0.6-0.3)/3
    assert s.tpot_ms.mean == pytest.approx(100.0)
    # ITL: 0.1 once, then 0.2/2 twice
    assert s.itl_ms.mean == pytest.approx(100.0)
    text = format_summary(s)
    assert "Successful requests:" in text and "UNAVAILABLE:" in text and "P99 ITL (ms):" in text
    with pytest.raises(ValueError):
        summarize(outcomes, 0.0)


def test_distribution_percentiles() -> None:
    d = Distribution.of_seconds([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert d.mean == pytest.approx(50.5)
    assert d.median == pytest.approx(50.5)
    assert d.p90 == pytest.approx(90.1)
    assert d.p99 == pytest.approx(99.01)
    assert Distribution.of_seconds([]) == Distribution()


# --- end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = LocalServer(None, tmp_path_factory.mktemp("bench") / "log", "--max-total-tokens", "4096")
    yield srv
    srv.stop()


def _bench_serve(server: LocalServer, out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    cmd = [sys.executable, "-m", "lightllm_grpc.cli", "bench", "serve", "--target", server.address]
    proc = subprocess.run(
        [*cmd, "--json", str(out), "--seed", "1", *args], capture_output=True, text=True, timeout=120
    )
    return proc, json.loads(out.read_text()) if out.exists() else {}


def test_bench_serve_random(server: LocalServer, tmp_path: Path) -> None:
    proc, res = _bench_serve(
        server,
        tmp_path / "random.json",
        *("--num-prompts", "8", "--random-input-len", "16", "--random-output-len", "8"),
        *("--ignore-eos", "--max-concurrency", "4"),
    )
    assert proc.returncode == 0, proc.stderr + server.log()
    assert res["completed"] == 8 and res["failed"] == {}
    assert res["total_input_tokens"] == 8 * 16 and res["total_output_tokens"] == 64
    assert res["ttft_ms"]["mean"] > 0 and res["tpot_ms"]["median"] > 0 and res["itl_ms"]["p99"] > 0
    assert res["args"]["request_rate"] == "inf"
    assert "Serving Benchmark Result" in proc.stdout and "Mean TTFT (ms):" in proc.stdout


def test_bench_serve_counts_failures_by_status(server: LocalServer, tmp_path: Path) -> None:
    # Prompts longer than the 4,096-token pool are refused; the run reports them, exits 1.
    proc, res = _bench_serve(
        server, tmp_path / "fail.json", "--num-prompts", "2", "--random-input-len", "5000", "--disable-tqdm"
    )
    assert proc.returncode == 1
    assert res["completed"] == 0 and sum(res["failed"].values()) == 2
    assert set(res["failed"]) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}


def test_bench_serve_multi_turn_feeds_answers_back(server: LocalServer, tmp_path: Path) -> None:
    proc, res = _bench_serve(
        server,
        tmp_path / "multi.json",
        *("--dataset", "multi-turn", "--num-conversations", "2", "--turns", "2"),
        *("--turn-input-len", "16", "--output-len", "8", "--ignore-eos", "--request-rate", "20"),
    )
    assert proc.returncode == 0, proc.stderr + server.log()
    assert res["completed"] == 4 and res["total_output_tokens"] == 32
    # turn 1: 16 new tokens; turn 2: those 16 + the 8 answered + 16 new
    assert res["total_input_tokens"] == 2 * (16 + 40)
    assert 0.0 <= res["prefix_cache_hit_share"] <= 1.0
