"""``serve --step-trace``: a JSON line per completed step, matching what the engine scheduled."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path

import pytest

from lightllm_grpc.cli import build_parser, server_config
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler.engine import Engine
from lightllm_grpc.scheduler.request import Request
from lightllm_grpc.scheduler.scheduler import StepPlan
from lightllm_grpc.scheduler.step_trace import StepTrace
from lightllm_grpc.server.app import StartupError, _step_trace
from tests.server_harness import ServerProcess, greedy_request, make_served_model
from tests.test_scheduler import FakeShard, collect, expected, make_engine, make_request

FIELDS = {
    "step", "sent", "result", "period_ms", "shard_ms", "fill_ms", "deliver_ms",
    "decode_rows", "prefill_tokens", "prefill_requests", "first_tokens",
}  # fmt: skip
SHARD_SECONDS = 0.002  # what the fake shard reports as its forward time


def _record_steps(shard: FakeShard) -> list[shard_pb2.StepRequest]:
    """Keep every step sent; report SHARD_SECONDS as each step's forward time."""
    sent: list[shard_pb2.StepRequest] = []
    send, receive = shard.send, shard.receive

    async def recording_send(msg: shard_pb2.StepRequest) -> None:
        sent.append(shard_pb2.StepRequest.FromString(msg.SerializeToString()))
        await send(msg)

    async def timed_receive(step_id: int) -> shard_pb2.StepResult:
        result = await receive(step_id)
        result.forward_seconds = SHARD_SECONDS
        return result

    shard.send = recording_send  # type: ignore[method-assign]
    shard.receive = timed_receive  # type: ignore[method-assign]
    return sent


async def _until_idle(engine: Engine) -> None:
    """Until the step loop waits for work (it clears ``_wake`` just before)."""
    for _ in range(200):
        if not engine._wake.is_set() and not engine._inflight and not engine.scheduler.has_work():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the engine did not go idle")


