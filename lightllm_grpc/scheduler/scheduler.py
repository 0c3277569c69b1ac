"""Continuous batching: admission, chunked prefill, decode, and slot bookkeeping.

The scheduler owns every KV slot and req_to_token row. Each step it builds one
``StepRequest`` for the shards: rows to release, new rows with their sampling state,
prefill chunks (within a token budget) and one decode entry per running request.

Admission reserves each request's peak KV footprint (prompt + max_new_tokens - 1), so a
running request can always get the slot for its next token and nothing is ever
preempted. Slots themselves are allocated token by token as the request grows, and
all of them go back to the pool the moment the request finishes or is aborted.

Steps are pipelined: the next step is built before the previous one's tokens are back
(the shard keeps each row's last token), so a request decodes from the step after its
last prompt chunk was *sent*. A request that stops on EOS or a stop string may thus get
a decode entry or two whose tokens are dropped; ``scheduled_tokens`` keeps a request from
ever being scheduled past max_new_tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from lightllm_grpc.config import SchedulerConfig
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler.allocator import IdAllocator
from lightllm_grpc.scheduler.request import FinishReason, Request, State


@dataclass
class StepPlan:
    """A step on its way to the shards, and the requests it covers.

    ``sampled`` lists, in the order of the shard's result rows, the request each sampled
    token belongs to: results are matched by position, never through the live row table,
    because a row freed while the step ran may already belong to a new request.
    """

    message: shard_pb2.StepRequest
    requests: list[Request] = field(default_factory=list)
    sampled: list[Request] = field(default_factory=list)


@dataclass(frozen=True)
class PoolStats:
    total: int
    used: int
    reserved: int
    running: int
    waiting: int


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, kv_capacity: int, max_rows: int, eos_ids: tuple[int, ...] = ()
    ) -> None:
        self.config = config
        self.eos_ids = eos_ids
        self.slots = IdAllocator(kv_capacity)
        self.rows = IdAllocator(min(max_rows, config.max_running_requests))
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.decoding: list[Request] = []
        self.by_id: dict[str, Request] = {}
        self.reserved = 0
        self._release: list[int] = []
        self._step_id = 0

    # ---- queries -------------------------------------------------------------------
    @property
    def kv_capacity(self) -> int:
        return self.slots.capacity

    def stats(self) -> PoolStats:
        running = len(self.prefilling) + len(self.decoding)
        return PoolStats(self.slots.capacity, self.slots.num_used, self.reserved, running, len(self.waiting))

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    # ---- request lifecycle ------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if req.request_id in self.by_id:
            raise KeyError(req.request_id)
        self.by_id[req.request_id] = req
        self.waiting.append(req)

    def finish(self, req: Request, reason: FinishReason) -> None:
        """End a request: its slots and row go back at once (the shard forgets the row next step)."""
        if req.finished:
            return
        if req.state is State.WAITING:
            self.waiting.remove(req)
        else:
            (self.prefilling if req.state is State.PREFILLING else self.decoding).remove(req)
            self._free_kv(req)
        req.state = State.FINISHED
        req.finish_reason = reason
        self.by_id.pop(req.request_id, None)

    def _free_kv(self, req: Request) -> None:
        if req.slots:
            self.slots.free(np.concatenate(req.slots))
        req.slots, req.num_slots = [], 0
        self.reserved -= req.kv_reservation
        self.rows.free([req.row])
        self._release.append(req.row)
        req.row = -1

    def _alloc(self, req: Request, n: int) -> np.ndarray:
        ids = self.slots.alloc(n)
        if ids is None or req.num_slots + n > req.kv_reservation:
            raise RuntimeError("KV reservation violated; this is a scheduler bug")
        req.slots.append(ids)
        req.num_slots += n
        return ids

    # ---- step building ------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        if not self.has_work():
            return None
        msg = shard_pb2.StepRequest()
        plan = StepPlan(msg)
        # Decode entries first, so a request whose prompt ends in this step gets none yet.
        decodes = self._decode(msg.decode)
        budget = self._continue_prefills(plan, self.config.max_prefill_tokens)
        self._admit(plan, budget)
        plan.requests.extend(decodes)
        plan.sampled.extend(decodes)  # the shard answers prefill rows first, then decode rows
        if not plan.requests:
            return None
        self._step_id += 1
        msg.step_id = self._step_id
        msg.release_rows.extend(self._release)
        self._release.clear()
        return plan

    def _continue_prefills(self, plan: StepPlan, budget: int) -> int:
        for req in list(self.prefilling):
            if budget <= 0:
                break
            budget -= self._add_chunk(plan, req, budget)
        return budget

    def _admit(self, plan: StepPlan, budget: int) -> None:
        while self.waiting and budget > 0 and self.rows.num_free > 0:
            req = self.waiting[0]
            if self.reserved + req.kv_reservation > self.slots.capacity:
                break  # first come, first served: later requests wait behind the head
            self.waiting.popleft()
            req.row = self.rows.alloc_one()
            req.state = State.PREFILLING
            self.reserved += req.kv_reservation
            self.prefilling.append(req)
            plan.message.admit.append(_row_sampling(req, self.eos_ids))
            budget -= self._add_chunk(plan, req, budget)

    def _add_chunk(self, plan: StepPlan, req: Request, budget: int) -> int:
        n = min(budget, req.prompt_len - req.prefilled)
        slots = self._alloc(req, n)
        pre = plan.message.prefill
        pre.rows.append(req.row)
        pre.starts.append(req.prefilled)
        pre.lens.append(n)
        pre.token_ids.extend(req.prompt_ids[req.prefilled : req.prefilled + n])
        pre.slots.extend(slots.tolist())
        pre.prefix_lens.append(0)
        req.prefilled += n
        done = req.prefilled == req.prompt_len
        pre.sample.append(done)
        plan.requests.append(req)
        if done:  # decodes from the next step on: the shard will hold its first token
            plan.sampled.append(req)
            req.scheduled_tokens = 1
            req.state = State.DECODING
            self.prefilling.remove(req)
            self.decoding.append(req)
        return n

    def _decode(self, dec: shard_pb2.DecodeBatch) -> list[Request]:
        reqs = [r for r in self.decoding if r.scheduled_tokens < r.stopping.max_new_tokens]
        if not reqs:
            return reqs
        slots = self.slots.alloc(len(reqs))
        if slots is None:
            raise RuntimeError("KV reservation violated; this is a scheduler bug")
        for req, slot in zip(reqs, slots):
            req.slots.append(slot.reshape(1))
            req.num_slots += 1
            req.scheduled_tokens += 1
        dec.rows.extend([r.row for r in reqs])
        dec.slots.extend(slots.tolist())
        return reqs


def _row_sampling(req: Request, eos_ids: tuple[int, ...]) -> shard_pb2.RowSampling:
    s, stop, out = req.sampling, req.stopping, req.output
    msg = shard_pb2.RowSampling(
        row=req.row,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        min_p=s.min_p,
        repetition_penalty=s.repetition_penalty,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        seed=s.seed if s.seed is not None else 0,
        min_new_tokens=stop.min_new_tokens,
        logprobs=out.logprobs or out.top_logprobs > 0,
        top_logprobs=out.top_logprobs,
    )
    if stop.min_new_tokens > 0:
        msg.suppress_ids.extend(stop.stop_token_ids)
        if not stop.ignore_eos:
            msg.suppress_ids.extend(eos_ids)
    if s.repetition_penalty != 1.0:
        msg.penalty_prompt_ids.extend(req.prompt_ids)
    return msg
