"""Turns sampled tokens into client deltas: stop checks, detokenization, emission.

Under load the per-message cost of gRPC, not the GPU, bounds throughput, so tokens of a
stream are coalesced: each step emits at most about ``max_messages_per_step`` messages,
every stream getting a message every ``interval`` tokens (1 at light load). Tokens are
detokenized only when they are emitted, except for streams with stop strings, which are
checked on every token.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from lightllm_grpc.scheduler.observer import RequestObserver
from lightllm_grpc.scheduler.request import FinishReason, Request, RequestOutput, TokenLogprob
from lightllm_grpc.text.detokenizer import Detokenizer
from lightllm_grpc.text.stop import StopMatch


class OutputProcessor:
    """Appends each step's tokens to their requests and emits what the client may see.

    ``finish`` is the scheduler's callback that frees a finished request's KV at once.
    """

    def __init__(
        self,
        detokenizer: Detokenizer,
        eos_ids: tuple[int, ...],
        max_context: int,
        finish: Callable[[Request, FinishReason], None],
        max_messages_per_step: int = 128,
    ) -> None:
        self._detok = detokenizer
        self._eos = frozenset(eos_ids)
        self._max_context = max_context
        self._finish = finish
        self._max_messages = max_messages_per_step
        self.observer: RequestObserver | None = None

    def process(self, items: list[tuple[Request, int, TokenLogprob | None]]) -> None:
        interval = max(1, -(-len(items) // self._max_messages))
        due: list[tuple[Request, FinishReason, str]] = []
        now = time.monotonic()
        if self.observer is not None:
            self.observer.on_tokens([req for req, _, _ in items], now)
        for req, token, logprob in items:
            if req.first_token_at is None:
                req.first_token_at = now
            req.last_token_at = now
            stop_token = self._token_stop(req, token)
            req.output_ids.append(token)
            if req.output.return_token_ids:
                req.pending.token_ids.append(token)
            if logprob is not None:
                req.pending.logprobs.append(logprob)
            if not stop_token:
                req.detok.ids.append(token)
            reason = FinishReason.STOP if stop_token else self._length(req)
            n = len(req.output_ids)
            if reason is not FinishReason.NONE or req.stop_matcher or n == 1 or n % interval == 0:
                due.append((req, reason, stop_token))
        deltas = self._detok.step([req.detok for req, _, _ in due])
        for (req, reason, stop_token), delta in zip(due, deltas):
            req.text += delta
            self._emit(req, reason, stop_token)

    def abort(self, req: Request, error: str = "") -> None:
        """Finish a request from outside the step loop (client cancel, Abort, failure)."""
        if req.finished:
            return
        self._finish(req, FinishReason.ABORT)
        if self.observer is not None:
            self.observer.on_finish(req, error)
        req.emit(RequestOutput(finish_reason=FinishReason.ABORT, error=error))

    def _token_stop(self, req: Request, token: int) -> str:
        stop = req.stopping
        # A constrained row samples EOS only once its sentence is complete (the shard keeps EOS
        # suppressed until then, unless nothing else can follow): the constraint ends it.
        complete = req.constraint is not None and token in self._eos
        if len(req.output_ids) < stop.min_new_tokens and not complete:
            return ""
        if token in stop.stop_token_ids or (token in self._eos and not stop.ignore_eos):
            return str(token)
        return ""

    def _length(self, req: Request) -> FinishReason:
        n = len(req.output_ids)
        if n >= req.stopping.max_new_tokens or req.prompt_len + n >= self._max_context:
            return FinishReason.LENGTH
        return FinishReason.NONE

    def _emit(self, req: Request, reason: FinishReason, stop_reason: str) -> None:
        out, req.pending = req.pending, RequestOutput()
        if req.wants_prompt_logprobs:  # the first message carries them
            out.prompt_logprobs, req.prompt_lps_sent = req.prompt_lps, True
        text_end = -1
        if stop_reason:  # a stop token: _token_stop gave its id as text
            out.stop_token = int(stop_reason)
        if reason is FinishReason.NONE and (match := self._stop_string(req)) is not None:
            reason, stop_reason, text_end = FinishReason.STOP, match.stop, match.text_end
        if reason is FinishReason.NONE:
            end = req.stop_matcher.safe_end(req.text) if req.stop_matcher else len(req.text)
        else:
            end = text_end if text_end >= 0 else self._final_text_end(req)
            self._finish(req, reason)
            if self.observer is not None:
                self.observer.on_finish(req, "")
            out.finish_reason, out.stop_reason = reason, stop_reason
        if end > req.sent_chars:
            out.text = req.text[req.sent_chars : end]
            req.sent_chars = end
        req.emit(out)

    def _stop_string(self, req: Request) -> StopMatch | None:
        if req.stop_matcher is None or len(req.output_ids) < req.stopping.min_new_tokens:
            return None
        return req.stop_matcher.find(req.text, req.sent_chars)

    def _final_text_end(self, req: Request) -> int:
        # The windowed decode holds back ids that end mid-character; the final text is the
        # decode of the whole output, so the concatenated deltas equal tokenizer.decode.
        full = self._detok.decode_state(req.detok)
        if full.startswith(req.text):
            req.text = full
        return len(req.text)
