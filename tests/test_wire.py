"""Hostile input on the wire: malformed messages, oversized and unbounded fields, property-based
fuzzing. Every outcome is OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED, and nothing leaks."""

from __future__ import annotations

import grpc
import pytest

from lightllm_grpc.proto import generation_pb2 as pb
from tests.server_harness import ServerProcess, greedy_request, make_served_model

KV_TOKENS = 400


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_served_model("llama", tmp_path_factory.mktemp("model") / "llama")
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = ServerProcess(model_dir, log, "--max-total-tokens", str(KV_TOKENS), "--max-prefill-tokens", "64")
    yield srv
    srv.stop()


def _raw(server: ServerProcess, method: str, streaming: bool = False):
    path = f"/lightllm.v1.Generation/{method}"
    if streaming:
        call = server.channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        return lambda data: list(call(data, timeout=30))
    return server.channel.unary_unary(path, request_serializer=None, response_deserializer=None)


def _invalid_utf8_text() -> bytes:
    good = pb.GenerateRequest(text="abc").SerializeToString()
    return good.replace(b"abc", b"\xff\xfe\xfd")


MALFORMED = {
    "garbage": b"\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    "truncated": pb.GenerateRequest(text="hello there", request_id="x").SerializeToString()[:-4],
    "invalid-utf8": _invalid_utf8_text(),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
@pytest.mark.parametrize(
    ("method", "streaming"), [("Generate", False), ("GenerateStream", True), ("Tokenize", False)]
)
def test_malformed_message_is_invalid_argument(server, kind, method, streaming) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _raw(server, method, streaming)(MALFORMED[kind])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "not a valid lightllm.v1." in err.value.details()


def test_malformed_messages_log_one_line_not_tracebacks(server) -> None:
    before = server.log_path.read_text(errors="replace")
    for _ in range(20):
        with pytest.raises(grpc.RpcError):
            _raw(server, "Generate")(MALFORMED["garbage"])
    new = server.log_path.read_text(errors="replace")[len(before) :]
    assert "Traceback" not in new
    assert new.count("malformed request") <= 1
    assert server.wait_idle().kv_used_tokens == 0


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 9e-6])
def test_tiny_temperature_is_greedy(server, temperature) -> None:
    greedy = greedy_request([5, 6, 7, 8], 12)
    sampled = greedy_request([5, 6, 7, 8], 12)
    sampled.sampling.temperature = temperature
    sampled.sampling.seed = 3
    assert list(server.stub.Generate(sampled).token_ids) == list(server.stub.Generate(greedy).token_ids)
