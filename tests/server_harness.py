"""Helpers for end-to-end tests: a served tiny model, a CPU server, request builders."""

from __future__ import annotations

import time
from pathlib import Path

from lightllm_grpc.bench.server import LocalServer
from lightllm_grpc.models.tiny_tokenizer import save_tokenizer
from lightllm_grpc.proto import generation_pb2 as pb
from tests.model_factory import make_tiny_model


def make_served_model(arch: str, out_dir: Path, vocab_size: int = 512, **kw) -> Path:
    """A tiny random model of ``arch`` plus a locally trained tokenizer of the same vocabulary."""
    make_tiny_model(arch, out_dir, vocab_size=vocab_size, **kw)
    save_tokenizer(vocab_size, out_dir)
    return out_dir


class ServerProcess(LocalServer):
    """A server on the CPU, logging at INFO so tests can read what it said."""

    def __init__(
        self, model_dir: Path | None, log_path: Path, *extra: str, env: dict | None = None, **kw
    ) -> None:
        env = {"LIGHTLLM_LOG_LEVEL": "INFO", **(env or {})}
        super().__init__(model_dir, log_path, "--device", "cpu", *extra, env=env, **kw)

    def wait_idle(self, timeout: float = 10.0) -> pb.ServerInfo:
        """Wait until no request runs or waits; return the server info then."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            idle = info.running_requests == 0 and info.waiting_requests == 0 and info.kv_used_tokens == 0
            if idle or time.monotonic() > deadline:
                return info
            time.sleep(0.05)


def greedy_request(ids: list[int], max_new: int, **stopping) -> pb.GenerateRequest:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids))
    req.sampling.temperature = 0.0
    req.stopping.max_new_tokens = max_new
    req.stopping.ignore_eos = True
    for k, v in stopping.items():
        setattr(req.stopping, k, v)
    return req
