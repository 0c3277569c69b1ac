"""Shards started by hand (``lightllm-grpc shard``) and a coordinator attached with ``--shards``.

Two CPU shards rendezvous over loopback TCP (gloo) and listen on TCP ports, as shards on two
hosts would. The coordinator must serve them token-exact, refuse lists that are not one
group, and fail live calls UNAVAILABLE within 2 s when a shard dies.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightllm_grpc.bench.allreduce import run_group
from lightllm_grpc.bench.server import free_port
from lightllm_grpc.cli import build_parser, server_config, shard_config
from lightllm_grpc.parallel import CustomAllReduce, set_custom_all_reduce
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler.remote_shards import LivenessProbe, ShardMismatch, check_agreement
from lightllm_grpc.scheduler.shard_client import tls_refusal
from tests.model_factory import greedy_logits, make_tiny_model
from tests.reference import assert_greedy_equal, reference_greedy
from tests.server_harness import ServerProcess, greedy_request, make_served_model
from tests.test_security import _ca, _signed

PROMPTS = [[5], [17, 33, 90], [100 + i for i in range(30)], [7, 300, 12, 450, 61, 2, 99]]
NEW_TOKENS = 16


def _start_shard(
    model: Path, rank: int, rendezvous: str, log: Path, *extra: str
) -> tuple[subprocess.Popen, str]:
    address = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "lightllm_grpc.cli", "shard", "--model", str(model), "--device", "cpu"]
    cmd += ["--rank", str(rank), "--world-size", "2", "--dist-init", rendezvous, "--listen", address]
    cmd += ["--max-prefill-tokens", "24", *extra]  # the coordinator's; long prompts are chunked
    out = open(log, "wb")  # noqa: SIM115 (the child holds it; closed when the test's tmp_path goes)
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "LIGHTLLM_LOG_LEVEL": "INFO"}
    )
    return proc, address


def _refused(model: Path, shards: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lightllm_grpc.cli", "serve", "--model", str(model), "--device", "cpu"]
    cmd += ["--port", str(free_port()), "--shards", shards, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _last_line(proc: subprocess.Popen) -> tuple[int, str]:
    """The exit code and the process's own last stderr line. gRPC's C core logs a failed TLS
    handshake (``I1127 23:53:48.974814 9927 ssl_transport_security.cc:...``) from its own
    thread, sometimes after the CLI's message: those lines are skipped."""
    _, err = proc.communicate(timeout=120)
    own = [line for line in err.strip().splitlines() if not re.match(r"[IWEF]\d{4} \d", line)]
    return proc.returncode, own[-1] if own else ""


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
        assert "all-reduce: gloo (CPU)" in (tmp_path / "shard0.log").read_text()
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


