"""Continuous batching: admission, prefix reuse, chunked prefill, decode, preemption.

The scheduler owns every KV slot and req_to_token row. Each step it builds one
``StepRequest`` for the shards: rows to release, new rows with their sampling state,
prefill chunks (within a token budget) and one decode entry per running request. When
decode rows run, the token budget is what a learned step-time model says fits in
``step_time_budget_ms`` beside them (``step_time.py``), so long prompts arriving together do
not make every running request's next token late.

KV slots are allocated token by token. A new request first takes the longest cached
prefix of its tokens from the radix cache and prefills only the rest; its prompt is
cached as each chunk is sent, so a request arriving a step later shares it, and when a
request ends its prompt and output stay cached until their room is needed.

Admission asks ``Admission`` whether the batch's KV peak still fits (docs/scheduling.md).
When a decode step does not fit anyway, cached tokens nobody uses are evicted first, then
the most recently admitted request (lowest priority first under the priority policy) is
preempted: its known tokens stay in the cache, its slots and row go back, and it waits at
the front of the queue to re-prefill what the cache lost and continue where it was.

Steps are pipelined: the next step is built before the previous one's tokens are back
(the shard keeps each row's last token), so a request decodes from the step after its
last prompt chunk was *sent*. Tokens of a step sent before a request ended or was
preempted are dropped (``StepPlan.epochs``); ``scheduled_tokens`` keeps a request from
ever being scheduled past max_new_tokens.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

import numpy as np

from lightllm_grpc.config import SchedulerConfig
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler import sampling
from lightllm_grpc.scheduler.admission import Admission, KVNeed, OutputLengths
from lightllm_grpc.scheduler.allocator import IdAllocator
from lightllm_grpc.scheduler.radix_cache import Match, RadixCache
from lightllm_grpc.scheduler.request import FinishReason, Request, State
from lightllm_grpc.scheduler.step_time import StepTimeModel

EVICT_AT_LEAST = 256  # tokens
# A request whose prefix is being prefilled by this very step waits a step to share it when
# that saves at least this many tokens (not for a shared BOS or chat-template header).
DEFER_FOR_TOKENS = 32
# Cascade decode attention: a shared prefix shorter than this is not worth a group, and a
# group holds at most this many rows (the kernel's MAX_GROUP_ROWS; shard.proto says so too).
CASCADE_MIN_PREFIX = 64
CASCADE_GROUP_ROWS = 16
# Time budget: a step prefills at least this share of the prompt tokens waiting, so a backlog
# drains within about this many steps even when the budget leaves less room (TTFT stays
# bounded at loads the GPU can carry; docs/scheduling.md).
DRAIN_STEPS = 8


@dataclass
class StepPlan:
    """A step on its way to the shards, and the requests it covers.

    ``sampled`` lists, in the order of the shard's result rows, the request each sampled
    token belongs to, and ``epochs`` the request's epoch when the step was built: results
    are matched by position, never through the live row table, because a row freed while
    the step ran may already belong to a new request.
    """

    message: shard_pb2.StepRequest
    requests: list[Request] = field(default_factory=list)
    sampled: list[Request] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    # (request, its epoch, first position, positions) of each chunk asking prompt logprobs,
    # in the order of the shard's StepResult.prompt_logprobs.
    prompt_lp: list[tuple[Request, int, int, int]] = field(default_factory=list)
    sent_at: float = 0.0  # time.monotonic() when the engine sent it (step metrics)
    # What the step-time model sees: decode rows, prefill tokens, K/V tokens the rows read.
    decode_rows: int = 0
    prefill_tokens: int = 0
    context_tokens: int = 0

    def add_sampled(self, req: Request) -> None:
        self.sampled.append(req)
        self.epochs.append(req.epoch)


@dataclass(frozen=True)
class PoolStats:
    total: int
    free: int
    cached: int  # held by the prefix cache and by no live request
    running: int
    waiting: int

    @property
    def used(self) -> int:
        return self.total - self.free - self.cached


@dataclass
class Counters:
    """Cumulative counts, for GetServerInfo and metrics."""

    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of those, served from it
    preemptions: int = 0
    partial_prefills: int = 0  # prefill chunks that did not finish their prompt
    budget_limited_steps: int = 0  # steps where the time budget, not the cap, held prompts back
    cascade_steps: int = 0  # decode steps sent with prefix groups (cascade attention)


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, kv_capacity: int, max_rows: int, eos_ids: tuple[int, ...] = ()
    ) -> None:
        self.config = config
        self.eos_ids = eos_ids
        self.slots = IdAllocator(kv_capacity)
        self.cache = RadixCache(self.slots.free) if config.prefix_cache else None
        self.rows = IdAllocator(config.running_rows(max_rows))
        self.admission = Admission(config.admission, OutputLengths(quantile=config.admission_quantile))
        # None: the policy is off and every step may prefill max_prefill_tokens.
        self.step_time = StepTimeModel() if config.step_time_budget_ms > 0 else None
        self.waiting: list[Request] = []  # in queue order (see _queue_key)
        self.prefilling: list[Request] = []
        self.decoding: list[Request] = []
        self.by_id: dict[str, list[Request]] = {}  # live completions of each request id
        self.counters = Counters()
        self._release: list[int] = []
        self._step_id = 0
        self._arrivals = 0
        self._admissions = 0

    # ---- queries -------------------------------------------------------------------
    @property
    def kv_capacity(self) -> int:
        return self.slots.capacity

    def stats(self) -> PoolStats:
        running = len(self.prefilling) + len(self.decoding)
        cached = self.cache.evictable_tokens if self.cache else 0
        return PoolStats(self.slots.capacity, self.slots.num_free, cached, running, len(self.waiting))

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def live(self) -> list[Request]:
        return [r for group in self.by_id.values() for r in group]

    # ---- request lifecycle ------------------------------------------------------------
    def submit(self, req: Request) -> None:
        group = self.by_id.setdefault(req.request_id, [])
        if any(r.index == req.index for r in group):
            raise KeyError(req.request_id)
        group.append(req)
        self._arrivals += 1
        req.arrival = self._arrivals
        req.arrived_at = time.monotonic()
        self._enqueue(req)

    def finish(self, req: Request, reason: FinishReason) -> None:
        """End a request: its KV goes to the cache or the pool at once, its row is freed."""
        if req.finished:
            return
        if req.state is State.WAITING:
            self.waiting.remove(req)
        else:
            (self.prefilling if req.state is State.PREFILLING else self.decoding).remove(req)
            self._release_kv(req)
        if reason in (FinishReason.LENGTH, FinishReason.STOP):
            self.admission.lengths.record(len(req.output_ids))
        req.state = State.FINISHED
        req.finish_reason = reason
        req.finished_at = time.monotonic()
        group = self.by_id.get(req.request_id, [])
        if req in group:
            group.remove(req)
            if not group:
                del self.by_id[req.request_id]

    def clear_cache(self) -> int:
        """Free every cached token that no live request uses; return how many."""
        return self.cache.clear() if self.cache else 0

    # ---- step building ------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        if not self.has_work():
            return None
        step_id = self._step_id + 1
        msg = shard_pb2.StepRequest()
        plan = StepPlan(msg)
        # Decode entries first, so a request whose prompt ends in this step gets none yet.
        decodes = self._decode(msg.decode)
        budget = self._prefill_budget(plan, decodes)
        left = self._admit(plan, self._continue_prefills(plan, budget, step_id), step_id)
        plan.prefill_tokens = len(msg.prefill.token_ids)
        if budget < self.config.max_prefill_tokens and left <= 0 and (self.waiting or self.prefilling):
            self.counters.budget_limited_steps += 1  # the time budget, not the cap, held prompts back
        plan.requests.extend(decodes)
        plan.sampled.extend(decodes)  # the shard answers prefill rows first, then decode rows
        plan.epochs.extend([r.epoch for r in decodes])
        if not plan.requests and not self._release:
            return None
        self._step_id = step_id
        msg.step_id = step_id
        msg.release_rows.extend(self._release)
        self._release.clear()
        return plan

    def observe_step(self, plan: StepPlan, seconds: float) -> None:
        """``plan`` took ``seconds`` on the shards: a sample for the step-time model."""
        if self.step_time is not None:
            self.step_time.observe(plan.decode_rows, plan.prefill_tokens, plan.context_tokens, seconds)

    def _prefill_budget(self, plan: StepPlan, decodes: list[Request]) -> int:
        """Prompt tokens this step may prefill: ``max_prefill_tokens``, or with the time budget
        on and decode rows in the step, what the model says fits beside them (at least
        ``min_prefill_tokens``, so waiting prompts always progress)."""
        cap = self.config.max_prefill_tokens
        if self.step_time is None or not decodes:
            return cap  # off, or no running request whose next token a long step would delay
        plan.decode_rows = len(decodes)
        plan.context_tokens = context = sum(r.num_kv for r in decodes)
        if not (self.waiting or self.prefilling):
            return cap
        room = self.step_time.prefill_room(len(decodes), context, self.config.step_time_budget_ms * 1e-3)
        if room >= cap:
            return cap
        floor = max(self.config.min_prefill_tokens, self._backlog(cap * DRAIN_STEPS) // DRAIN_STEPS)
        return min(cap, max(floor, int(room)))

    def _backlog(self, enough: int) -> int:
        """Prompt tokens still to prefill (cached prefixes not yet subtracted), counted up to
        ``enough``: one addition per waiting request, only in steps the budget binds."""
        total = 0
        for group in (self.prefilling, self.waiting):
            for req in group:
                total += len(req.fill_ids) - req.prefilled
                if total >= enough:
                    return total
        return total

    def _decode(self, dec: shard_pb2.DecodeBatch) -> list[Request]:
        while True:
            reqs = [r for r in self.decoding if r.scheduled_tokens < r.stopping.max_new_tokens]
            if self._make_room(len(reqs)):
                break
            self._preempt(self._victim())
        if not reqs:
            return reqs
        if self.cache is not None and len(reqs) >= 2 and self.cache.shared_tokens >= CASCADE_MIN_PREFIX:
            reqs = self._prefix_groups(reqs, dec)
        slots = self.slots.alloc(len(reqs))
        assert slots is not None
        slot_ids = slots.tolist()
        for req, slot in zip(reqs, slot_ids):  # the hot loop: one pass, no numpy per request
            req.kv[req.num_kv] = slot  # room reserved at admission (see _start)
            req.num_kv += 1
            req.scheduled_tokens += 1
        dec.rows.extend([r.row for r in reqs])
        dec.slots.extend(slot_ids)
        return reqs

    def _prefix_groups(self, reqs: list[Request], dec: shard_pb2.DecodeBatch) -> list[Request]:
        """Order decode rows so rows sharing a cached prefix sit together, and tell the shard
        (cascade attention reads such a prefix once per group instead of once per row).

        Only when the rows that would share hold at least ``cascade_min_shared_tokens``: the
        merge of the two partial results costs a little on every row, so a small saving is
        not worth it (the shard also ignores groups in batches below its cascade graphs).
        """
        groups: dict[int, tuple[int, list[Request]]] = {}
        for req in reqs:
            anchor = req.node.shared_ancestor(req.exact_len) if req.node is not None else None
            if anchor is not None and anchor.depth >= CASCADE_MIN_PREFIX:
                groups.setdefault(id(anchor), (anchor.depth, []))[1].append(req)
        shared = sum(depth * len(m) for depth, m in groups.values() if len(m) > 1)
        if not shared or shared < self.config.cascade_min_shared_tokens:
            return reqs
        ordered: list[Request] = []
        for depth, members in groups.values():
            for i in range(0, len(members), CASCADE_GROUP_ROWS):
                chunk = members[i : i + CASCADE_GROUP_ROWS]
                if len(chunk) < 2:
                    continue
                ordered += chunk
                dec.shared_lens.extend([depth] * len(chunk))
                dec.group_sizes.extend([len(chunk)] + [0] * (len(chunk) - 1))
        self.counters.cascade_steps += 1
        grouped = {id(r) for r in ordered}
        rest = [r for r in reqs if id(r) not in grouped]
        dec.shared_lens.extend([0] * len(rest))
        dec.group_sizes.extend([0] * len(rest))
        return ordered + rest

    def _continue_prefills(self, plan: StepPlan, budget: int, step_id: int) -> int:
        for req in list(self.prefilling):
            if budget <= 0:
                break
            budget -= self._add_chunk(plan, req, budget, step_id)
        return budget

    def _admit(self, plan: StepPlan, budget: int, step_id: int) -> int:
        needs: list[KVNeed] | None = None  # the running batch's, once a candidate needs them
        i = 0
        while i < len(self.waiting) and budget > 0 and self.rows.num_free > 0:
            req = self.waiting[i]
            match = self._match(req, step_id)
            if self._defer(req, match):
                i += 1  # its prefix is being written by this step: it shares it from the next
                continue
            need = self._candidate_need(req, match)
            if needs is None:
                needs = [self._need(r) for r in (*self.prefilling, *self.decoding)]
            if not self.admission.fits([*needs, need], self._room(match)):
                break  # in queue order: later requests wait behind this one
            self.waiting.pop(i)
            self._start(plan, req, match)
            needs.append(need)
            budget -= self._add_chunk(plan, req, budget, step_id)
        return budget

    def _match(self, req: Request, step_id: int) -> Match | None:
        if self.cache is None or req.wants_prompt_logprobs:
            return None  # prompt logprobs need every prompt position computed
        # At least one token is computed, so the first new token has logits to come from.
        return self.cache.match(req.fill_ids[:-1], before_step=step_id)

    def _defer(self, req: Request, match: Match | None) -> bool:
        if match is not None and match.blocked >= DEFER_FOR_TOKENS:
            return True
        # Completions of one request share its prompt: siblings wait for the first to cache it.
        siblings = self.by_id.get(req.request_id, ())
        return self.cache is not None and any(r.state is State.PREFILLING for r in siblings if r is not req)

    def _start(self, plan: StepPlan, req: Request, match: Match | None) -> None:
        req.row = self.rows.alloc_one()
        req.state = State.PREFILLING
        # Room for every position the request can reach, so decode steps never grow it.
        req.kv = np.empty(req.prompt_len + req.stopping.max_new_tokens, np.int32)
        self._admissions += 1
        req.admitted = self._admissions
        if req.admitted_at is None:
            req.admitted_at = time.monotonic()
        first = req.preemptions == 0
        if first:
            self.counters.prefix_query_tokens += req.prompt_len
        if match is not None and match.length:
            assert self.cache is not None
            self.cache.lock(match.node)
            req.node, req.tree_len, req.exact_len = match.node, match.length, match.length
            req.append_kv(match.slots)
            req.prefilled = req.prefix_pending = match.length
            if first:
                req.cached_tokens = min(match.length, req.prompt_len)
                self.counters.prefix_hit_tokens += req.cached_tokens
        self.prefilling.append(req)
        plan.message.admit.append(_row_sampling(req, self.eos_ids))

    def _add_chunk(self, plan: StepPlan, req: Request, budget: int, step_id: int) -> int:
        n = min(budget, len(req.fill_ids) - req.prefilled)
        if not self._make_room(n):
            n = self.slots.num_free  # everything evictable is gone: take what is left
            if n == 0:
                return 0  # running requests will free some
        slots = self.slots.alloc(n)
        assert slots is not None
        pre = plan.message.prefill
        pre.rows.append(req.row)
        pre.starts.append(req.prefilled)
        pre.lens.append(n)
        pre.token_ids.extend(req.fill_ids[req.prefilled : req.prefilled + n])
        pre.slots.extend(slots.tolist())
        # The first chunk after a cache hit tells the shard where the cached prefix lives.
        pre.prefix_lens.append(req.prefix_pending)
        if req.prefix_pending:
            pre.prefix_slots.extend(req.kv[: req.prefix_pending].tolist())
            req.prefix_pending = 0
        self._ask_prompt_logprobs(plan, req, n)
        req.append_kv(slots)
        req.prefilled += n
        done = req.prefilled == len(req.fill_ids)
        pre.sample.append(done)
        plan.requests.append(req)
        self._cache_prefill(req, step_id)
        if done:  # decodes from the next step on: the shard will hold its next token
            plan.add_sampled(req)
            req.scheduled_tokens = len(req.output_ids) + 1
            req.state = State.DECODING
            self.prefilling.remove(req)
            self.decoding.append(req)
        else:
            self.counters.partial_prefills += 1
        return n

    def _ask_prompt_logprobs(self, plan: StepPlan, req: Request, n: int) -> None:
        pre, start = plan.message.prefill, req.prefilled
        wants = req.wants_prompt_logprobs
        pre.prompt_logprobs.append(wants)
        if not wants:
            return
        if start == 0:
            req.prompt_lps = []  # a resumed request recomputes them all
        prompt = req.prompt_ids
        pre.prompt_targets.extend(
            prompt[j + 1] if j + 1 < len(prompt) else -1 for j in range(start, start + n)
        )
        plan.prompt_lp.append((req, req.epoch, start, n))

    def _cache_prefill(self, req: Request, step_id: int) -> None:
        """Cache the prompt tokens just sent, so requests admitted from the next step share them."""
        if self.cache is None:
            return
        n = req.prefilled
        node, already = self.cache.insert(req.fill_ids[:n], req.kv[:n], step=step_id)
        if already > req.tree_len:
            req.dup_slots.append(req.kv[req.tree_len : already].copy())
        elif req.exact_len == req.tree_len:
            req.exact_len = n  # all its own: its positions now are the cache's
        self.cache.lock(node)
        if req.node is not None:
            self.cache.unlock(req.node)
        req.node, req.tree_len = node, n

    # ---- KV accounting ----------------------------------------------------------------
    def _need(self, req: Request) -> KVNeed:
        """KV a running request holds or will still fill, and how much more it may grow."""
        positions = req.num_kv + len(req.fill_ids) - req.prefilled
        held = positions - req.tree_len + sum(d.size for d in req.dup_slots)
        generated = max(req.scheduled_tokens, len(req.output_ids))
        final = req.prompt_len + self.admission.expected_output(generated, req.stopping.max_new_tokens) - 1
        return KVNeed(held, max(0, final - positions))

    def _candidate_need(self, req: Request, match: Match | None) -> KVNeed:
        cached = match.length if match is not None else 0
        generated = len(req.output_ids)
        final = req.prompt_len + self.admission.expected_output(generated, req.stopping.max_new_tokens) - 1
        return KVNeed(len(req.fill_ids) - cached, max(0, final - len(req.fill_ids)))

    def _room(self, match: Match | None) -> int:
        """Slots the running requests may use: all but those live requests lock in the cache."""
        if self.cache is None:
            return self.slots.capacity
        extra = self.cache.unlocked_on_path(match.node) if match is not None else 0
        return self.slots.capacity - self.cache.locked_tokens - extra

    def _make_room(self, n: int) -> bool:
        """Make ``n`` slots free, evicting cached tokens nobody uses if needed."""
        short = n - self.slots.num_free
        if short > 0 and self.cache is not None:
            # A little more than needed: each eviction pass walks the whole tree.
            self.cache.evict(max(short, EVICT_AT_LEAST))
        return self.slots.num_free >= n

    # ---- preemption ---------------------------------------------------------------------
    def _victim(self) -> Request:
        running = [*self.prefilling, *self.decoding]
        if len(running) <= 1:
            raise RuntimeError("KV pool too small for a single request; this is a scheduler bug")
        if self.config.scheduling_policy == "priority":
            return max(running, key=lambda r: (r.priority, r.admitted))
        return max(running, key=lambda r: r.admitted)

    def _preempt(self, req: Request) -> None:
        """Give back a running request's slots and row; it re-enters the queue to resume."""
        (self.prefilling if req.state is State.PREFILLING else self.decoding).remove(req)
        self._release_kv(req)
        req.state = State.WAITING
        req.epoch += 1
        req.preemptions += 1
        req.fill_ids = req.seq_ids
        req.prefilled = 0
        req.scheduled_tokens = len(req.output_ids)
        self.counters.preemptions += 1
        self._enqueue(req)

    def _enqueue(self, req: Request) -> None:
        bisect.insort(self.waiting, req, key=self._queue_key)

    def _queue_key(self, req: Request) -> tuple[int, int, int]:
        # Preempted requests go first (within their priority under the priority policy).
        prio = req.priority if self.config.scheduling_policy == "priority" else 0
        return (prio, 0 if req.preemptions else 1, req.arrival)

    def _release_kv(self, req: Request) -> None:
        """Cache the request's known tokens, free the rest of its slots and its row."""
        kv, start = req.kv[: req.num_kv], req.tree_len
        free = list(req.dup_slots)
        if self.cache is not None:
            seq = req.seq_ids
            known = min(req.num_kv, len(seq))
            if known > start:
                _, already = self.cache.insert(seq[:known], kv[:known])
                free.append(kv[start : max(start, already)])  # the cache had these already
                start = known
            if req.node is not None:
                self.cache.unlock(req.node)
        free.append(kv[start:])
        self.slots.free(np.concatenate(free))
        req.kv, req.num_kv, req.tree_len, req.node, req.dup_slots = np.empty(0, np.int32), 0, 0, None, []
        req.exact_len = 0
        self.rows.free([req.row])
        self._release.append(req.row)
        req.row = -1


def _row_sampling(req: Request, eos_ids: tuple[int, ...]) -> shard_pb2.RowSampling:
    stop, out = req.stopping, req.output
    msg = sampling.row_sampling(req.sampling, req.row)
    msg.min_new_tokens = stop.min_new_tokens
    msg.logprobs = out.logprobs or out.top_logprobs > 0
    msg.top_logprobs = out.top_logprobs
    if stop.min_new_tokens > 0:
        msg.suppress_ids.extend(stop.stop_token_ids)
        if not stop.ignore_eos:
            msg.suppress_ids.extend(eos_ids)
    if req.sampling.repetition_penalty != 1.0:
        msg.penalty_prompt_ids.extend(req.prompt_ids)
    # A resumed request's output so far: the shard's counters (seeded noise, penalties,
    # min_new_tokens) continue from there, so sampling goes on exactly as if never stopped.
    msg.generated_ids.extend(req.output_ids)
    if req.constraint is not None:
        msg.constraint.CopyFrom(req.constraint)
    return msg
