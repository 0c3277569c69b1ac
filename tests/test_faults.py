"""Faults: a shard process that dies takes the server down cleanly, with clear statuses."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import grpc
import pytest

from lightllm_grpc.proto import shard_pb2, shard_pb2_grpc
from lightllm_grpc.server.app import STOP_TIMEOUT_S
from tests.server_harness import ServerProcess, greedy_request, make_served_model


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_shard_death_fails_requests_unavailable_and_exits(tmp_path) -> None:
    model_dir = make_served_model("llama", tmp_path / "llama")
    server = ServerProcess(model_dir, tmp_path / "server.log")
    try:
        call = server.stub.GenerateStream(greedy_request([1, 2, 3], 400))
        next(iter(call))
        (shard,) = _children(server.proc.pid)
        os.kill(shard, signal.SIGKILL)
        try:
            for _ in call:
                pass
            raise AssertionError("the stream ended normally after its shard died")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert server.proc.wait(30) == 1
        assert "the engine can no longer serve" in server.log()
    finally:
        server.stop()


def test_sigterm_stops_the_server_cleanly(tmp_path) -> None:
    model_dir = make_served_model("qwen2", tmp_path / "qwen2")
    server = ServerProcess(model_dir, tmp_path / "server.log")
    try:
        shards = _children(server.proc.pid)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        time.sleep(0.5)
        assert all(not Path(f"/proc/{pid}").exists() or "Z" in _state(pid) for pid in shards)
    finally:
        server.stop()


def _socket_dir(log: str) -> Path:
    match = re.search(r"listening on unix://(\S+)/shard-0\.sock", log)
    assert match, log
    return Path(match.group(1))


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_stuck_shard_fails_calls_and_exits_after_the_step_timeout(tmp_path) -> None:
    model_dir = make_served_model("llama", tmp_path / "llama")
    server = ServerProcess(model_dir, tmp_path / "server.log", "--step-timeout", "2")
    (shard,) = _children(server.proc.pid)
    try:
        call = server.stub.GenerateStream(greedy_request([1, 2, 3], 400))
        next(iter(call))
        os.kill(shard, signal.SIGSTOP)  # alive, but never answers again
        try:
            for _ in call:
                pass
            raise AssertionError("the stream ended normally while its shard was stopped")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert "step timeout" in err.details()
        failed = time.monotonic()
        assert server.proc.wait(30) == 1
        # The stuck shard is killed after a short grace, within the stop's bound (it waited
        # 10 s for the stopped shard to handle SIGTERM, blocking the bound's own timer).
        assert time.monotonic() - failed < STOP_TIMEOUT_S
        assert "the engine can no longer serve" in server.log()
    finally:
        if Path(f"/proc/{shard}").exists():
            os.kill(shard, signal.SIGKILL)
        server.stop()


def test_shard_clear_cache_is_refused_while_rows_are_live(tmp_path) -> None:
    model_dir = make_served_model("llama", tmp_path / "llama")
    server = ServerProcess(model_dir, tmp_path / "server.log")
    try:
        solo = server.stub.Generate(greedy_request([11, 12, 13], 200))
        call = server.stub.GenerateStream(greedy_request([11, 12, 13], 200))
        first = next(iter(call))
        address = f"unix://{_socket_dir(server.log())}/shard-0.sock"
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
            shard_pb2_grpc.ShardStub(channel).ClearCache(shard_pb2.ClearCacheRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        streamed = list(first.token_ids) + [t for msg in call for t in msg.token_ids]
        assert streamed == list(solo.token_ids)
    finally:
        server.stop()
