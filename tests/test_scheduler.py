"""The scheduler and engine against a fake shard that checks the slot bookkeeping."""

from __future__ import annotations

import asyncio

import pytest

from lightllm_grpc.config import SchedulerConfig
from lightllm_grpc.models.tiny_tokenizer import build_tokenizer
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler.engine import Engine
from lightllm_grpc.scheduler.output_processor import OutputProcessor
from lightllm_grpc.scheduler.request import (
    FinishReason,
    OutputOptions,
    Request,
    SamplingOptions,
    StopOptions,
    next_outputs,
)
from lightllm_grpc.scheduler.scheduler import Scheduler
from lightllm_grpc.text.detokenizer import Detokenizer

VOCAB = 300


def next_token(seq: list[int]) -> int:
    return (sum(seq) * 31 + len(seq)) % 200 + 50


class FakeShard:
    """Replays what a real shard does with rows and slots, and fails on any misuse.

    It keeps the token whose K/V each slot holds and each row's req_to_token slots, and
    samples from the tokens it *reads through the slots*: a prefix served from the wrong
    slots changes the output. A slot written while another live row reads it fails.
    """

    def __init__(self, capacity: int) -> None:
        self.row_slots: dict[int, list[int]] = {}  # row -> its req_to_token slots
        self.slot_token: dict[int, int] = {}  # slot -> token whose K/V it holds
        self.readers: dict[int, set[int]] = {}  # slot -> live rows that point at it
        self.pending: dict[int, int] = {}  # row -> last sampled token, not yet stored
        self.capacity = capacity
        self.max_batch = 0
        self.results: list[shard_pb2.StepResult] = []
        self.max_inflight = 0
        self.prefix_tokens = 0  # tokens rows took from a cached prefix
        self.groups_seen = 0  # decode prefix groups (cascade attention) checked

    def tokens(self, row: int) -> list[int]:
        return [self.slot_token[s] for s in self.row_slots.get(row, [])]

    def _point(self, row: int, slots: list[int]) -> None:
        for s in slots:
            assert 0 <= s < self.capacity
            self.readers.setdefault(s, set()).add(row)
        self.row_slots.setdefault(row, []).extend(slots)

    def _write(self, row: int, tokens: list[int], slots: list[int]) -> None:
        for s, t in zip(slots, tokens):
            others = self.readers.get(s, set()) - {row}
            assert not others, f"slot {s} overwritten while rows {others} read it"
            self.slot_token[s] = t
        self._point(row, slots)

    async def send(self, msg: shard_pb2.StepRequest) -> None:
        self.results.append(self._run(msg))
        self.max_inflight = max(self.max_inflight, len(self.results))

    async def receive(self, step_id: int) -> shard_pb2.StepResult:
        await asyncio.sleep(0)
        result = self.results.pop(0)
        assert result.step_id == step_id
        return result

    def _run(self, msg: shard_pb2.StepRequest) -> shard_pb2.StepResult:
        for row in msg.release_rows:
            for slot in self.row_slots.pop(row, []):
                self.readers[slot].discard(row)
            self.pending.pop(row, None)
        out = shard_pb2.StepResult(step_id=msg.step_id)
        p, off, poff = msg.prefill, 0, 0
        for i, row in enumerate(p.rows):
            n, k = p.lens[i], p.prefix_lens[i]
            if k:
                assert row not in self.row_slots, "a prefix written into a row in use"
                self._point(row, list(p.prefix_slots[poff : poff + k]))
                self.prefix_tokens += k
                poff += k
            assert p.starts[i] == len(self.row_slots.get(row, []))
            self._write(row, list(p.token_ids[off : off + n]), list(p.slots[off : off + n]))
            off += n
            if p.sample[i]:
                self._sample(out, row)
        self._check_groups(msg.decode)
        for row, slot in zip(msg.decode.rows, msg.decode.slots):
            assert row in self.pending, "decode of a row whose prompt was never sampled"
            self._write(row, [self.pending.pop(row)], [slot])
            self._sample(out, row)
        self.max_batch = max(self.max_batch, len(msg.decode.rows))
        return out

    def _check_groups(self, dec: shard_pb2.DecodeBatch) -> None:
        """A prefix group's rows must point at the same slots over the shared length."""
        if not dec.group_sizes:
            return
        assert len(dec.group_sizes) == len(dec.shared_lens) == len(dec.rows)
        for i, size in enumerate(dec.group_sizes):
            if size:
                n = dec.shared_lens[i]
                assert 2 <= size <= 16 and n > 0
                lead = self.row_slots[dec.rows[i]][:n]
                for j in range(i, i + size):
                    assert dec.shared_lens[j] == n and self.row_slots[dec.rows[j]][:n] == lead
                self.groups_seen += 1

    def _sample(self, out: shard_pb2.StepResult, row: int) -> None:
        tok = next_token(self.tokens(row))
        self.pending[row] = tok
        out.rows.append(row)
        out.token_ids.append(tok)


