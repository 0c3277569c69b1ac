"""The card's SM clock and power draw while a benchmark workload runs, sampled by ``nvidia-smi``.

A card at its power limit lowers its clock: an H200 ran W2 bf16 at 686-697 W of 700 with its SM
clock at 1,500-1,575 MHz of 1,980 (BENCHMARKS.md, "Session of 2026-11-28, tenth"). A figure
taken there measures the card's energy budget as much as the code, so the report says so.
Sampling is best effort: without ``nvidia-smi`` (or with a failing one) a workload simply has
no power entry.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

QUERY = "clocks.sm,clocks.max.sm,power.draw,power.limit"
AT_LIMIT = 0.95  # a sample drawing this share of the power limit or more counts as at the limit


@dataclass(frozen=True)
class Sample:
    clock_mhz: float
    max_clock_mhz: float
    power_w: float
    limit_w: float


def parse(text: str) -> list[Sample]:
    """``nvidia-smi --format=csv,noheader,nounits`` lines of ``QUERY``; lines that are not four
    numbers (``[N/A]``, a cut last line) are skipped."""
    samples = []
    for line in text.splitlines():
        try:
            values = [float(field) for field in line.split(",")]
        except ValueError:
            continue
        if len(values) == 4:
            samples.append(Sample(*values))
    return samples


def summary(samples: list[Sample]) -> dict | None:
    """Median and lowest SM clock, the maximum clock, median and highest draw, the limit, and the
    share of samples at the limit; None without samples."""
    if not samples:
        return None
    limit = samples[0].limit_w
    return {
        "samples": len(samples),
        "clock_mhz_median": statistics.median(s.clock_mhz for s in samples),
        "clock_mhz_min": min(s.clock_mhz for s in samples),
        "clock_mhz_max": samples[0].max_clock_mhz,
        "power_w_median": statistics.median(s.power_w for s in samples),
        "power_w_max": max(s.power_w for s in samples),
        "power_limit_w": limit,
        "at_limit_share": sum(s.power_w >= AT_LIMIT * limit for s in samples) / len(samples),
    }


def visible_card() -> str:
    """The first card this process may use, as ``nvidia-smi -i`` names it (index or UUID)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return first or "0"


@contextlib.contextmanager
def sampled(into: dict, key: str, interval_ms: int = 200, smi: str = "nvidia-smi") -> Iterator[None]:
    """``into[key]``: the ``summary`` of the card's samples taken while the block runs."""
    command = [smi, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", str(interval_ms)]
    try:
        proc = subprocess.Popen(
            [*command, "-i", visible_card()], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
    except OSError:  # no nvidia-smi here
        proc = None
    try:
        yield
    finally:
        if proc is not None:
            found = summary(parse(_stop(proc)))
            if found is not None:
                into[key] = found


def _stop(proc: subprocess.Popen[str]) -> str:
    """What the sampler printed before it was stopped."""
    proc.terminate()
    try:
        return proc.communicate(timeout=10)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


def report(variants: dict) -> str:
    """A Markdown line per variant naming each workload's clock and draw, or nothing."""
    lines = []
    for name, v in variants.items():
        parts = [
            f"{workload} {p['clock_mhz_median']:.0f} MHz (max {p['clock_mhz_max']:.0f}), "
            f"{p['power_w_median']:.0f} of {p['power_limit_w']:.0f} W, "
            f"{100 * p['at_limit_share']:.0f}% at the limit"
            for workload, p in v.get("ours", {}).get("power", {}).items()
        ]
        if parts:
            lines.append(f"\nPower, {name} (median SM clock and draw per workload): {'; '.join(parts)}\n")
    return "".join(lines)
