"""Start-up and shutdown with real processes: no shard outlives its coordinator, a port is
bound before the model loads and owned by one server, bad start-up input is one clear line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from lightllm_grpc.bench.server import free_port
from lightllm_grpc.config import ShardConfig
from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler.shard_client import ShardClient, ShardProcesses
from tests.server_harness import ServerProcess, greedy_request, make_served_model
from tests.test_faults import _children, _socket_dir, _state


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_served_model("llama", tmp_path_factory.mktemp("model") / "llama")


def _serve(model_dir: Path, log: Path, *extra: str, port: int | None = None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "lightllm_grpc.cli", "serve", "--device", "cpu", "--model", str(model_dir)]
    cmd += ["--port", str(port or free_port()), *extra]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def _gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether ``pid`` exits (or is a zombie nobody reaps) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _state(pid) in ("gone", "Z"):
            return True
        time.sleep(0.1)
    return False


def _wait_for_child(pid: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = _children(pid)
        if kids:
            return kids[0]
        time.sleep(0.05)
    raise AssertionError("no shard process was started")


def _kill(pids: list[int]) -> None:
    for pid in pids:
        if _state(pid) not in ("gone", "Z"):
            os.kill(pid, signal.SIGKILL)


def test_shard_dies_with_a_sigkilled_coordinator(model_dir, tmp_path) -> None:
    server = ServerProcess(model_dir, tmp_path / "server.log")
    (shard,) = _children(server.proc.pid)
    try:
        server.proc.kill()
        server.proc.wait(10)
        assert _gone(shard), "the shard outlived its SIGKILLed coordinator"
    finally:
        _kill([shard])
        server.stop()


def test_sigterm_during_startup_stops_the_shard(model_dir, tmp_path) -> None:
    proc = _serve(model_dir, tmp_path / "server.log")
    shard = _wait_for_child(proc.pid)
    try:
        time.sleep(0.5)  # the shard is importing torch / loading the model
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert _gone(shard), "a shard outlived a coordinator stopped during start-up"
    finally:
        _kill([shard, proc.pid])


def test_shard_exits_when_its_step_stream_ends(model_dir) -> None:
    async def main() -> None:
        procs = ShardProcesses(ShardConfig(model=model_dir, device="cpu", max_total_tokens=64, max_rows=4))
        procs.start()
        client = ShardClient(procs.addresses)
        try:
            await client.wait_ready(procs, 120)
            await client.send(shard_pb2.StepRequest(step_id=1))
            await client.receive(1)
            await client.close()  # as a dead remote coordinator's stream would end
            assert await asyncio.to_thread(procs.procs[0].wait, 20) == 0
        finally:
            await client.close()
            procs.stop()

    asyncio.run(main())


def test_unusable_host_fails_fast_before_loading_the_model(model_dir, tmp_path) -> None:
    log = tmp_path / "server.log"
    start = time.monotonic()
    proc = _serve(model_dir, log, "--host", "192.0.2.1")  # TEST-NET-1: on no machine
    try:
        assert proc.wait(30) == 2
    finally:
        _kill([proc.pid])
    text = log.read_text()
    assert "cannot listen on 192.0.2.1" in text
    assert "shard 0 listening" not in text and "Traceback" not in text
    assert time.monotonic() - start < 20


def test_second_server_on_the_same_port_fails(model_dir, tmp_path) -> None:
    first = ServerProcess(model_dir, tmp_path / "first.log")
    try:
        second = _serve(model_dir, tmp_path / "second.log", port=first.port)
        try:
            assert second.wait(30) == 2
        finally:
            _kill([second.pid])
        assert f"cannot listen on 127.0.0.1:{first.port}" in (tmp_path / "second.log").read_text()
        with grpc.insecure_channel(first.address) as ch:
            grpc.channel_ready_future(ch).result(timeout=5)
    finally:
        first.stop()


def test_shutdown_ends_streams_with_abort_and_ctrl_c_exits_cleanly(model_dir, tmp_path) -> None:
    server = ServerProcess(model_dir, tmp_path / "server.log", new_session=True)
    (shard,) = _children(server.proc.pid)
    try:
        sockets = _socket_dir(server.log())
        assert sockets.is_dir()
        calls = [server.stub.GenerateStream(greedy_request([1, 2, i], 400)) for i in range(3)]
        for call in calls:
            next(iter(call))
        os.killpg(server.proc.pid, signal.SIGINT)  # Ctrl-C in a terminal
        for call in calls:
            last = list(call)[-1]  # no error status
            assert last.finish_reason == pb.FINISH_REASON_ABORT
        assert server.proc.wait(30) == 0
        assert _gone(shard)
        log = server.log_path.read_text(errors="replace")
        assert "Traceback" not in log and "KeyboardInterrupt" not in log
        assert not sockets.exists(), "the shards' socket directory was left behind"
    finally:
        _kill([shard])
        server.stop()


def _without_hidden_size(model_dir: Path, out: Path) -> Path:
    out.mkdir()
    for f in model_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((out / "config.json").read_text())
    del config["hidden_size"]
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such folder"),
        ("empty", "has no config.json"),
        ("no-hidden-size", "config.json has no 'hidden_size'"),
        ("no-tokenizer", "cannot load its tokenizer: it has none of tokenizer.json"),
        ("broken-tokenizer", "cannot load its tokenizer: "),  # found while the shards start
    ],
)
def test_bad_model_folder_is_one_line_and_exit_2(model_dir, tmp_path, case, message) -> None:
    folder = tmp_path / case
    if case == "empty":
        folder.mkdir()
    elif case == "no-hidden-size":
        _without_hidden_size(model_dir, folder)
    elif case == "no-tokenizer":
        folder.mkdir()
        (folder / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    elif case == "broken-tokenizer":  # weights and all: the shards load, the tokenizer does not
        folder.mkdir()
        for f in model_dir.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        (folder / "tokenizer.json").write_text("{not json")
    log = tmp_path / "server.log"
    proc = _serve(folder, log)
    try:
        assert proc.wait(60) == 2
    finally:
        _kill([proc.pid])
    lines = log.read_text().strip().splitlines()
    assert lines[-1].startswith(f"lightllm-grpc serve: --model {folder}") and message in lines[-1], lines
    assert "Traceback" not in log.read_text()
    assert len(lines) <= 3 or case == "broken-tokenizer", lines  # there the shards had started, and logged
