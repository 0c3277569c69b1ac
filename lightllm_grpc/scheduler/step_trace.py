"""``serve --step-trace PATH``: one JSON line per completed step, to tell where a latency
tail's time went (docs/operations.md, "Step trace").

A slow first token is a slow step on the GPU (``shard_ms``), a step that started late
(``sent`` well after the request's ``admitted``), a request that waited for admission
(``admitted - arrived``), or time after the result came back (``fill_ms``, ``deliver_ms``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler.request import Request
from lightllm_grpc.scheduler.scheduler import StepPlan

log = logging.getLogger(__name__)
# Lines held before one write + flush: the trace runs on the event loop, inside the step
# loop, so it makes one syscall per ~64 steps rather than one per step.
FLUSH_LINES = 64


class StepTrace:
    """Writes the engine's completed steps to ``out``, one JSON object per line.

    Contract: ``record``, ``flush`` and ``close`` never raise. The first failed write is
    logged and turns the trace off (``on`` is False from then on, later calls do nothing):
    a full disk must not take the server down with it. Lines reach the file every
    ``flush_lines`` steps, on ``flush`` (the engine calls it when it goes idle) and on
    ``close``.
    """

    def __init__(self, out: TextIO, flush_lines: int = FLUSH_LINES) -> None:
        self._out: TextIO | None = out
        self._flush_lines = flush_lines
        self._lines: list[str] = []

    @classmethod
    def open(cls, path: Path) -> StepTrace:
        """Truncate ``path`` and trace into it (OSError when it cannot be opened)."""
        return cls(path.open("w", encoding="utf-8"))

    @property
    def on(self) -> bool:
        return self._out is not None

    def record(
        self,
        plan: StepPlan,
        result: shard_pb2.StepResult,
        *,
        result_at: float,
        period: float,
        fill_s: float,
        deliver_s: float,
        first: Sequence[Request],
    ) -> None:
        """One completed step: ``result_at`` is when its result came back (monotonic),
        ``period`` the step-duration metric's sample, ``fill_s`` the time spent sending the
        next step before this one's tokens were delivered, ``deliver_s`` the delivery, and
        ``first`` the completions that got their first token from it."""
        if self._out is None:
            return
        msg = plan.message
        line = {
            "step": msg.step_id,
            "sent": round(plan.sent_at, 6),
            "result": round(result_at, 6),
            "period_ms": round(period * 1e3, 3),
            "shard_ms": round(result.forward_seconds * 1e3, 3),
            "fill_ms": round(fill_s * 1e3, 3),
            "deliver_ms": round(deliver_s * 1e3, 3),
            "decode_rows": len(msg.decode.rows),
            "prefill_tokens": len(msg.prefill.token_ids),
            "prefill_requests": len(msg.prefill.rows),  # a request has at most one chunk per step
            "first_tokens": [_first_token(req) for req in first],
        }
        self._lines.append(json.dumps(line, separators=(",", ":")) + "\n")
        if len(self._lines) >= self._flush_lines:
            self.flush()

    def flush(self) -> None:
        if self._out is None or not self._lines:
            return
        lines, self._lines = self._lines, []
        try:
            self._out.write("".join(lines))
            self._out.flush()
        except (OSError, ValueError) as exc:  # ValueError: the file was closed under us
            log.error("step trace: writing failed (%s); the trace is off from now on", exc)
            self._shut()

    def close(self) -> None:
        self.flush()
        self._shut()

    def _shut(self) -> None:
        out, self._out = self._out, None
        if out is None:
            return
        with contextlib.suppress(OSError, ValueError):  # reported by flush, or nothing to lose
            out.close()


def _first_token(req: Request) -> dict[str, object]:
    return {
        "request_id": req.request_id,
        "index": req.index,
        "arrived": _time(req.arrived_at),
        "admitted": _time(req.admitted_at),
        "first_token": _time(req.first_token_at),
    }


def _time(t: float | None) -> float | None:
    return None if t is None else round(t, 6)
