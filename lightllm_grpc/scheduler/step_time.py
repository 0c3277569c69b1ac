"""A step's duration as a function of what it carries, learned online from measured steps.

``t ≈ a + e·[prefill_tokens > 0] + b·decode_rows + c·prefill_tokens + d·context_tokens``
(seconds), where ``context_tokens`` is the K/V the decode rows attend over and ``e`` the
fixed cost of a step that prefills at all (it runs eagerly, where a decode-only step replays a
CUDA graph; before prefill and decode rows shared one forward pass it also read every weight
a second time, which the prior still assumes: pessimistic, so a cold model errs short). The
scheduler asks it how many prefill tokens fit beside a step's decode rows within
``--step-time-budget-ms`` (docs/scheduling.md, "Per-step time budget").

The fit is least squares over the last ``window`` steps, pulled toward a prior (ridge, in
units where every feature's typical value is 1, worth ``prior_weight`` samples), with
outliers (relative residual beyond 3 robust standard deviations and 10%: a GC pause, a
first-step compile) dropped and refitted, and no negative coefficient. Until
``min_samples`` steps were seen it predicts with the prior alone. A refit costs ~0.5 ms (on
a 2-core CI-like CPU) and runs every ``refit_every`` samples; ``observe`` and
``prefill_room`` are a few float operations.
"""

from __future__ import annotations

import numpy as np

FEATURES = ("step", "prefill step", "decode row", "prefill token", "context token")
# Seconds per unit of each feature: an 8B Llama-3 in bf16 on one H100 (BENCHMARKS.md,
# "Admission by simulation"; a weight read ~6 ms), with the prefill token cost taken
# pessimistic (~3x what W2 implies) so that a cold model errs toward short steps.
PRIOR = (6e-3, 6e-3, 3e-5, 6e-5, 4e-8)
OUTLIER_SIGMAS = 3.0
MIN_OUTLIER = 0.1  # a sample within 10% of the fit is never an outlier (whatever the spread)


class StepTimeModel:
    """Predicts step duration from (decode rows, prefill tokens, context tokens).

    Contract: ``observe`` is fed every completed step's features and measured seconds;
    ``predict`` and ``prefill_room`` never fail and never return a negative time or token
    count; with fewer than ``min_samples`` observations they use ``prior``.
    """

    def __init__(
        self,
        prior: tuple[float, ...] = PRIOR,
        window: int = 512,
        min_samples: int = 16,
        refit_every: int = 16,
        prior_weight: float = 0.1,
    ) -> None:
        if window < min_samples or min_samples < 1 or refit_every < 1 or prior_weight < 0:
            raise ValueError("need window >= min_samples >= 1, refit_every >= 1, prior_weight >= 0")
        self.prior = np.asarray(prior, np.float64)
        if self.prior.shape != (len(FEATURES),) or (self.prior < 0).any():
            raise ValueError(f"prior: {len(FEATURES)} non-negative coefficients {FEATURES}")
        self.window, self.min_samples = window, min_samples
        self.refit_every, self.prior_weight = refit_every, prior_weight
        self._x = np.zeros((window, len(FEATURES)), np.float64)
        self._x[:, 0] = 1.0
        self._y = np.zeros(window, np.float64)
        self._n = 0  # samples seen in all
        self._since_fit = 0
        self.coeffs = self.prior.copy()
        self._set(self.coeffs)

    def _set(self, coeffs: np.ndarray) -> None:
        self.coeffs = coeffs
        self._a, self._e, self._b, self._c, self._d = (float(v) for v in coeffs)

    @property
    def samples(self) -> int:
        return self._n

    @property
    def learned(self) -> bool:
        return self._n >= self.min_samples

    def observe(self, rows: int, prefill: int, context: int, seconds: float) -> None:
        if not (rows or prefill) or not seconds > 0:
            return  # a release-only step, or no timing (a fake shard)
        i = self._n % self.window
        self._x[i, 1:] = (prefill > 0, rows, prefill, context)
        self._y[i] = seconds
        self._n += 1
        self._since_fit += 1
        due = self._n == self.min_samples or self._since_fit >= self.refit_every
        if due and self.learned:
            self.refit()

    def refit(self) -> None:
        n = min(self._n, self.window)
        if n < self.min_samples:
            return
        self._set(fit(self._x[:n], self._y[:n], self.prior, self.prior_weight))
        self._since_fit = 0

    def predict(self, rows: int, prefill: int, context: int) -> float:
        pre = self._e + self._c * prefill if prefill > 0 else 0.0
        return self._a + self._b * rows + self._d * context + pre

    def prefill_room(self, rows: int, context: int, budget_s: float) -> float:
        """Prefill tokens that fit beside ``rows`` decode rows reading ``context`` tokens of
        K/V so the step is predicted to take at most ``budget_s`` (0 when none fit)."""
        left = budget_s - (self._a + self._e + self._b * rows + self._d * context)
        if left <= 0:
            return 0.0
        return left / self._c if self._c > 0 else float("inf")

    def describe(self) -> str:
        a, e, b, c, d = self.coeffs * 1e3
        src = f"{self._n} steps" if self.learned else f"prior, {self._n} steps seen"
        return (
            f"{a:.2f} ms + {e:.2f} if prefilling + {b:.4f}/row + {c:.4f}/prefill token "
            f"+ {d:.6f}/context token ({src})"
        )


def fit(x: np.ndarray, y: np.ndarray, prior: np.ndarray, prior_weight: float) -> np.ndarray:
    """Coefficients ``w >= 0`` minimising ``|x w - y|^2 + prior_weight |s (w - prior)|^2``
    over the samples left after dropping outliers (``s``: each feature's RMS, so the prior
    weighs as ``prior_weight`` typical samples whatever the units)."""
    scale = np.sqrt((x * x).mean(axis=0))
    scale[scale == 0] = 1.0  # a feature never seen: only the prior speaks for it
    xs = x / scale
    keep = np.ones(len(y), bool)
    w = prior
    floor = max(float(y.min()), 1e-6)
    for _ in range(5):  # fit, drop outliers, refit
        w = _ridge_nonneg(xs[keep], y[keep], prior * scale, prior_weight) / scale
        pred = np.maximum(x @ w, floor)
        rel = (y - pred) / pred  # relative: a 2 ms error is noise at 60 ms, an outlier at 6 ms
        sigma = 1.4826 * np.median(np.abs(rel[keep]))
        new = np.abs(rel) <= max(OUTLIER_SIGMAS * sigma, MIN_OUTLIER)
        if new.sum() < max(4, len(y) // 2) or (new == keep).all():
            break
        keep = new
    return w


def _ridge_nonneg(xs: np.ndarray, y: np.ndarray, prior_s: np.ndarray, lam: float) -> np.ndarray:
    """Ridge toward ``prior_s`` (scaled coefficients); a coefficient that comes out negative
    is fixed at 0 and the rest refitted (active set: one pass per feature at most)."""
    free = np.ones(len(prior_s), bool)
    w = np.zeros(len(prior_s))
    root = np.sqrt(lam)
    for _ in range(len(prior_s)):
        k = int(free.sum())
        a = np.vstack([xs[:, free], root * np.eye(k)])
        b = np.concatenate([y, root * prior_s[free]])
        sol = np.linalg.lstsq(a, b, rcond=None)[0]
        w[:] = 0.0
        w[free] = sol
        if (sol >= 0).all():
            break
        free &= w > 0
        w[~free] = 0.0
        if not free.any():
            break
    return w