def test_shards_over_mutual_tls_and_coordinators_that_do_not_match_are_refused(tmp_path) -> None:
    """Shards serve mutual TLS (``--tls-cert/--tls-key/--tls-client-ca``); a coordinator with
    the CA and a client certificate serves through them. One without the CA (plaintext), one
    without a client certificate and one trusting another CA each exit 2 with one line."""
    d = tmp_path / "pki"
    d.mkdir()
    ca, rogue = _ca(d, "ca"), _ca(d, "rogue")
    shard_key, shard_cert = _signed(d, "shard", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1")
    client_key, client_cert = _signed(d, "coordinator", ca, "extendedKeyUsage=clientAuth")
    tls = ("--tls-cert", str(shard_cert), "--tls-key", str(shard_key), "--tls-client-ca", str(ca[1]))
    model = make_served_model("llama3", tmp_path / "llama3")
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    shards = [_start_shard(model, r, rendezvous, tmp_path / f"shard{r}.log", *tls) for r in range(2)]
    listed = ",".join(a for _, a in shards)
    client = ("--shard-tls-cert", str(client_cert), "--shard-tls-key", str(client_key))
    server = None
    try:
        refused = {
            "plaintext": _refused(model, listed),
            "no client certificate": _refused(model, listed, "--shard-tls-ca", str(ca[1])),
            "another CA": _refused(model, listed, "--shard-tls-ca", str(rogue[1]), *client),
        }
        lines = {name: _last_line(proc) for name, proc in refused.items()}
        for name, needle in [
            ("plaintext", "it serves TLS; give --shard-tls-ca"),
            ("no client certificate", "asks for a client certificate"),
            ("another CA", "does not verify against --shard-tls-ca"),
        ]:
            code, line = lines[name]
            assert code == 2 and line.startswith("lightllm-grpc serve: shard 0 at 127.0.0.1:"), (name, line)
            assert needle in line, (name, line)
        assert all(p.poll() is None for p, _ in shards)  # refused coordinators never opened a stream

        server = ServerProcess(
            model, tmp_path / "server.log", "--shards", listed, "--max-prefill-tokens", "24",
            "--shard-tls-ca", str(ca[1]), *client,
        )  # fmt: skip
        assert "(mutual TLS)" in server.log()
        ((ref, scores),) = reference_greedy(model, [PROMPTS[2]], NEW_TOKENS)
        resp = server.stub.Generate(greedy_request(PROMPTS[2], NEW_TOKENS))
        assert_greedy_equal("over mutual TLS", list(resp.token_ids), ref, scores)
    finally:
        if server is not None:
            server.stop()
        for proc, _ in shards:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def test_tls_refusals_are_named_from_grpc_errors() -> None:
    verify = "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: ...:CERTIFICATE_VERIFY_FAILED: x"
    assert "does not verify" in tls_refusal(verify, True, 0.0)
    plain = "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: ...:WRONG_VERSION_NUMBER: x"
    assert "does not serve TLS" in tls_refusal(plain, True, 0.0)
    closed = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"
    assert tls_refusal(closed, False, 0.5) is None  # a restarting shard may close one connection
    assert "give --shard-tls-ca" in tls_refusal(closed, False, 2.5)
    assert "client certificate" in tls_refusal(closed, True, 2.5)
    assert tls_refusal("Failed to connect to remote host: Connection refused", False, 9.0) is None


def test_tls_and_all_reduce_flags_reach_the_configs(tmp_path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("-")
    model = make_served_model("llama3", tmp_path / "llama3")
    base = ["shard", "--model", str(model), "--rank", "0", "--world-size", "1", "--listen", "127.0.0.1:1"]
    args = build_parser().parse_args([*base, "--disable-custom-all-reduce"])
    assert shard_config(args).custom_all_reduce is False
    assert shard_config(build_parser().parse_args(base)).fused_all_reduce is True
    args = build_parser().parse_args([*base, "--disable-fused-all-reduce"])
    assert shard_config(args).fused_all_reduce is False and shard_config(args).custom_all_reduce is True
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        shard_config(build_parser().parse_args([*base, "--tls-cert", str(pem)]))
    unix = [*base[:-1], "unix:///tmp/s.sock", "--tls-cert", str(pem), "--tls-key", str(pem)]
    with pytest.raises(ValueError, match="TCP --listen"):
        shard_config(build_parser().parse_args(unix))
    serve = ["serve", "--model", str(model), "--shards", "a:1,b:2"]
    cfg = server_config(build_parser().parse_args([*serve, "--shard-tls-ca", str(pem)]))
    assert cfg.shard_tls_ca == pem and cfg.shard.custom_all_reduce is True
    with pytest.raises(ValueError, match="needs --shard-tls-ca"):
        server_config(
            build_parser().parse_args([*serve, "--shard-tls-cert", str(pem), "--shard-tls-key", str(pem)])
        )
    with pytest.raises(ValueError, match="attached with --shards"):
        server_config(build_parser().parse_args(["serve", "--model", str(model), "--shard-tls-ca", str(pem)]))


def test_custom_all_reduce_path_depends_on_bytes_only() -> None:
    """One-shot up to 512 KiB, two-shot up to the buffer, NCCL beyond it or for what the
    kernels cannot take (another dtype, a size not in 4-byte words, a strided view)."""
    ar = CustomAllReduce(torch.empty(1 << 20, dtype=torch.bfloat16), "g")  # a 2 MiB buffer
    bf16 = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16)  # noqa: E731
    assert ar.path(bf16(1, 4096)) == "one_shot"
    assert ar.path(bf16(64, 4096)) == "one_shot"  # 512 KiB: decode at batch 64 of an 8B model
    assert ar.path(bf16(65, 4096)) == "two_shot"
    assert ar.path(bf16(256, 4096)) == "two_shot"
    assert ar.path(bf16(257, 4096)) == "nccl"
    assert ar.path(torch.empty(1, 4096)) == "nccl"  # float32 beside a bfloat16 buffer
    assert ar.path(bf16(3)) == "nccl"
    assert ar.path(bf16(8, 4096).t()) == "nccl"
    assert ar.path(bf16(4096 * 2 + 8)[8:]) == "one_shot"  # a view 16 bytes in: aligned
    assert ar.path(bf16(4096 * 2 + 8)[7:-1]) == "nccl"  # 14 bytes in


_RANK_MODULE = """
import argparse, json, sys, time
p = argparse.ArgumentParser()
for flag in ("--rank", "--world-size"):
    p.add_argument(flag, type=int)
p.add_argument("--dist-init")
p.add_argument("--result")
p.add_argument("--fail", type=int, default=-1)
a = p.parse_args()
if a.rank == a.fail:
    sys.exit(3)
if a.fail >= 0:
    time.sleep(60)  # a rank left alone waits in a collective that never completes
if a.rank == 0:
    open(a.result, "w").write(json.dumps({"world": a.world_size}))
"""


def test_rank_launcher_returns_rank0_result_and_kills_the_rest_when_one_fails(tmp_path, monkeypatch) -> None:
    """The GPU tests' and benchmarks' launcher (bench/allreduce.py ``run_group``): one failed
    rank must end the group at once, not leave the others waiting for it."""
    (tmp_path / "fake_rank.py").write_text(_RANK_MODULE)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    assert run_group("fake_rank", 2, [], timeout=60) == {"world": 2}
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ranks exited with \[-9, 3\]"):
        run_group("fake_rank", 2, ["--fail", "1"], timeout=60)
    assert time.monotonic() - started < 20


def _gloo_symm_mem_ops(calls: dict[str, int]) -> torch.library.Library:
    """CPU stand-ins for the symmetric-memory kernels (CUDA only): the same contracts (which
    tensor is read, which is written, in place or not) with gloo doing the sum."""
    lib = torch.library.Library("symm_mem", "IMPL")

    def summed(buf: torch.Tensor) -> torch.Tensor:
        total = buf.clone()
        dist.all_reduce(total)
        return total

    def copy_out(buf, local, op, group, out):
        calls["one_shot"] += 1
        buf[: local.numel()].copy_(local.view(-1))
        return out.copy_(summed(buf).view_as(out))

    def one_shot_out(buf, op, group, out):
        calls["one_shot"] += 1
        return out.copy_(summed(buf))

    def two_shot_(buf, op, group):
        calls["two_shot"] += 1
        return buf.copy_(summed(buf))

    lib.impl("one_shot_all_reduce_copy_out", copy_out, "CPU")
    lib.impl("one_shot_all_reduce_out", one_shot_out, "CPU")
    lib.impl("two_shot_all_reduce_", two_shot_, "CPU")
    return lib


def _custom_all_reduce_worker(rank: int, init_file: str, model_dir: Path, prompts, out_file: str) -> None:
    from lightllm_grpc.parallel import ParallelState, set_parallel_state

    set_parallel_state(ParallelState(rank, 2))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    calls = {"one_shot": 0, "two_shot": 0}
    lib = _gloo_symm_mem_ops(calls)
    row = 64 * 4  # the tiny model's hidden size, fp32
    try:
        results = {}
        # Decode (3 rows) one-shot, then two-shot; the 20-token prefill above the buffer: gloo.
        for name, one_shot_max, fused in [("one_shot", 3 * row, True), ("unfused", 3 * row, False),
                                          ("two_shot", 0, True)]:  # fmt: skip
            custom = CustomAllReduce(torch.zeros(8 * 64), "0", one_shot_max=one_shot_max)
            custom.fused_copy = fused
            set_custom_all_reduce(custom)
            before = dict(calls)
            results[name] = (greedy_logits(model_dir, prompts, 4), {k: calls[k] - before[k] for k in calls})
        torch.save(results, f"{out_file}.{rank}")
    finally:
        set_custom_all_reduce(None)
        del lib
        dist.destroy_process_group()


def test_custom_all_reduce_in_the_tp_layers_matches_plain_all_reduce(tmp_path) -> None:
    """Two gloo ranks with the kernels stood in for (they need CUDA): the P2P path's
    dispatch inside the real layers (views, in place, the value returned) keeps TP=2 logits
    equal to TP=1's, whichever path each message takes."""
    model_dir = make_tiny_model("llama3", tmp_path / "m", vocab_size=512)
    prompts = [[5, 9, 200, 17, 3, 8, 90], [44, 2], [7] * 11]
    expected = greedy_logits(model_dir, prompts, 4)
    out = str(tmp_path / "logits")
    mp.spawn(_custom_all_reduce_worker, (str(tmp_path / "init"), model_dir, prompts, out), nprocs=2)
    for rank in range(2):
        results = torch.load(f"{out}.{rank}")
        for name, (logits, calls) in results.items():
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0, msg=name)
            layers = 2 * 2 + 1  # two per decoder layer and the embedding's
            # + 1: the prefill's final norm all-reduces only the rows it samples (3, in the buffer).
            small = 4 * layers + 1
            want = (
                {"one_shot": small, "two_shot": 0}
                if name != "two_shot"
                else {"one_shot": 0, "two_shot": small}
            )
            assert calls == want, (name, calls)


