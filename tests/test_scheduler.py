"""The scheduler and engine against a fake shard that checks the slot bookkeeping."""

from __future__ import annotations

import asyncio

import pytest

from lightllm_grpc.config import SchedulerConfig
from lightllm_grpc.models.tiny_tokenizer import build_tokenizer
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler.engine import Engine
from lightllm_grpc.scheduler.output_processor import OutputProcessor
from lightllm_grpc.scheduler.request import FinishReason, OutputOptions, Request, SamplingOptions, StopOptions
from lightllm_grpc.scheduler.scheduler import Scheduler
from lightllm_grpc.text.detokenizer import Detokenizer

VOCAB = 300


def next_token(seq: list[int]) -> int:
    return (sum(seq) * 31 + len(seq)) % 200 + 50


class FakeShard:
    """Replays what a real shard does with rows and slots, and fails on any misuse."""

    def __init__(self, capacity: int) -> None:
        self.rows: dict[int, list[int]] = {}  # row -> token ids whose K/V are stored
        self.slots: dict[int, list[int]] = {}
        self.slot_owner: dict[int, int] = {}
        self.pending: dict[int, int] = {}  # row -> last sampled token, not yet stored
        self.capacity = capacity
        self.max_batch = 0
        self.results: list[shard_pb2.StepResult] = []
        self.max_inflight = 0

    def _store(self, row: int, tokens: list[int], slots: list[int]) -> None:
        for s in slots:
            assert 0 <= s < self.capacity
            assert self.slot_owner.get(s, row) == row, "a slot was handed out twice"
            self.slot_owner[s] = row
        self.rows.setdefault(row, []).extend(tokens)
        self.slots.setdefault(row, []).extend(slots)

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
            self.rows.pop(row, None)
            for slot in self.slots.pop(row, []):
                del self.slot_owner[slot]
            self.pending.pop(row, None)
        out = shard_pb2.StepResult(step_id=msg.step_id)
        p, off = msg.prefill, 0
        for i, row in enumerate(p.rows):
            n = p.lens[i]
            assert p.starts[i] == len(self.rows.get(row, []))
            self._store(row, list(p.token_ids[off : off + n]), list(p.slots[off : off + n]))
            off += n
            if p.sample[i]:
                self._sample(out, row)
        for row, slot in zip(msg.decode.rows, msg.decode.slots):
            assert row in self.pending, "decode of a row whose prompt was never sampled"
            self._store(row, [self.pending.pop(row)], [slot])
            self._sample(out, row)
        self.max_batch = max(self.max_batch, len(msg.decode.rows))
        return out

    def _sample(self, out: shard_pb2.StepResult, row: int) -> None:
        tok = next_token(self.rows[row])
        self.pending[row] = tok
        out.rows.append(row)
        out.token_ids.append(tok)


def expected(prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        tok = next_token(seq)
        out.append(tok)
        seq.append(tok)
    return out[:n]


TOKENIZER = build_tokenizer(VOCAB)


def make_engine(
    capacity: int, max_running: int, prefill_budget: int, max_messages: int = 128
) -> tuple[Engine, FakeShard]:
    cfg = SchedulerConfig(max_running_requests=max_running, max_prefill_tokens=prefill_budget)
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
        out = await req.next_output()
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
        s = engine.scheduler
        assert s.slots.num_used == 0 and s.reserved == 0 and s.rows.num_free == s.rows.capacity
        assert not s.by_id
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
        assert engine.scheduler.slots.num_used == 0 and engine.scheduler.reserved == 0
        assert not engine.abort("r0")  # idempotent: already gone
        await asyncio.sleep(0.01)
        await engine.stop()

    asyncio.run(main())


def test_admission_waits_for_kv_room() -> None:
    async def main() -> None:
        engine, shard = make_engine(40, 8, 4096)
        engine.start()
        reqs = [make_request(i, 10, 20) for i in range(4)]  # each reserves 29 of 40 slots
        for r in reqs:
            engine.submit(r)
        await asyncio.sleep(0)
        results = await asyncio.gather(*(collect(r) for r in reqs))
        assert all(len(ids) == 20 for ids in results)
        assert shard.max_batch == 1  # two reservations never fit at once
        assert engine.scheduler.slots.num_used == 0
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
                out = await r.next_output()
                ids += out.token_ids
                if out.finish_reason is not FinishReason.NONE:
                    break
            full = expected(r.prompt_ids, 40)
            stop = full.index(eos) + 1 if eos in full else 40
            assert ids == full[:stop]
            assert out.finish_reason is (FinishReason.STOP if eos in full else FinishReason.LENGTH)
        await asyncio.sleep(0.01)
        s = engine.scheduler
        assert s.slots.num_used == 0 and s.reserved == 0 and not s.by_id
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
