"""grpc.health.v1 and reflection on a real server: readiness through start-up, stall, engine
death and shutdown, seen by ``Watch``; reflection lists the API without protos."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import generation_pb2_grpc
from tests.mesh_harness import NOT_SERVING, READINESS, SERVING, Watcher, check, spawn_server, wait_exit
from tests.server_harness import ServerProcess, greedy_request, make_served_model
from tests.test_faults import _children


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_served_model("llama", tmp_path_factory.mktemp("model") / "llama")


def test_readiness_through_startup_and_shutdown_and_reflection(model_dir, tmp_path) -> None:
    proc, address = spawn_server(model_dir, tmp_path / "server.log")
    watch = Watcher(address)
    try:
        watch.wait_for(NOT_SERVING)  # port bound, shards still loading
        assert check(address, "") == SERVING  # alive while loading: no restart
        with grpc.insecure_channel(address) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            try:
                stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
                assert check(address, READINESS) == SERVING  # it became ready meanwhile
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                assert "the server is starting" in err.details()
        watch.wait_for(SERVING)
        assert check(address, READINESS) == SERVING
        with pytest.raises(grpc.RpcError) as err:
            check(address, "no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        with grpc.insecure_channel(address) as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            services = set(db.get_services())
            assert {READINESS, "grpc.health.v1.Health"} <= services, services
            pool = DescriptorPool(db)
            methods = pool.FindServiceByName(READINESS).methods_by_name
            assert {"Generate", "GenerateStream", "Abort", "GetModelInfo"} <= set(methods)
            _generate_through_reflection_alone(ch, pool)

        log = (tmp_path / "server.log").read_text()
        assert "loading weights: 100%" in log  # the shard's progress bar
        (ready,) = [line for line in log.splitlines() if " ready: model=" in line]
        for field in (
            "dtype=float32",
            "tp=1",
            "kv_capacity_tokens=",
            f"listen=127.0.0.1:{address.split(':')[1]}",
        ):
            assert field in ready, ready
        assert "metrics=off" in ready

        proc.send_signal(signal.SIGTERM)
        watch.wait_for(NOT_SERVING)
        assert wait_exit(proc) == 0
    finally:
        watch.close()
        if proc.poll() is None:
            proc.kill()


def _generate_through_reflection_alone(channel: grpc.Channel, pool: DescriptorPool) -> None:
    """Call GenerateStream with message classes built from the server's reflection answers
    only (a pool of its own, not the generated stubs), as grpcurl or Postman do."""
    method = pool.FindServiceByName(READINESS).methods_by_name["GenerateStream"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    request = json_format.ParseDict(
        # ignore_eos: the default sampling draws unseeded, and an early EOS would end it with STOP.
        {"tokenIds": {"ids": [1, 2, 3]}, "stopping": {"maxNewTokens": 4, "ignoreEos": True}},
        request_cls(),
    )
    call = channel.unary_stream(
        f"/{READINESS}/GenerateStream",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    replies = [json_format.MessageToDict(m) for m in call(request, timeout=30)]
    assert replies[-1]["finishReason"] == "FINISH_REASON_LENGTH", replies
    assert sum(len(r.get("tokenIds", [])) for r in replies) == 4


def test_stalled_engine_is_not_ready_until_steps_complete_again(model_dir, tmp_path) -> None:
    server = ServerProcess(model_dir, tmp_path / "server.log", "--stall-timeout", "1")
    (shard,) = _children(server.proc.pid)
    watch = Watcher(server.address)
    try:
        watch.wait_for(SERVING)
        call = server.stub.GenerateStream(greedy_request([1, 2, 3], 300))
        next(iter(call))
        os.kill(shard, signal.SIGSTOP)  # alive, answers nothing: steps stop completing
        watch.wait_for(NOT_SERVING, timeout=10)
        assert "stalled: requests are pending" in server.log()
        os.kill(shard, signal.SIGCONT)
        watch.wait_for(SERVING, timeout=10)
        assert list(call)[-1].finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        os.kill(shard, signal.SIGCONT)
        watch.close()
        server.stop()


def test_engine_death_turns_readiness_and_liveness_off(model_dir, tmp_path) -> None:
    server = ServerProcess(model_dir, tmp_path / "server.log")
    (shard,) = _children(server.proc.pid)
    ready, alive = Watcher(server.address), Watcher(server.address, "")
    try:
        ready.wait_for(SERVING)
        alive.wait_for(SERVING)
        os.kill(shard, signal.SIGKILL)
        ready.wait_for(NOT_SERVING, timeout=10)
        alive.wait_for(NOT_SERVING, timeout=10)
        assert server.proc.wait(30) == 1
    finally:
        ready.close()
        alive.close()
        server.stop()
