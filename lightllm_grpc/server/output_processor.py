"""Turns sampled tokens into client deltas: stop checks, detokenization, emission."""

from __future__ import annotations

from collections.abc import Callable

from lightllm_grpc.scheduler.request import FinishReason, Request, RequestOutput, TokenLogprob
from lightllm_grpc.server.detokenizer import Detokenizer


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
    ) -> None:
        self._detok = detokenizer
        self._eos = frozenset(eos_ids)
        self._max_context = max_context
        self._finish = finish

    def process(self, items: list[tuple[Request, int, TokenLogprob | None]]) -> None:
        texted: list[Request] = []
        pending: dict[int, tuple[Request, int, TokenLogprob | None, str]] = {}
        for req, token, logprob in items:
            stop = self._token_stop(req, token)
            req.output_ids.append(token)
            if not stop:
                req.detok.ids.append(token)
                texted.append(req)
            pending[id(req)] = (req, token, logprob, stop)
        for req, delta in zip(texted, self._detok.step([r.detok for r in texted])):
            req.text += delta
        for req, token, logprob, stop in pending.values():
            self._after_token(req, token, logprob, stop)

    def abort(self, req: Request, error: str = "") -> None:
        """Finish a request from outside the step loop (client cancel, Abort, failure)."""
        if req.finished:
            return
        self._finish(req, FinishReason.ABORT)
        req.emit(RequestOutput(finish_reason=FinishReason.ABORT, error=error))

    def _token_stop(self, req: Request, token: int) -> str:
        stop = req.stopping
        if len(req.output_ids) < stop.min_new_tokens:
            return ""
        if token in stop.stop_token_ids or (token in self._eos and not stop.ignore_eos):
            return str(token)
        return ""

    def _after_token(self, req: Request, token: int, logprob: TokenLogprob | None, stop_token: str) -> None:
        reason, stop_reason, text_end = FinishReason.NONE, stop_token, -1
        if stop_token:
            reason = FinishReason.STOP
        elif (match := self._stop_string(req)) is not None:
            reason, stop_reason, text_end = FinishReason.STOP, match.stop, match.text_end
        elif self._at_length(req):
            reason = FinishReason.LENGTH
        out = RequestOutput(
            token_ids=[token] if req.output.return_token_ids else [],
            logprobs=[logprob] if logprob is not None else [],
        )
        if reason is FinishReason.NONE:
            end = req.stop_matcher.safe_end(req.text) if req.stop_matcher else len(req.text)
        else:
            end = text_end if text_end >= 0 else self._final_text_end(req)
            self._finish(req, reason)
            out.finish_reason, out.stop_reason = reason, stop_reason
        if end > req.sent_chars:
            out.text = req.text[req.sent_chars : end]
            req.sent_chars = end
        req.emit(out)

    def _stop_string(self, req: Request):
        if req.stop_matcher is None or len(req.output_ids) < req.stopping.min_new_tokens:
            return None
        return req.stop_matcher.find(req.text, req.sent_chars)

    def _at_length(self, req: Request) -> bool:
        return (
            len(req.output_ids) >= req.stopping.max_new_tokens
            or req.prompt_len + len(req.output_ids) >= self._max_context
        )

    def _final_text_end(self, req: Request) -> int:
        # The windowed decode holds back ids that end mid-character; the final text is the
        # decode of the whole output, so the concatenated deltas equal tokenizer.decode.
        full = self._detok.decode(req.detok.ids)
        if full.startswith(req.text):
            req.text = full
        return len(req.text)
