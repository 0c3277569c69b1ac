"""Admission: will the running batch plus one more request fit the KV pool at its peak?

Two rules (see docs/scheduling.md):
- ``conservative``: every request may run to its ``max_new_tokens``; the sum of those
  worst cases must fit, so nothing is ever preempted (and the pool is mostly reserved for
  tokens that are never generated).
- ``past-future`` (LightLLM's rule): the *past*, the output lengths of recently finished
  requests, predicts each running request's remaining output (given how long it already
  is, and bounded by its own ``max_new_tokens``); the *future* peak of the batch's KV use
  over the coming steps, when the requests that finish early have given their slots back,
  must fit. A wrong guess costs a preemption, which recomputes instead of failing.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

import numpy as np

from lightllm_grpc.config import ADMISSION_RULES


@dataclass(frozen=True)
class KVNeed:
    """A request's KV in tokens: ``now`` held or still to be filled, ``more`` to come at most."""

    now: int
    more: int


def peak(needs: list[KVNeed]) -> int:
    """Highest total KV use over the future steps if each request grows one token a step
    and frees everything when it ends.

    Sorted by remaining length (longest first), while request j is still running every
    request before it is too, so use at the moment j ends is the sum of their current
    use plus j+1 times j's remaining length; the peak is the largest of these.
    """
    if not needs:
        return 0
    now = np.fromiter((n.now for n in needs), np.int64, len(needs))
    more = np.fromiter((n.more for n in needs), np.int64, len(needs))
    order = np.argsort(-more, kind="stable")
    cum_now = np.cumsum(now[order])
    return int((cum_now + more[order] * np.arange(1, len(needs) + 1)).max())


def total(needs: list[KVNeed]) -> int:
    """KV use if every request reached its bound together: the conservative sum."""
    return sum(n.now + n.more for n in needs)


class OutputLengths:
    """The output lengths of recently finished requests, and what they predict.

    ``estimate`` takes the ``quantile`` of the lengths seen that exceed what a request
    already generated (interpolated, between one more token and its ``max_new_tokens``):
    a request that has outlived most past requests is expected to run longer still.
    With fewer than ``min_samples`` lengths seen it assumes ``max_new_tokens``.
    """

    def __init__(self, window: int = 1000, min_samples: int = 20, quantile: float = 0.6) -> None:
        if not 0.0 <= quantile <= 1.0:
            raise ValueError("quantile must be in [0, 1]")
        self._recent: deque[int] = deque(maxlen=window)
        self._sorted: list[int] = []
        self.min_samples = min_samples
        self.quantile = quantile

    def __len__(self) -> int:
        return len(self._recent)

    def record(self, n: int) -> None:
        if len(self._recent) == self._recent.maxlen:
            old = self._recent[0]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._recent.append(n)
        bisect.insort(self._sorted, n)

    def estimate(self, generated: int, max_new: int) -> int:
        """Expected final output length of a request that has ``generated`` tokens so far."""
        if len(self._recent) < self.min_samples or generated >= max_new:
            return max_new
        start = bisect.bisect_right(self._sorted, generated)
        # Interpolate over the points [generated + 1, *longer (capped at max_new), max_new]
        # without building them: this runs for every running request at admission.
        last = len(self._sorted) - start + 1
        pos = self.quantile * last
        lo = int(pos)
        value = self._point(lo, start, last, generated, max_new)
        if lo < last:
            value += (self._point(lo + 1, start, last, generated, max_new) - value) * (pos - lo)
        return max(generated + 1, min(max_new, round(value)))

    def _point(self, j: int, start: int, last: int, generated: int, max_new: int) -> float:
        if j == 0:
            return generated + 1
        if j >= last:
            return max_new
        return min(self._sorted[start + j - 1], max_new)


class Admission:
    """Decides whether a candidate fits beside the running requests."""

    def __init__(self, rule: str, lengths: OutputLengths) -> None:
        if rule not in ADMISSION_RULES:
            raise ValueError(f"admission must be one of {ADMISSION_RULES}, got {rule!r}")
        self.rule = rule
        self.lengths = lengths

    def expected_output(self, generated: int, max_new: int) -> int:
        if self.rule == "conservative":
            return max_new
        return self.lengths.estimate(generated, max_new)

    def fits(self, needs: list[KVNeed], room: int) -> bool:
        use = total(needs) if self.rule == "conservative" else peak(needs)
        return use <= room
