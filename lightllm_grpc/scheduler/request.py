"""A generation request as the scheduler sees it, and the outputs it emits."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

import numpy as np

from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler.radix_cache import Node
from lightllm_grpc.scheduler.sampling import SamplingOptions
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
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = False
    prompt_logprobs: bool = False


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
    stop_token: int | None = None  # the stop token id that ended it (else a stop string did)
    error: str = ""
    index: int = 0
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    def merge(self, later: RequestOutput) -> None:
        self.prompt_logprobs += later.prompt_logprobs
        self.text += later.text
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        self.finish_reason = later.finish_reason
        self.stop_reason = later.stop_reason or self.stop_reason
        self.stop_token = later.stop_token if later.stop_token is not None else self.stop_token
        self.error = later.error or self.error


@dataclass(eq=False)
class Request:
    """One completion. A request with ``n > 1`` is ``n`` of these sharing an id and a queue.

    KV positions ``[0, tree_len)`` hold slots owned by the prefix cache (locked through
    ``node`` while the request lives); positions ``[tree_len, num_kv)`` hold its own slots.
    """

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingOptions
    stopping: StopOptions
    output: OutputOptions
    index: int = 0  # which of the request's n completions
    priority: int = 0  # lower runs first under the priority policy
    # The output's constraint (structured output), compiled on the shards before submission.
    constraint: shard_pb2.Constraint | None = None
    state: State = State.WAITING
    row: int = -1
    arrival: int = 0  # submission order, for FCFS and tie-breaks
    admitted: int = 0  # admission order (latest admitted is preempted first)
    # Tokens to prefill on (re)admission: the prompt, plus the output so far when resuming.
    fill_ids: list[int] = field(default_factory=list)
    kv: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    num_kv: int = 0
    tree_len: int = 0
    # Positions [0, exact_len) hold exactly the cache's slots for them (no duplicates of its
    # own there), so rows with the same cached ancestor share them (cascade attention).
    exact_len: int = 0
    node: Node | None = None  # the radix-cache node locked for positions [0, tree_len)
    dup_slots: list[np.ndarray] = field(default_factory=list)  # own slots the cache already had
    prefix_pending: int = 0  # cached prefix the next chunk must point the shard's row at
    prefilled: int = 0  # tokens of fill_ids whose K/V the sent steps write
    scheduled_tokens: int = 0  # output tokens the sent steps will produce
    epoch: int = 0  # bumped on preemption: results of steps sent before it are dropped
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    preemptions: int = 0
    # Prompt logprobs (response.prompt_logprobs, completion 0): collected per prefill chunk,
    # sent with the first message.
    prompt_lps: list[TokenLogprob] = field(default_factory=list)
    prompt_lps_sent: bool = False
    finish_reason: FinishReason = FinishReason.NONE
    detok: DetokState = field(default_factory=DetokState)
    text: str = ""  # decoded output so far (before stop-string trimming)
    sent_chars: int = 0
    stop_matcher: StopStringMatcher | None = None
    pending: RequestOutput = field(default_factory=lambda: RequestOutput())  # tokens not yet emitted
    queue: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)
    # time.monotonic() of each milestone, for metrics (RequestObserver); None until reached.
    arrived_at: float | None = None  # submitted to the scheduler
    admitted_at: float | None = None  # first admitted (a preempted request keeps it)
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None

    def __post_init__(self) -> None:
        if not self.fill_ids:
            self.fill_ids = list(self.prompt_ids)
        self.pending.index = self.index
        self.detok.skip_special_tokens = self.output.skip_special_tokens
        self.detok.spaces_between_special_tokens = self.output.spaces_between_special_tokens

    def append_kv(self, slots: np.ndarray) -> None:
        end = self.num_kv + slots.size
        if end > self.kv.size:
            grown = np.empty(max(end, 2 * self.kv.size, 16), np.int32)
            grown[: self.num_kv] = self.kv[: self.num_kv]
            self.kv = grown
        self.kv[self.num_kv : end] = slots
        self.num_kv = end

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.output.prompt_logprobs and self.index == 0 and not self.prompt_lps_sent

    @property
    def own_kv(self) -> int:
        """KV slots this request holds outside the prefix cache."""
        return self.num_kv - self.tree_len

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

    @property
    def seq_ids(self) -> list[int]:
        """The tokens whose K/V positions 0, 1, ... hold: the prompt, then the output."""
        return self.prompt_ids + self.output_ids

    def emit(self, out: RequestOutput) -> None:
        out.index = self.index
        self.queue.put_nowait(out)


async def next_outputs(queue: asyncio.Queue[RequestOutput]) -> list[RequestOutput]:
    """Wait for output, then take what else queued up, merged per completion, so a slow
    reader catches up in one message per completion."""
    items = [await queue.get()]
    while not queue.empty():
        items.append(queue.get_nowait())
    latest: dict[int, RequestOutput] = {}
    outs: list[RequestOutput] = []
    for item in items:
        prev = latest.get(item.index)
        if prev is not None and prev.finish_reason is FinishReason.NONE:
            prev.merge(item)
        else:
            latest[item.index] = item
            outs.append(item)
    return outs
