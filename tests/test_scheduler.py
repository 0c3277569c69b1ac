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
        for row, slot in zip(msg.decode.rows, msg.decode.slots):
            assert row in self.pending, "decode of a row whose prompt was never sampled"
            self._write(row, [self.pending.pop(row)], [slot])
            self._sample(out, row)
        self.max_batch = max(self.max_batch, len(msg.decode.rows))
        return out

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
