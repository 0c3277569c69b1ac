"""The step socket: its frames, the shard's side of it and the coordinator's.

Every server test with spawned shards runs its steps over it (the start-up log says so, and
``test_spawned_shards_step_over_the_step_socket`` checks); these tests cover what those
cannot reach: torn frames, a shard that goes away mid-step, and the stream's end.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightllm_grpc import step_socket
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler.shard_client import ShardClient, ShardError
from lightllm_grpc.shard.service import ShardService
from lightllm_grpc.step_socket import FrameError, frame, read_frame, step_socket_path
from tests.server_harness import ServerProcess, greedy_request, make_served_model
from tests.test_shard_service import _Step


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def _frames(data: bytes) -> list[bytes]:
    reader, out = _reader(data), []
    while (payload := await read_frame(reader)) is not None:
        out.append(payload)
    return out


def test_frames_round_trip_and_a_close_between_frames_ends_the_stream() -> None:
    payloads = [b"", b"x", bytes(range(256)) * 300]
    assert asyncio.run(_frames(b"".join(frame(p) for p in payloads))) == payloads


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (frame(b"abcdef")[:2], "inside a frame header"),
        (frame(b"abcdef")[:7], "3 bytes into a 6-byte frame"),
        ((2**32 - 1).to_bytes(4, "little"), "exceeds"),
    ],
)
def test_a_torn_or_impossible_frame_is_an_error_not_an_end(data: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        asyncio.run(_frames(frame(b"ok") + data))


def test_a_message_over_the_limit_is_refused_before_it_is_sent(monkeypatch) -> None:
    monkeypatch.setattr(step_socket, "MAX_MESSAGE_BYTES", 8)
    frame(b"12345678")
    with pytest.raises(FrameError, match="9-byte step message exceeds the 8-byte limit"):
        frame(b"123456789")


def test_the_step_socket_sits_beside_a_unix_address_only() -> None:
    assert step_socket_path("unix:///tmp/d/shard-0.sock") == "/tmp/d/shard-0.sock.steps"
    assert step_socket_path("unix:rel/shard.sock") == "rel/shard.sock.steps"
    assert step_socket_path("127.0.0.1:6000") is None
    assert step_socket_path("[::1]:6000") is None


def _service(path: Path, after: float | None = 0.0) -> ShardService:
    runner = SimpleNamespace(launch=lambda msg: _Step(msg.step_id, after))
    return ShardService(SimpleNamespace(runner=runner), step_socket=str(path))


def _client(service: ShardService, remote: bool = False) -> ShardClient:
    """A coordinator's client whose Info call is answered by ``service`` in-process."""
    client = ShardClient([f"unix://{service.step_socket}.grpc"], remote=remote)

    class Stub:
        async def Info(self, request):
            return shard_pb2.InfoResponse(step_socket=service.step_socket)

        def Steps(self):
            raise AssertionError("the gRPC Steps stream was opened instead of the step socket")

    client.stubs = [Stub()]
    return client


def test_steps_go_over_the_socket_in_order_and_closing_it_ends_the_shards_stream(tmp_path) -> None:
    service = _service(tmp_path / "s.steps")

    async def main() -> list[int]:
        server = await asyncio.start_unix_server(service.serve_step_socket, service.step_socket)
        client = _client(service)
        await client.info()
        for step_id in (1, 2, 3):
            await client.send(shard_pb2.StepRequest(step_id=step_id))
        got = [(await asyncio.wait_for(client.receive(i), 5)).step_id for i in (1, 2, 3)]  # never hangs
        await client.close()
        await asyncio.wait_for(service.stream_ended.wait(), 5)  # so the shard process exits
        server.close()
        return got

    assert asyncio.run(main()) == [1, 2, 3]
    assert service.open_streams == 0


def test_a_shard_attached_with_shards_keeps_the_grpc_stream(tmp_path) -> None:
    """Its keepalive pings find a frozen shard in ~2 s; the step socket has none."""

    async def main() -> None:
        client = _client(_service(tmp_path / "s.steps"), remote=True)
        await client.info()
        await client.send(shard_pb2.StepRequest(step_id=1))

    with pytest.raises(AssertionError, match="gRPC Steps stream was opened"):
        asyncio.run(main())


async def _shard_that_answers(path: Path, answer: bytes) -> asyncio.AbstractServer:
    """A shard that reads one step, writes ``answer`` and closes: one that died mid-reply."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, str(path))


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"", "shard 0 closed its step stream"),
        (frame(shard_pb2.StepResult(step_id=1).SerializeToString())[:5], "step socket failed"),
        (frame(shard_pb2.StepResult(step_id=9).SerializeToString()), "answered step 9, expected 1"),
    ],
)
def test_a_shard_that_goes_away_mid_step_is_a_fatal_shard_error(tmp_path, answer: bytes, why: str) -> None:
    service = _service(tmp_path / "s.steps")

    async def main() -> None:
        server = await _shard_that_answers(tmp_path / "s.steps", answer)
        client = _client(service)
        await client.info()
        await client.send(shard_pb2.StepRequest(step_id=1))
        try:
            await asyncio.wait_for(client.receive(1), 5)
        finally:
            await client.close()
            server.close()

    with pytest.raises(ShardError, match=why) as err:
        asyncio.run(main())
    assert err.value.fatal


def test_a_garbled_frame_ends_the_shards_stream_without_a_traceback(tmp_path, caplog) -> None:
    service = _service(tmp_path / "s.steps")

    async def main() -> None:
        server = await asyncio.start_unix_server(service.serve_step_socket, service.step_socket)
        reader, writer = await asyncio.open_unix_connection(service.step_socket)
        writer.write(frame(b"\xff\xff\xff"))  # not a StepRequest
        await writer.drain()
        await asyncio.wait_for(service.stream_ended.wait(), 5)
        assert await reader.read() == b""  # the shard closed its end
        writer.close()
        server.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert "step socket:" in caplog.text and "Traceback" not in caplog.text
    assert service.open_streams == 0


def test_spawned_shards_step_over_the_step_socket(tmp_path) -> None:
    server = ServerProcess(make_served_model("llama", tmp_path / "llama"), tmp_path / "server.log")
    try:
        assert len(server.stub.Generate(greedy_request([1, 2], 4)).token_ids) == 4
        log = server.log()
        assert "shard 0: steps over its step socket " in log, log
        assert log.count(".sock.steps") >= 1 and "gRPC Steps stream" not in log
    finally:
        server.stop()


def test_a_step_socket_path_too_long_to_bind_leaves_the_shard_on_grpc(tmp_path, caplog) -> None:
    """The gRPC socket fits a unix path's ~107 bytes but ``PATH.steps`` need not: no step
    socket then, and Info offers none, so the coordinator opens ``Steps``."""
    from lightllm_grpc.shard.__main__ import _listen_step_socket

    service = _service(tmp_path / "unused")
    service.step_socket = ""
    address = "unix://" + str(tmp_path / ("x" * (104 - len(str(tmp_path)))))  # 105 bytes

    async def main():
        return await _listen_step_socket(service, address)

    with caplog.at_level(logging.WARNING):
        assert asyncio.run(main()) is None
    assert service.step_socket == "" and "steps go over gRPC" in caplog.text
