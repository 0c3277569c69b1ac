"""A server started as a subprocess on a free port: for benchmarks and end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import generation_pb2_grpc

ROWS_HELP = "the servers' --max-running-requests (default: the server's own, by the card)"


def rows_flags(rows: int | None) -> list[str]:
    """A bench's ``--max-running`` as serve flags: none, so the server's default, unless given."""
    return [] if rows is None else ["--max-running-requests", str(rows)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``lightllm-grpc serve`` in a child process; ready once GetServerInfo answers."""

    def __init__(
        self,
        model_dir: Path | None,
        log_path: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        start_timeout: float = 180.0,
        cwd: Path | None = None,
        new_session: bool = False,
    ) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lightllm_grpc.cli", "serve", "--port", str(self.port)]
        if model_dir is not None:
            cmd += ["--model", str(model_dir)]
        cmd += list(extra)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=new_session,  # a process group of its own, as a terminal gives
        )
        self.channel = grpc.insecure_channel(self.address)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self._wait_ready(start_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=1.0)
                return
            except grpc.RpcError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout:.0f}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def info(self) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest())

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()
