"""Start a real server (coordinator + shard processes) on a free port for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from lightllm_grpc.models.tiny_tokenizer import save_tokenizer
from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import generation_pb2_grpc
from tests.model_factory import make_tiny_model

START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_served_model(arch: str, out_dir: Path, vocab_size: int = 512, **kw) -> Path:
    """A tiny random model of ``arch`` plus a locally trained tokenizer of the same vocabulary."""
    make_tiny_model(arch, out_dir, vocab_size=vocab_size, **kw)
    save_tokenizer(vocab_size, out_dir)
    return out_dir


class ServerProcess:
    def __init__(self, model_dir: Path | None, log_path: Path, *extra: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "lightllm_grpc.cli",
            "serve",
            "--port",
            str(self.port),
            "--device",
            "cpu",
        ]
        if model_dir is not None:
            cmd += ["--model", str(model_dir)]
        cmd += list(extra)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        full_env = {**os.environ, "LIGHTLLM_LOG_LEVEL": "INFO", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=1.0)
                return
            except grpc.RpcError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {START_TIMEOUT_S}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def info(self) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest())

    def wait_idle(self, timeout: float = 10.0) -> pb.ServerInfo:
        """Wait until no request runs or waits; return the server info then."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            idle = info.running_requests == 0 and info.waiting_requests == 0 and info.kv_used_tokens == 0
            if idle or time.monotonic() > deadline:
                return info
            time.sleep(0.05)

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def greedy_request(ids: list[int], max_new: int, **stopping) -> pb.GenerateRequest:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids))
    req.sampling.temperature = 0.0
    req.stopping.max_new_tokens = max_new
    req.stopping.ignore_eos = True
    for k, v in stopping.items():
        setattr(req.stopping, k, v)
    return req
