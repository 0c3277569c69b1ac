"""Shards started by hand (``lightllm-grpc shard``) and a coordinator attached with ``--shards``.

Two CPU shards rendezvous over loopback TCP (gloo) and listen on TCP ports, as shards on two
hosts would. The coordinator must serve them token-exact, refuse lists that are not one
group, and fail live calls UNAVAILABLE within 2 s when a shard dies.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from lightllm_grpc.bench.server import free_port
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler.remote_shards import LivenessProbe, ShardMismatch, check_agreement
from tests.reference import assert_greedy_equal, reference_greedy
from tests.server_harness import ServerProcess, greedy_request, make_served_model

PROMPTS = [[5], [17, 33, 90], [100 + i for i in range(30)], [7, 300, 12, 450, 61, 2, 99]]
NEW_TOKENS = 16


def _start_shard(model: Path, rank: int, rendezvous: str, log: Path) -> tuple[subprocess.Popen, str]:
    address = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "lightllm_grpc.cli", "shard", "--model", str(model), "--device", "cpu"]
    cmd += ["--rank", str(rank), "--world-size", "2", "--dist-init", rendezvous, "--listen", address]
    cmd += ["--max-prefill-tokens", "24"]  # the coordinator's; long prompts are chunked
    out = open(log, "wb")  # noqa: SIM115 (the child holds it; closed when the test's tmp_path goes)
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "LIGHTLLM_LOG_LEVEL": "INFO"}
    )
    return proc, address


def _refused(model: Path, shards: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lightllm_grpc.cli", "serve", "--model", str(model), "--device", "cpu"]
    cmd += ["--port", str(free_port()), "--shards", shards]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _last_line(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.strip().splitlines()[-1] if err.strip() else ""


def test_hand_started_shards_serve_exact_and_a_dead_shard_fails_calls(tmp_path) -> None:
    model = make_served_model("llama3", tmp_path / "llama3")
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    shards = [_start_shard(model, r, rendezvous, tmp_path / f"shard{r}.log") for r in range(2)]
    (p0, a0), (p1, a1) = shards
    server = None
    try:
        # Lists that are not ranks 0..N-1 of one group are refused before any step is sent,
        # so the shards stay up for the coordinator that lists them right.
        short, twice = _refused(model, a0), _refused(model, f"{a0},{a0}")
        code, line = _last_line(short)
        assert code == 2 and line.startswith("lightllm-grpc serve: ") and "world of 2" in line, line
        code, line = _last_line(twice)
        assert code == 2 and "ranks [0, 0]" in line and "world of" not in line, line
        assert p0.poll() is None and p1.poll() is None

        server = ServerProcess(
            model, tmp_path / "server.log", "--shards", f"{a0},{a1}", "--max-prefill-tokens", "24"
        )
        log = server.log()
        for rank, address in enumerate((a0, a1)):
            assert f"shard {rank}/2 at {address}: host=" in log and "device=cpu" in log, log
        responses = [server.stub.Generate(greedy_request(p, NEW_TOKENS)) for p in PROMPTS]
        for i, (resp, (ref, scores)) in enumerate(
            zip(responses, reference_greedy(model, PROMPTS, NEW_TOKENS))
        ):
            assert len(resp.token_ids) == NEW_TOKENS
            assert_greedy_equal(f"prompt {i}", list(resp.token_ids), ref, scores)
        assert server.info().kv_used_tokens == 0

        call = server.stub.GenerateStream(greedy_request([1, 2, 3], 400))
        next(iter(call))
        p1.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert time.monotonic() - killed < 2.0
        assert server.proc.wait(30) == 1
        assert "the engine can no longer serve" in server.log()
        # The surviving shard exits once its coordinator's step stream ends (its supervisor
        # then restarts the group); the coordinator never signalled it.
        assert p0.wait(30) == 0
    finally:
        if server is not None:
            server.stop()
        for proc, _ in shards:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def test_a_frozen_shard_fails_live_calls_within_seconds(tmp_path) -> None:
    """SIGSTOP: the shard's connection stays open but nothing answers, as when its host hangs
    or the network partitions; unanswered keepalive pings fail the step stream."""
    model = make_served_model("llama3", tmp_path / "llama3")
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    shards = [_start_shard(model, r, rendezvous, tmp_path / f"shard{r}.log") for r in range(2)]
    (_, a0), (p1, a1) = shards
    server = None
    try:
        server = ServerProcess(model, tmp_path / "server.log", "--shards", f"{a0},{a1}")
        call = server.stub.GenerateStream(greedy_request([1, 2, 3], 400))
        next(iter(call))
        p1.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert time.monotonic() - stopped < 3.0
        assert server.proc.wait(30) == 1
    finally:
        if server is not None:
            server.stop()
        for proc, _ in shards:
            proc.kill()
            proc.wait(10)


class _FakeShards:
    def __init__(self) -> None:
        self.answers: list[str | None] = []

    async def health(self, timeout: float) -> str | None:
        return self.answers.pop(0)


def test_liveness_probe_counts_only_idle_misses_in_a_row() -> None:
    fake = _FakeShards()
    probe = LivenessProbe(fake, misses_allowed=1)  # type: ignore[arg-type]
    fake.answers = ["shard 1 failed Health", None, "shard 1 failed Health", "shard 1 failed Health"]
    idle = lambda: False  # noqa: E731
    results = [asyncio.run(probe.check(idle)) for _ in range(4)]
    assert results == [None, None, None, "shard 1 failed Health"]
    assert asyncio.run(probe.check(lambda: True)) is None and probe.misses == 0  # busy: not probed
    turns = iter([False, True])  # work arrived while the probe waited: a miss proves nothing
    fake.answers = ["slow"]
    assert asyncio.run(probe.check(lambda: next(turns))) is None and probe.misses == 0


def _info(rank: int, world: int = 2, **kw) -> shard_pb2.InfoResponse:
    fields = dict(
        model_name="m", architecture="LlamaForCausalLM", dtype="float32", vocab_size=512, max_context=64
    )
    return shard_pb2.InfoResponse(rank=rank, world_size=world, **{**fields, **kw})


@pytest.mark.parametrize(
    ("infos", "needle"),
    [
        ([_info(0), _info(1, world=3)], "world of 3 but --shards lists 2"),
        ([_info(1), _info(0)], "list them in rank order"),
        ([_info(0), _info(1, dtype="bfloat16")], "disagree on dtype"),
        ([_info(0), _info(1, max_context=32)], "disagree on max_context"),
        ([_info(0, vocab_size=9), _info(1, vocab_size=9)], "give the coordinator the shards' model"),
    ],
)
def test_mismatched_shards_are_refused(infos: list[shard_pb2.InfoResponse], needle: str) -> None:
    with pytest.raises(ShardMismatch, match=needle):
        check_agreement(["a:1", "b:2"], infos, "LlamaForCausalLM", 512)


def test_agreeing_shards_pass() -> None:
    check_agreement(
        ["a:1", "b:2"], [_info(0, kv_capacity=100), _info(1, kv_capacity=90)], "LlamaForCausalLM", 512
    )
