"""Helpers for the mesh tests: health Watch in a thread, a server process started by hand."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lightllm_grpc.bench.server import free_port

READINESS = "lightllm.v1.Generation"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Watcher:
    """Streams ``Health.Watch(service)`` on a thread and records every status it gets."""

    def __init__(self, address: str, service: str = READINESS) -> None:
        # Retry the connection every 50 ms (gRPC's backoff starts at 1 s and grows), so a
        # watcher started before the port is bound still sees the first, short-lived status.
        fast_retry = [
            ("grpc.initial_reconnect_backoff_ms", 50),
            ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 100),
        ]
        self.channel = grpc.insecure_channel(address, options=fast_retry)
        stub = health_pb2_grpc.HealthStub(self.channel)
        self.call = stub.Watch(health_pb2.HealthCheckRequest(service=service), wait_for_ready=True)
        self.statuses: list[int] = []
        self.ended: grpc.StatusCode | None = None
        self._changed = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for msg in self.call:
                with self._changed:
                    self.statuses.append(msg.status)
                    self._changed.notify_all()
        except grpc.RpcError as err:
            self.ended = err.code()

    def wait_for(self, status: int, timeout: float = 60.0) -> None:
        """Wait until the latest status is ``status``."""
        with self._changed:
            ok = self._changed.wait_for(lambda: self.statuses[-1:] == [status], timeout)
        name = health_pb2.HealthCheckResponse.ServingStatus.Name
        assert ok, f"never {name(status)}; saw {[name(s) for s in self.statuses]}"

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


def check(address: str, service: str, **kw) -> int:
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5, **kw).status


def spawn_server(model_dir: Path, log: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """``serve`` in a child process, not waited for: start-up itself is under test."""
    port = free_port()
    cmd = [sys.executable, "-m", "lightllm_grpc.cli", "serve", "--device", "cpu", "--model", str(model_dir)]
    cmd += ["--port", str(port), *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    return proc, f"127.0.0.1:{port}"


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def wait_until(cond, timeout: float = 30.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(interval)
