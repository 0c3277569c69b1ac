"""The engine fails loudly: an unexpected exception or a stuck shard fails every live call."""

from __future__ import annotations

import asyncio

from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler.request import FinishReason, Request, next_outputs
from tests.test_scheduler import make_engine, make_request


async def _final(req: Request, timeout: float = 5.0) -> str:
    """The error of the request's last output; fails (instead of hanging) if none comes."""
    while True:
        (out,) = await asyncio.wait_for(next_outputs(req.queue), timeout)
        if out.finish_reason is not FinishReason.NONE:
            return out.error


def test_unexpected_exception_fails_live_calls_and_kills_the_engine() -> None:
    async def main() -> None:
        engine, _ = make_engine(4096, 4, 4096)
        process = engine.outputs.process
        calls = 0

        def flaky(items) -> None:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise ZeroDivisionError("boom in output processing")
            process(items)

        engine.outputs.process = flaky  # type: ignore[method-assign]
        engine.start()
        reqs = [make_request(i, 5, 200) for i in range(3)]
        for r in reqs:
            engine.submit(r)
        errors = await asyncio.gather(*(_final(r) for r in reqs))
        assert all("ZeroDivisionError: boom in output processing" in e for e in errors)
        assert engine.dead and "engine loop" in engine.dead
        assert not engine.scheduler.by_id and engine.scheduler.stats().used == 0
        await engine.stop()

    asyncio.run(main())


def test_stuck_shard_fails_live_calls_after_the_step_timeout() -> None:
    async def main() -> None:
        engine, shard = make_engine(4096, 4, 4096)
        engine.step_timeout = 0.2
        receive = shard.receive
        received = 0

        async def stuck_after_three(step_id: int) -> shard_pb2.StepResult:
            nonlocal received
            received += 1
            if received > 3:
                await asyncio.Event().wait()  # alive but never answers
            return await receive(step_id)

        shard.receive = stuck_after_three  # type: ignore[method-assign]
        engine.start()
        req = make_request(0, 5, 200)
        engine.submit(req)
        error = await _final(req)
        assert "step timeout of 0.2s" in error
        assert engine.dead
        await engine.stop()

    asyncio.run(main())


def test_first_step_is_exempt_from_the_step_timeout() -> None:
    async def main() -> None:
        engine, shard = make_engine(4096, 4, 4096)
        engine.step_timeout = 0.05
        receive = shard.receive
        slow_once = [True]

        async def slow_first(step_id: int) -> shard_pb2.StepResult:
            if slow_once.pop() if slow_once else False:
                await asyncio.sleep(0.2)  # e.g. kernels compiling on the first real step
            return await receive(step_id)

        shard.receive = slow_first  # type: ignore[method-assign]
        engine.start()
        req = make_request(0, 5, 8)
        engine.submit(req)
        assert await _final(req) == ""
        assert engine.dead is None
        await engine.stop()

    asyncio.run(main())


def test_calls_hear_of_the_failure_even_when_freeing_them_fails() -> None:
    async def main() -> None:
        engine, _ = make_engine(4096, 4, 4096)

        def broken(*args) -> None:
            raise RuntimeError("bookkeeping is broken too")

        engine.outputs.process = broken  # type: ignore[method-assign]
        engine.scheduler.finish = broken  # type: ignore[method-assign]
        engine.outputs._finish = broken
        engine.start()
        req = make_request(0, 5, 50)
        engine.submit(req)
        assert "bookkeeping is broken too" in await _final(req)
        assert engine.dead
        engine._task.cancel()

    asyncio.run(main())