def _lamport_worker(rank: int, init_file: str, model_dir: Path, prompts, bufs, out_file: str) -> None:
    from lightllm_grpc_kernels import lamport as kernels
    from lightllm_grpc_kernels.lamport import COUNTER, ERROR, STATE_LEN, LamportBuffers

    from lightllm_grpc.parallel import ParallelState, set_parallel_state

    set_parallel_state(ParallelState(rank, 2))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    calls = {"one_shot": 0, "two_shot": 0, "barrier-free alone": 0}
    lib = _gloo_symm_mem_ops(calls)
    alone = kernels.lamport_all_reduce

    def counted(x, buffers):  # an all-reduce kernel of its own, not folded into a norm
        calls["barrier-free alone"] += 1
        return alone(x, buffers)

    kernels.lamport_all_reduce = counted
    try:
        # Both ranks' buffers in shared memory, each at the address this process maps it.
        table = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
        state = torch.zeros(STATE_LEN, dtype=torch.int32)
        lamport = LamportBuffers(bufs[rank], table, state, rank, 2, bufs[rank].numel() // 6, 10**7)
        set_custom_all_reduce(CustomAllReduce(torch.zeros(8 * 64), "0", lamport=lamport))
        logits = greedy_logits(model_dir, prompts, 4)
        torch.save((logits, dict(calls), int(state[COUNTER]), int(state[ERROR])), f"{out_file}.{rank}")
    finally:
        set_custom_all_reduce(None)
        del lib
        dist.destroy_process_group()


def test_barrier_free_all_reduce_in_the_tp_layers_matches_tp1(tmp_path, monkeypatch) -> None:
    """Two gloo ranks whose barrier-free buffers are shared CPU memory and whose kernels run in
    Triton's interpreter, concurrently: the layers leave their partial sums to the norms that
    read them (AddNormLinear, the final norm), which all-reduce inside the norm kernel; TP=2
    logits equal TP=1's. Every small message takes that path (no one-shot call is left)."""
    from lightllm_grpc_kernels.lamport import SLOTS, new_buffers

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the spawned ranks inherit it
    model_dir = make_tiny_model("llama3", tmp_path / "m", vocab_size=512)
    prompts = [[5, 9, 200, 17, 3, 8, 90], [44, 2], [7] * 11]
    expected = greedy_logits(model_dir, prompts, 4)
    hidden = 64 * 4
    bufs = [new_buffers(torch.float32, 2, 3 * hidden, "cpu").share_memory_() for _ in range(2)]
    assert bufs[0].numel() == SLOTS * 2 * 3 * hidden
    out = str(tmp_path / "logits")
    mp.spawn(_lamport_worker, (str(tmp_path / "init"), model_dir, prompts, bufs, out), nprocs=2)
    for rank in range(2):
        logits, calls, counter, error = torch.load(f"{out}.{rank}")
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        # 4 decode steps of 5 reads of a partial sum (the first layer's input, two per layer
        # after it), and the prefill's final norm (its 3 sampled rows); the 20-token prefill's
        # other messages exceed the buffers (gloo). Only the final norm's (1 a step) is a
        # kernel of its own: the layers' norms fold theirs in.
        want_calls = {"one_shot": 0, "two_shot": 0, "barrier-free alone": 4 + 1}
        assert (counter, error, calls) == (4 * 5 + 1, 0, want_calls)


def test_the_barrier_free_path_takes_two_rows_or_more_that_fit() -> None:
    """One row (batch-1 decode) keeps the one-shot kernel, which measured as fast there; from
    two rows up to the buffers' size the barrier-free path (and the norms that fold it in)."""
    from lightllm_grpc_kernels.lamport import STATE_LEN, LamportBuffers, new_buffers

    bits = new_buffers(torch.float32, 2, 4 * 8, "cpu")
    state = torch.zeros(STATE_LEN, dtype=torch.int32)
    lamport = LamportBuffers(bits, torch.zeros(2, dtype=torch.int64), state, 0, 2, 4 * 8)
    custom = CustomAllReduce(torch.zeros(64), "0", lamport=lamport)
    assert [custom.path(torch.zeros(rows, 8)) for rows in (1, 2, 4, 5)] == [
        "one_shot", "lamport", "lamport", "one_shot"
    ]  # fmt: skip
    assert custom.lamport_for(torch.zeros(1, 8)) is None and custom.lamport_for(torch.zeros(3, 8)) is lamport


def _vote_worker(rank: int, init_file: str, out_file: str) -> None:
    """Each scenario: which step fails on which rank; every rank must reach the same answer."""
    import torch.distributed._symmetric_memory as symm_mem

    from lightllm_grpc import parallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    real_allocate, real_rendezvous = parallel._allocate, symm_mem.rendezvous
    answers = {}
    try:
        for name, bad_allocate, bad_rendezvous in [
            ("ok", (), ()),
            ("allocate fails on rank 0", (0,), ()),
            ("rendezvous fails on rank 1", (), (1,)),
        ]:

            def allocate(nbytes, dtype, device, devices, bad=bad_allocate):
                if rank in bad:
                    raise RuntimeError("no P2P here")
                return torch.empty(nbytes // dtype.itemsize, dtype=dtype)

            def rendezvous(buffer, group, bad=bad_rendezvous):
                if rank in bad:
                    raise RuntimeError("cannot map the peer")

            parallel._allocate, symm_mem.rendezvous = allocate, rendezvous
            custom, line = parallel.build_custom_all_reduce(1 << 20, torch.bfloat16, torch.device("cpu"))
            answers[name] = (custom is not None, line)
        parallel._allocate, symm_mem.rendezvous = real_allocate, real_rendezvous
        # Unpatched on CPU: symmetric memory is CUDA-only, so every rank keeps the plain path.
        answers["real, on CPU"] = parallel.build_custom_all_reduce(
            1 << 20, torch.bfloat16, torch.device("cpu")
        )
        answers["real, on CPU"] = (answers["real, on CPU"][0] is not None, answers["real, on CPU"][1])
        answers["float16"] = parallel.build_custom_all_reduce(1 << 20, torch.float16, torch.device("cpu"))[1]
        answers["barrier-free allocation fails on rank 0"] = _barrier_free_vote(rank, parallel, symm_mem)
        torch.save(answers, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def _barrier_free_vote(rank: int, parallel, symm_mem) -> tuple[bool, bool, str, int]:
    """The one-shot buffer maps on both ranks; the barrier-free one cannot be allocated on rank
    0. Returns (custom kept, barrier-free on, the log line, rendezvous calls made)."""
    real = parallel._allocate, parallel._lamport_alloc, symm_mem.rendezvous
    rendezvous_calls = []

    def lamport_alloc(dtype, max_elems, device):
        if rank == 0:
            raise RuntimeError("out of memory")
        return torch.zeros(3 * 2 * max_elems, dtype=torch.int16)

    parallel._allocate = lambda nbytes, dtype, device, devices: torch.empty(
        nbytes // dtype.itemsize, dtype=dtype
    )
    parallel._lamport_alloc = lamport_alloc
    symm_mem.rendezvous = lambda buffer, group: rendezvous_calls.append(buffer.dtype) or object()
    try:
        custom, line = parallel.build_custom_all_reduce(1 << 20, torch.bfloat16, torch.device("cpu"))
    finally:
        parallel._allocate, parallel._lamport_alloc, symm_mem.rendezvous = real
    return custom is not None, custom is not None and custom.lamport is not None, line, len(rendezvous_calls)


def test_ranks_agree_on_the_all_reduce_path_when_one_rank_cannot_map_peer_memory(tmp_path) -> None:
    """A rank that cannot allocate or map the symmetric buffer makes every rank keep NCCL,
    and none waits in a rendezvous the other gave up on (gloo ranks, the steps stood in for)."""
    out = str(tmp_path / "answers")
    mp.spawn(_vote_worker, (str(tmp_path / "init"), out), nprocs=2)
    a0, a1 = (torch.load(f"{out}.{r}") for r in range(2))
    barrier_free = "barrier-free allocation fails on rank 0"
    decided = {name: (a0[name][0], a1[name][0]) for name in a0 if name not in ("float16", barrier_free)}
    assert decided == {
        "ok": (True, True),
        "allocate fails on rank 0": (False, False),
        "rendezvous fails on rank 1": (False, False),
        "real, on CPU": (False, False),
    }
    assert a0["ok"][1].startswith("all-reduce: P2P over symmetric memory (")
    assert "one-shot <= 512 KiB, two-shot <= 1024 KiB" in a0["ok"][1]
    # The barrier-free buffers need real symmetric memory: both ranks keep it off, and say why.
    assert "barrier-free off: RuntimeError" in a0["ok"][1] and "barrier-free off" in a1["ok"][1]
    # One rank cannot allocate them: both keep the one-shot path without them, and rank 1
    # never entered the rendezvous rank 0 gave up before (one call: the one-shot buffer's).
    kept0, on0, line0, calls0 = a0[barrier_free]
    kept1, on1, line1, calls1 = a1[barrier_free]
    assert (kept0, on0, kept1, on1, calls0, calls1) == (True, False, True, False, 1, 1)
    assert "barrier-free off: RuntimeError: out of memory" in line0
    assert "barrier-free off: a peer failed" in line1
    # The rank that failed says why; the other, that a peer failed.
    assert a0["allocate fails on rank 0"][1].endswith("RuntimeError: no P2P here)")
    assert a1["allocate fails on rank 0"][1].endswith("a peer failed)")
    assert a1["rendezvous fails on rank 1"][1].endswith("RuntimeError: cannot map the peer)")
    assert a0["float16"] == "all-reduce: NCCL (torch.float16 has no P2P all-reduce kernel)"