def _run_two(trace: StepTrace | None) -> tuple[Engine, list[shard_pb2.StepRequest], list[Request]]:
    """A (5-token prompt) and B (9) submitted together, 8 prefill tokens a step: step 1
    prefills A whole and B's first 3 tokens, step 2 decodes A beside B's last 6."""
    engine, shard = make_engine(4096, 4, 8)
    engine.trace = trace
    sent = _record_steps(shard)
    reqs = [make_request(0, 5, 4), make_request(1, 9, 4)]

    async def main() -> None:
        engine.start()
        for r in reqs:
            engine.submit(r)
        results = await asyncio.gather(*(collect(r) for r in reqs))
        for r, ids in zip(reqs, results):
            assert ids == expected(r.prompt_ids, 4)
        await _until_idle(engine)
        await engine.stop()

    asyncio.run(main())
    return engine, sent, reqs


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_line_per_step_with_what_was_scheduled(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    _, sent, _ = _run_two(StepTrace.open(path))
    lines = _lines(path)
    assert [line["step"] for line in lines] == [m.step_id for m in sent] == list(range(1, len(sent) + 1))
    for line, msg in zip(lines, sent):
        assert set(line) >= FIELDS
        assert line["decode_rows"] == len(msg.decode.rows)
        assert line["prefill_tokens"] == len(msg.prefill.token_ids)
        assert line["prefill_requests"] == len(msg.prefill.rows)
        assert line["shard_ms"] == SHARD_SECONDS * 1e3
        assert 0 < line["sent"] <= line["result"]
        assert line["period_ms"] >= 0 and line["fill_ms"] >= 0 and line["deliver_ms"] >= 0
    counts = [(line["decode_rows"], line["prefill_tokens"], line["prefill_requests"]) for line in lines]
    assert counts[:4] == [(0, 8, 2), (1, 6, 1), (2, 0, 0), (2, 0, 0)]


def test_a_request_is_listed_by_the_step_that_delivered_its_first_token(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    _, _, (a, b) = _run_two(StepTrace.open(path))
    lines = _lines(path)
    listed = {line["step"]: line["first_tokens"] for line in lines if line["first_tokens"]}
    assert sorted(listed) == [1, 2]  # A's prompt ends in step 1, B's in step 2
    for step, req in ((1, a), (2, b)):
        (entry,) = listed[step]
        assert entry["request_id"] == req.request_id and entry["index"] == 0
        times = {"arrived": req.arrived_at, "admitted": req.admitted_at, "first_token": req.first_token_at}
        for key, at in times.items():
            assert at is not None and entry[key] == pytest.approx(at, abs=1e-6)
        line = lines[step - 1]
        assert entry["arrived"] <= entry["admitted"] <= line["sent"] <= line["result"] <= entry["first_token"]


def test_off_by_default_and_then_no_file_is_written(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["serve", "--model", str(tmp_path)])
    cfg = server_config(args)
    assert cfg.step_trace is None and _step_trace(cfg) is None
    engine, _, _ = _run_two(None)
    assert engine.trace is None
    assert list(tmp_path.iterdir()) == []


def test_the_flag_reaches_the_config_and_a_bad_path_fails_start_up(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    cfg = server_config(
        build_parser().parse_args(["serve", "--model", str(tmp_path), "--step-trace", str(path)])
    )
    assert cfg.step_trace == path
    trace = _step_trace(cfg)
    assert trace is not None and trace.on and path.exists()
    trace.close()
    with pytest.raises(ValueError, match="no such directory"):
        server_config(
            build_parser().parse_args(["serve", "--step-trace", str(tmp_path / "nope" / "t.jsonl")])
        )
    directory = server_config(
        build_parser().parse_args(["serve", "--model", str(tmp_path), "--step-trace", str(tmp_path)])
    )
    with pytest.raises(StartupError, match="--step-trace"):
        _step_trace(directory)


def _plan(step_id: int) -> StepPlan:
    return StepPlan(shard_pb2.StepRequest(step_id=step_id))


def test_lines_are_written_in_batches_and_on_close(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    trace = StepTrace(path.open("w"), flush_lines=2)
    result = shard_pb2.StepResult()
    times = {"result_at": 1.0, "period": 0.01, "fill_s": 0.0, "deliver_s": 0.0, "first": []}
    written = []
    for step in (1, 2, 3):
        trace.record(_plan(step), result, **times)
        written.append(len(_lines(path)))
    assert written == [0, 2, 2]
    trace.close()
    assert [line["step"] for line in _lines(path)] == [1, 2, 3]


def _engine_holding_lines(path: Path) -> Engine:
    """An engine whose trace writes only when flushed or closed (never by line count)."""
    engine, _ = make_engine(4096, 4, 8)
    engine.trace = StepTrace(path.open("w"), flush_lines=10_000)
    return engine


def test_the_engine_flushes_the_trace_when_it_goes_idle(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    engine = _engine_holding_lines(path)

    async def main() -> None:
        engine.start()
        req = make_request(0, 5, 3)
        engine.submit(req)
        await collect(req)
        await _until_idle(engine)
        assert len(_lines(path)) >= 3  # on disk while the server runs on
        await engine.stop()

    asyncio.run(main())


def test_stopping_a_busy_engine_writes_the_lines_still_held(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    engine = _engine_holding_lines(path)

    async def main() -> None:
        engine.start()
        req = make_request(0, 5, 1000)
        engine.submit(req)
        while len(req.output_ids) < 5:
            await asyncio.sleep(0)
        assert path.read_text() == ""  # held: the engine never went idle
        await engine.stop()

    asyncio.run(main())
    assert len(_lines(path)) >= 5


class _FullDisk(io.StringIO):
    def write(self, s: str) -> int:
        raise OSError(28, "No space left on device")


def test_a_write_error_turns_the_trace_off_and_the_engine_serves_on(caplog) -> None:
    trace = StepTrace(_FullDisk(), flush_lines=1)
    with caplog.at_level(logging.ERROR, logger="lightllm_grpc.scheduler.step_trace"):
        engine, sent, _ = _run_two(trace)
    assert len(sent) > 2 and engine.dead is None
    assert not trace.on
    errors = [r for r in caplog.records if "step trace" in r.getMessage()]
    assert len(errors) == 1 and "No space left" in errors[0].getMessage()


def test_serve_writes_the_trace(tmp_path) -> None:
    model = make_served_model("llama", tmp_path / "model")
    path = tmp_path / "steps.jsonl"
    server = ServerProcess(
        model, tmp_path / "server.log", "--step-trace", str(path), "--max-total-tokens", "400"
    )
    try:
        for i in range(2):
            req = greedy_request([11 + i, 12, 13, 14, 15, 16, 17, 18], 1)
            req.request_id = f"ttft-{i}"
            server.stub.Generate(req, timeout=60)
    finally:
        server.stop()
    lines = _lines(path)
    firsts = {e["request_id"]: line for line in lines for e in line["first_tokens"]}
    assert set(firsts) == {"ttft-0", "ttft-1"}
    for line in firsts.values():
        assert line["prefill_tokens"] == 8 and line["prefill_requests"] == 1 and line["decode_rows"] == 0
        assert line["shard_ms"] > 0  # the real shard reports its forward time
