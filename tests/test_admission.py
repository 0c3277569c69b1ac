"""Past-Future admission: the sorted-peak computation and the output-length estimate."""

from __future__ import annotations

import itertools
import random

from lightllm_grpc.scheduler.admission import Admission, KVNeed, OutputLengths, peak, total


def _simulated_peak(needs: list[KVNeed]) -> int:
    """Step the future one token at a time: the reference for ``peak``."""
    best = 0
    for t in range(max((n.more for n in needs), default=0) + 1):
        best = max(best, sum(n.now + t for n in needs if n.more >= t))
    return best


def test_peak_equals_stepping_the_future() -> None:
    rng = random.Random(0)
    for _ in range(300):
        needs = [KVNeed(rng.randrange(0, 50), rng.randrange(0, 40)) for _ in range(rng.randrange(1, 8))]
        assert peak(needs) == _simulated_peak(needs)
        assert peak(needs) <= total(needs)


def test_peak_is_below_the_sum_when_requests_end_apart() -> None:
    needs = [KVNeed(100, 10), KVNeed(100, 1000)]
    assert peak(needs) == 1100 and total(needs) == 1210


def _reference_estimate(history: list[int], generated: int, max_new: int, q: float) -> int:
    if len(history) < 20 or generated >= max_new:
        return max_new
    points = [generated + 1, *sorted(min(x, max_new) for x in history if x > generated), max_new]
    pos = q * (len(points) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(points) - 1)
    return max(generated + 1, min(max_new, round(points[lo] + (points[hi] - points[lo]) * (pos - lo))))


def test_estimate_is_the_conditional_quantile_of_longer_past_outputs() -> None:
    rng = random.Random(1)
    for _ in range(200):
        q = rng.random()
        lengths, history = OutputLengths(window=50, quantile=q), []
        for _ in range(rng.randrange(0, 120)):
            n = rng.randrange(1, 300)
            lengths.record(n)
            history = [*history, n][-50:]
        for g, m in itertools.product(rng.sample(range(0, 320), 5), rng.sample(range(1, 400), 4)):
            assert lengths.estimate(g, m) == _reference_estimate(history, g, m, q), (g, m, q)


def test_too_little_history_means_max_new_tokens() -> None:
    lengths = OutputLengths(min_samples=20)
    for _ in range(19):
        lengths.record(5)
    assert lengths.estimate(0, 4096) == 4096
    lengths.record(5)
    assert lengths.estimate(0, 4096) < 4096
    assert lengths.estimate(10, 4096) > 10  # outlived every past request: expected to run longer


def test_rules() -> None:
    lengths = OutputLengths()
    for _ in range(30):
        lengths.record(10)
    needs = [KVNeed(100, 10), KVNeed(100, 1000)]
    assert Admission("past-future", lengths).fits(needs, 1100)
    assert not Admission("conservative", lengths).fits(needs, 1100)
    assert Admission("conservative", lengths).expected_output(0, 4096) == 4096
    assert Admission("past-future", lengths).expected_output(0, 4096) < 100