def assert_no_leak(s: Scheduler) -> None:
    st = s.stats()
    assert st.used == 0 and st.free + st.cached == st.total
    assert s.rows.num_free == s.rows.capacity and not s.by_id
    if s.cache is not None:
        assert s.cache.locked_tokens == 0


def expected(prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        tok = next_token(seq)
        out.append(tok)
        seq.append(tok)
    return out[:n]


TOKENIZER = build_tokenizer(VOCAB)


def make_engine(
    capacity: int, max_running: int, prefill_budget: int, max_messages: int = 128, **config: object
) -> tuple[Engine, FakeShard]:
    cfg = SchedulerConfig(max_running_requests=max_running, max_prefill_tokens=prefill_budget, **config)
    sched = Scheduler(cfg, capacity, max_running, eos_ids=(1,))
    detok = Detokenizer(TOKENIZER.backend_tokenizer)
    outputs = OutputProcessor(detok, (1,), 10_000, sched.finish, max_messages)
    shard = FakeShard(capacity)
    return Engine(sched, outputs, shard), shard  # type: ignore[arg-type]


def make_request(i: int, prompt_len: int, max_new: int) -> Request:
    prompt = [(i * 7 + j) % 200 + 20 for j in range(prompt_len)]
    return Request(
        request_id=f"r{i}",
        prompt_ids=prompt,
        sampling=SamplingOptions(temperature=0.0, seed=0),
        stopping=StopOptions(max_new_tokens=max_new, ignore_eos=True),
        output=OutputOptions(),
    )


async def collect(req: Request) -> list[int]:
    ids: list[int] = []
    while True:
        (out,) = await next_outputs(req.queue)
        ids += out.token_ids
        if out.finish_reason is not FinishReason.NONE:
            assert out.finish_reason is FinishReason.LENGTH
            return ids


@pytest.mark.parametrize(("capacity", "max_running", "budget"), [(4096, 8, 4096), (120, 3, 7)])
def test_continuous_batching_is_exact_and_leak_free(capacity: int, max_running: int, budget: int) -> None:
    async def main() -> None:
        engine, shard = make_engine(capacity, max_running, budget)
        engine.start()
        reqs = [make_request(i, 3 + (i * 5) % 23, 4 + (i * 3) % 11) for i in range(12)]
        for r in reqs[:6]:
            engine.submit(r)
        first = [asyncio.create_task(collect(r)) for r in reqs[:6]]
        await asyncio.sleep(0.01)
        for r in reqs[6:]:  # join a running batch
            engine.submit(r)
        results = await asyncio.gather(*first, *(collect(r) for r in reqs[6:]))
        for r, ids in zip(reqs, results):
            assert ids == expected(r.prompt_ids, r.stopping.max_new_tokens), r.request_id
        assert_no_leak(engine.scheduler)
        assert shard.max_batch > 1
        assert shard.max_inflight == 2  # steps are pipelined
        await engine.stop()

    asyncio.run(main())


def test_abort_frees_slots_at_once() -> None:
    async def main() -> None:
        engine, _ = make_engine(4096, 4, 4096)
        engine.start()
        reqs = [make_request(i, 10, 1000) for i in range(3)]
        for r in reqs:
            engine.submit(r)
        await asyncio.sleep(0.05)
        assert engine.scheduler.slots.num_used > 0
        for r in reqs:
            assert engine.abort(r.request_id)
        assert engine.scheduler.stats().used == 0
        assert not engine.abort("r0")  # idempotent: already gone
        await asyncio.sleep(0.01)
        await engine.stop()

    asyncio.run(main())


def test_admission_waits_for_kv_room() -> None:
    async def main() -> None:
        engine, shard = make_engine(40, 8, 4096, admission="conservative")
        engine.start()
        reqs = [make_request(i, 10, 20) for i in range(4)]  # each reserves 29 of 40 slots
        for r in reqs:
            engine.submit(r)
        await asyncio.sleep(0)
        results = await asyncio.gather(*(collect(r) for r in reqs))
        assert all(len(ids) == 20 for ids in results)
        assert shard.max_batch == 1  # two reservations never fit at once
        assert_no_leak(engine.scheduler)
        await engine.stop()

    asyncio.run(main())


def test_requests_stopping_on_eos_leave_nothing_behind() -> None:
    """Pipelined steps keep decoding a request whose EOS is still on its way; those extra
    tokens must be dropped and their slots returned."""

    async def main() -> None:
        engine, _ = make_engine(4096, 8, 4096)
        reqs = [make_request(i, 3 + i, 40) for i in range(8)]
        eos = expected(reqs[0].prompt_ids, 40)[5]
        engine.outputs._eos = frozenset({eos})
        reqs = [
            Request(r.request_id, r.prompt_ids, r.sampling, StopOptions(max_new_tokens=40), r.output)
            for r in reqs
        ]
        engine.start()
        for r in reqs:
            engine.submit(r)
        for r in reqs:
            ids: list[int] = []
            while True:
                (out,) = await next_outputs(r.queue)
                ids += out.token_ids
                if out.finish_reason is not FinishReason.NONE:
                    break
            full = expected(r.prompt_ids, 40)
            stop = full.index(eos) + 1 if eos in full else 40
            assert ids == full[:stop]
            assert out.finish_reason is (FinishReason.STOP if eos in full else FinishReason.LENGTH)
        await asyncio.sleep(0.01)
        assert_no_leak(engine.scheduler)
        await engine.stop()

    asyncio.run(main())


def test_busy_streams_are_coalesced_without_losing_anything() -> None:
    async def main() -> None:
        engine, _ = make_engine(4096, 8, 4096, max_messages=2)  # 8 streams: a message every 4 tokens
        engine.start()
        reqs = [make_request(i, 5, 17) for i in range(8)]
        for r in reqs:
            engine.submit(r)
        for r in reqs:
            msgs = []
            while not msgs or msgs[-1].finish_reason is FinishReason.NONE:
                msgs.append(await r.queue.get())
            ids = [t for m in msgs for t in m.token_ids]
            assert ids == expected(r.prompt_ids, 17)
            assert "".join(m.text for m in msgs) == TOKENIZER.decode(ids, skip_special_tokens=True)
            assert len(msgs[0].token_ids) == 1  # the first token is never held back
            assert len(msgs) <= 1 + 17 // 4 + 1
        await engine.stop()

    asyncio.run(main())


def shared_prefix_request(i: int, prefix: list[int], suffix_len: int, max_new: int, **kw: object) -> Request:
    suffix = [(i * 13 + j * 7) % 190 + 30 for j in range(suffix_len)]
    return Request(
        request_id=f"r{i}",
        prompt_ids=prefix + suffix,
        sampling=SamplingOptions(temperature=0.0, seed=0),
        stopping=StopOptions(max_new_tokens=max_new, ignore_eos=True),
        output=OutputOptions(),
        **kw,  # type: ignore[arg-type]
    )


def test_cached_prefixes_are_reused_and_give_the_same_tokens() -> None:
    async def main() -> None:
        engine, shard = make_engine(4096, 8, 4096)
        engine.start()
        prefix = [(j * 11) % 180 + 40 for j in range(50)]
        first = shared_prefix_request(0, prefix, 5, 10)
        engine.submit(first)
        assert await collect(first) == expected(first.prompt_ids, 10)
        later = [shared_prefix_request(i, prefix, 5, 10) for i in range(1, 6)]
        for r in later:
            engine.submit(r)
        for r in later:
            assert await collect(r) == expected(r.prompt_ids, 10)
            assert r.cached_tokens >= 50
        # The next turn of a conversation (prompt + answer + new text) hits prompt and answer.
        turn2 = shared_prefix_request(9, first.prompt_ids + first.output_ids, 4, 6)
        engine.submit(turn2)
        assert await collect(turn2) == expected(turn2.prompt_ids, 6)
        assert turn2.cached_tokens >= len(first.prompt_ids) + len(first.output_ids) - 1
        assert shard.prefix_tokens > 0
        c = engine.scheduler.counters
        assert c.prefix_hit_tokens >= 5 * 50 and c.prefix_query_tokens > c.prefix_hit_tokens
        assert_no_leak(engine.scheduler)
        await engine.stop()

    asyncio.run(main())


def test_requests_arriving_together_share_a_prefix_from_the_next_step() -> None:
    """All at once: the first request caches the prefix as it is sent; the others wait one
    step for it instead of prefilling it again."""

    async def main() -> None:
        engine, _ = make_engine(4096, 16, 4096)
        prefix = [(j * 5) % 180 + 40 for j in range(64)]
        reqs = [shared_prefix_request(i, prefix, 3, 5) for i in range(10)]
        for r in reqs:
            engine.submit(r)
        engine.start()
        for r in reqs:
            assert await collect(r) == expected(r.prompt_ids, 5)
        assert sum(r.cached_tokens >= 64 for r in reqs) == 9
        await engine.stop()

    asyncio.run(main())


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_preemption_under_pressure_loses_and_duplicates_nothing(policy: str) -> None:
    """A pool far too small for the batch the history predicts: requests are preempted,
    resume from the cache, and every stream still gets exactly its tokens."""

    async def main() -> None:
        engine, _shard = make_engine(160, 8, 16, scheduling_policy=policy)
        engine.start()
        prefix = [(j * 3) % 180 + 40 for j in range(12)]
        for i in range(25):  # a history of short outputs: Past-Future expects more short ones
            r = shared_prefix_request(100 + i, prefix, 2, 2)
            engine.submit(r)
            await collect(r)
        reqs = [shared_prefix_request(i, prefix, 4 + i % 5, 40, priority=i % 3) for i in range(12)]
        for r in reqs:
            engine.submit(r)
        for r in reqs:
            assert await collect(r) == expected(r.prompt_ids, 40), r.request_id
        assert engine.scheduler.counters.preemptions > 0
        assert any(r.preemptions for r in reqs)
        if policy == "priority":  # the lowest priority (highest value) is preempted first
            by_prio = {p: sum(r.preemptions for r in reqs if r.priority == p) for p in range(3)}
            assert by_prio[2] >= by_prio[0]
        assert_no_leak(engine.scheduler)
        await engine.stop()

    asyncio.run(main())


def test_mixed_load_with_cancellations_eviction_and_preemption_leaks_nothing() -> None:
    async def main() -> None:
        engine, _shard = make_engine(600, 16, 48)
        engine.start()
        prefixes = [[(j * (k + 3)) % 180 + 40 for j in range(20 + 10 * k)] for k in range(4)]
        reqs = [
            # long-tailed outputs: the history of short ones underestimates the long ones
            shared_prefix_request(i, prefixes[i % 4], 1 + i % 9, 80 if i % 10 == 3 else 1 + i % 5)
            for i in range(500)
        ]
        cancel = set(range(5, 500, 10))

        async def run(i: int, r: Request) -> None:
            await asyncio.sleep(0.0005 * i)
            engine.submit(r)
            if i in cancel:
                await asyncio.sleep(0.002)
                engine.abort(r.request_id)
                return
            assert await collect(r) == expected(r.prompt_ids, r.stopping.max_new_tokens), r.request_id

        await asyncio.gather(*(run(i, r) for i, r in enumerate(reqs)))
        for _ in range(5):
            await asyncio.sleep(0.01)
        s = engine.scheduler
        assert_no_leak(s)
        c = s.counters
        assert c.prefix_hit_tokens > 0 and c.partial_prefills > 0 and c.preemptions > 0, c
        freed = s.clear_cache()
        assert freed > 0 and s.stats().free == s.stats().total
        await engine.stop()

    asyncio.run(main())


def test_a_short_shared_prefix_does_not_hold_requests_back() -> None:
    """Prompts that share only a BOS-like token are all admitted in the same step."""

    async def main() -> None:
        engine, _ = make_engine(4096, 16, 4096)
        reqs = [shared_prefix_request(i, [7], 20, 3) for i in range(6)]
        for r in reqs:
            engine.submit(r)
        plan = engine.scheduler.schedule()
        assert plan is not None and len(plan.message.prefill.rows) == 6

    asyncio.run(main())


def test_rows_sharing_a_prefix_are_grouped_for_cascade_attention() -> None:
    async def main() -> None:
        engine, shard = make_engine(4096, 32, 4096, cascade_min_shared_tokens=1)
        engine.start()
        prefixes = [[(j * (k + 2)) % 180 + 40 for j in range(70 + k)] for k in range(2)]
        first = [shared_prefix_request(100 + k, p, 2, 2) for k, p in enumerate(prefixes)]
        for r in first:  # cache the prefixes
            engine.submit(r)
            await collect(r)
        reqs = [shared_prefix_request(i, prefixes[i % 2], 1 + i % 4, 12) for i in range(20)]
        for r in reqs:
            engine.submit(r)
        for r in reqs:
            assert await collect(r) == expected(r.prompt_ids, 12), r.request_id
        assert shard.groups_seen > 0
        assert_no_leak(engine.scheduler)
        await engine.stop()

    asyncio.run(main())


@pytest.mark.parametrize(("policy", "victim"), [("priority", 5), ("fcfs", 1)])
def test_preemption_victim_is_lowest_priority_then_latest_admitted(policy: str, victim: int) -> None:
    cfg = SchedulerConfig(max_running_requests=8, max_prefill_tokens=4096, scheduling_policy=policy)
    sched = Scheduler(cfg, 4096, 8, eos_ids=(1,))
    low = make_request(0, 5, 10)
    low.priority = 5
    sched.submit(low)
    assert sched.schedule() is not None  # admitted first
    for i, prio in ((1, 0), (2, 1)):
        req = make_request(i, 5, 10)
        req.priority = prio
        sched.submit(req)
    sched.schedule()
    assert sched._victim().priority == victim
