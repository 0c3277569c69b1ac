"""A generation request as the scheduler sees it, and the outputs it emits."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

import numpy as np

from lightllm_grpc.text.detokenizer import DetokState
from lightllm_grpc.text.stop import StopStringMatcher


class FinishReason(enum.IntEnum):
    # Values match lightllm.v1.FinishReason.
    NONE = 0
    LENGTH = 1
    STOP = 2
    ABORT = 3


class State(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"  # holds a row; some prompt chunks sent
    DECODING = "decoding"  # whole prompt sent; one token per step from here
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None


@dataclass(frozen=True)
class StopOptions:
    max_new_tokens: int
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False


@dataclass(frozen=True)
class OutputOptions:
    return_token_ids: bool = True
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    """A delta for the client; ``finish_reason`` is set on the last one only."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.NONE
    stop_reason: str = ""
    error: str = ""

    def merge(self, later: RequestOutput) -> None:
        self.text += later.text
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        self.finish_reason = later.finish_reason
        self.stop_reason = later.stop_reason or self.stop_reason
        self.error = later.error or self.error


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingOptions
    stopping: StopOptions
    output: OutputOptions
    state: State = State.WAITING
    row: int = -1
    # KV slots in position order: prompt tokens first, then generated ones.
    slots: list[np.ndarray] = field(default_factory=list)
    num_slots: int = 0
    prefilled: int = 0  # prompt tokens sent to the shards for prefill
    scheduled_tokens: int = 0  # output tokens the sent steps will produce
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    finish_reason: FinishReason = FinishReason.NONE
    detok: DetokState = field(default_factory=DetokState)
    text: str = ""  # decoded output so far (before stop-string trimming)
    sent_chars: int = 0
    stop_matcher: StopStringMatcher | None = None
    pending: RequestOutput = field(default_factory=RequestOutput)  # tokens not yet emitted
    queue: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.state is State.FINISHED

    @property
    def kv_reservation(self) -> int:
        """Most KV slots this request can ever hold: the prompt plus every new token but the last."""
        return self.prompt_len + self.stopping.max_new_tokens - 1

    def emit(self, out: RequestOutput) -> None:
        self.queue.put_nowait(out)

    async def next_output(self) -> RequestOutput:
        """Wait for output, then merge whatever else queued up so a slow reader catches up."""
        out = await self.queue.get()
        while not self.queue.empty() and out.finish_reason is FinishReason.NONE:
            out.merge(self.queue.get_nowait())
        return out
