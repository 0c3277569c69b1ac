"""The shard's step stream when the coordinator goes away with a step still on the device."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.shard.service import ShardService


class _Step:
    """A launched step that finishes on the device ``after`` seconds from now (None: never, as
    one whose all-reduce waits on a dead peer)."""

    def __init__(self, step_id: int, after: float | None) -> None:
        self.step_id = step_id
        self.ready_at = None if after is None else time.monotonic() + after

    def done(self) -> bool:
        return self.ready_at is not None and time.monotonic() >= self.ready_at

    def finish(self) -> shard_pb2.StepResult:
        assert self.done(), "finish() would block for ever on a step that never finishes"
        return shard_pb2.StepResult(step_id=self.step_id)


def _stream(after: float | None, abandon_after_s: float) -> tuple[list[int], list, ShardService]:
    """One step sent, then the stream closed while it runs; what came back and what was abandoned."""
    abandoned: list = []
    runner = SimpleNamespace(launch=lambda msg: _Step(msg.step_id, after))
    service = ShardService(
        SimpleNamespace(runner=runner), abandon_after_s, lambda step_id, waited: abandoned.append(step_id)
    )

    async def requests():
        yield shard_pb2.StepRequest(step_id=7)

    async def main() -> list[int]:
        return [r.step_id async for r in service.Steps(requests(), None)]

    return asyncio.run(main()), abandoned, service


def test_a_step_that_never_finishes_is_abandoned_once_the_stream_ended() -> None:
    start = time.monotonic()
    results, abandoned, service = _stream(None, abandon_after_s=0.3)
    assert results == [] and abandoned == [7]
    assert 0.3 <= time.monotonic() - start < 5
    assert service.stream_ended.is_set()  # so serve_shard goes on to exit


def test_a_step_that_finishes_in_time_still_answers_after_the_stream_ended() -> None:
    results, abandoned, _ = _stream(0.2, abandon_after_s=5.0)
    assert results == [7] and abandoned == []


def test_the_default_is_to_exit_the_shard_process_with_status_1() -> None:
    """``os._exit``: a normal exit would wait on the stuck device work as well."""
    import subprocess
    import sys

    code = (
        "import logging, tests.test_shard_service as t\n"
        "logging.basicConfig()\n"
        "t._default_stream()\n"
        "print('not reached')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out
    assert "still on the device" in out.stderr and "not reached" not in out.stdout


def _default_stream() -> None:
    runner = SimpleNamespace(launch=lambda msg: _Step(msg.step_id, None))
    service = ShardService(SimpleNamespace(runner=runner), abandon_after_s=0.2)

    async def requests():
        yield shard_pb2.StepRequest(step_id=3)

    async def main() -> None:
        async for _ in service.Steps(requests(), None):
            pass

    asyncio.run(main())
