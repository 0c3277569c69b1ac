"""SIGTERM drains: readiness NOT_SERVING at once, new calls UNAVAILABLE, live streams finish
or end with FINISH_REASON_ABORT at the drain timeout, shards stop, exit 0, nothing left."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from lightllm_grpc.cli import build_parser
from lightllm_grpc.proto import generation_pb2 as pb
from tests.mesh_harness import NOT_SERVING, SERVING, Watcher, wait_until
from tests.server_harness import ServerProcess, greedy_request, make_served_model
from tests.test_faults import _children, _socket_dir
from tests.test_lifecycle import _gone

# LONG cannot finish inside a 4 s drain on any machine (at 1 ms a step it needs 12 s); a
# 480-token stream once did on a fast CI runner. The model's context is raised to hold it.
SHORT, LONG = 24, 12_000
CONTEXT = 16_384
POOL = ["--max-total-tokens", str(26 * (LONG + 8))]  # every LONG stream admitted at once


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "llama"
    return make_served_model("llama", out, max_position_embeddings=CONTEXT)


class Streams:
    """``n`` streams read on threads; each ends as (last message, tokens) or an error code."""

    def __init__(self, server: ServerProcess, lengths: list[int]) -> None:
        self.calls = [
            server.stub.GenerateStream(greedy_request([1 + i % 200, 2, 3], n)) for i, n in enumerate(lengths)
        ]
        self.lengths = lengths
        self.started = threading.Barrier(len(lengths) + 1)
        self.pool = ThreadPoolExecutor(len(lengths))
        self.results = [self.pool.submit(self._read, c) for c in self.calls]
        self.started.wait(60)  # every stream has its first token: all are live

    def _read(self, call) -> tuple[pb.GenerateStreamResponse | None, int, float] | grpc.StatusCode:
        """(last message, tokens received, when the stream ended) or the error's code."""
        tokens, last, first = 0, None, True
        try:
            for msg in call:
                tokens, last = tokens + len(msg.token_ids), msg
                if first:
                    first = False
                    self.started.wait(60)
        except grpc.RpcError as err:
            return err.code()
        return last, tokens, time.monotonic()

    def outcomes(self) -> list:
        return [r.result(60) for r in self.results]


def _exit_code(server: ServerProcess, timeout: float = 30) -> int:
    try:
        return server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server did not exit:\n{server.log()}") from None


def test_sigterm_during_50_live_streams_drains_then_aborts_and_exits_0(model_dir, tmp_path) -> None:
    server = ServerProcess(model_dir, tmp_path / "server.log", "--drain-timeout", "4", *POOL)
    shards = _children(server.proc.pid)
    sockets = _socket_dir(server.log())
    watch = Watcher(server.address)
    try:
        watch.wait_for(SERVING)
        streams = Streams(server, [SHORT] * 25 + [LONG] * 25)
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        watch.wait_for(NOT_SERVING, timeout=2)
        with pytest.raises(grpc.RpcError) as err:
            server.stub.Generate(greedy_request([1, 2], 2), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in err.value.details()
        assert _exit_code(server) == 0
        took = time.monotonic() - sent
        outcomes = streams.outcomes()
        assert all(not isinstance(o, grpc.StatusCode) for o in outcomes), outcomes
        for (last, tokens, _), n in zip(outcomes, streams.lengths):
            if last.finish_reason == pb.FINISH_REASON_LENGTH:
                assert tokens == n
            else:
                assert last.finish_reason == pb.FINISH_REASON_ABORT and tokens < n
        finished_in_drain = [
            o for o in outcomes if o[0].finish_reason == pb.FINISH_REASON_LENGTH and o[2] > sent
        ]
        assert finished_in_drain, "no stream finished during the drain"
        cut = [o for o in outcomes if o[0].finish_reason == pb.FINISH_REASON_ABORT]
        assert cut, "no stream outlived the 4 s drain"
        assert 4.0 <= took < 25, took
        log = server.log()
        draining = re.search(r"draining: (\d+) live completion", log)
        assert draining and int(draining.group(1)) >= len(cut), log
        assert f"drain timeout: ending {len(cut)} completion(s)" in log
        assert all(_gone(pid) for pid in shards)
        assert not sockets.exists()
        assert "Traceback" not in log
    finally:
        watch.close()
        server.stop()


def test_second_sigterm_ends_the_drain_at_once(model_dir, tmp_path) -> None:
    server = ServerProcess(model_dir, tmp_path / "server.log", "--drain-timeout", "120", *POOL)
    try:
        streams = Streams(server, [LONG] * 3)
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "draining:" in server.log())  # one signal, handled, before the next
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert _exit_code(server) == 0
        assert time.monotonic() - sent < 15
        assert [o[0].finish_reason for o in streams.outcomes()] == [pb.FINISH_REASON_ABORT] * 3
    finally:
        server.stop()


def test_every_serve_flag_shows_its_default() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    missing = [
        a.option_strings[0]
        for a in serve._actions
        if a.option_strings and a.dest != "help" and "(default:" not in serve._get_formatter()._expand_help(a)
    ]
    assert not missing, missing
