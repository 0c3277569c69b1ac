"""The hook through which the frontend times requests (metrics) without the core importing it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from lightllm_grpc.scheduler.request import Request


class RequestObserver(Protocol):
    """Installed with ``Engine.observe``; every method runs on the event loop, in the step loop,
    so it must be cheap (a few additions per request, no I/O).

    Request times (``arrived_at``, ``admitted_at``, ``first_token_at``, ``last_token_at``,
    ``finished_at``) are ``time.monotonic()`` values set by the scheduler and the output
    processor.
    """

    def on_tokens(self, reqs: Sequence[Request], now: float) -> None:
        """A step delivered one token to each of ``reqs`` at ``now``; called before their
        token times advance, so ``first_token_at is None`` marks a first token and
        ``now - last_token_at`` is the gap since the previous one."""

    def on_finish(self, req: Request, error: str) -> None:
        """``req`` finished (``req.finish_reason``); ``error`` is set when it failed."""

    def on_step(self, seconds: float) -> None:
        """A step's result arrived ``seconds`` after the engine could start waiting for it."""
