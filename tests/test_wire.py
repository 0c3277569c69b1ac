"""Hostile input on the wire: malformed messages, oversized and unbounded fields, property-based
fuzzing. Every outcome is OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED, and nothing leaks."""

from __future__ import annotations

import itertools
import threading
import time

import grpc
import pytest

from lightllm_grpc.proto import generation_pb2 as pb
from tests.server_harness import ServerProcess, greedy_request, make_served_model

# A stream long enough to outlive any action measured beside it on any machine (~1 ms a token
# on this model on CPU: 12 s); the context and pool are raised to hold it.
LIVE_TOKENS = 12_000
KV_TOKENS = LIVE_TOKENS + 400


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "llama"
    model_dir = make_served_model("llama", out, max_position_embeddings=16_384)
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


HUGE_TEXT = "lorem ipsum dolor sit amet " * 400_000  # ~10.8 MB


def _gaps_while(server: ServerProcess, action) -> float:
    """The longest pause between a live stream's messages while ``action`` runs."""
    call = server.stub.GenerateStream(greedy_request([1, 2, 3], LIVE_TOKENS))
    stamps: list[float] = []

    def read() -> None:
        try:
            stamps.extend(time.monotonic() for _ in call)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.CANCELLED

    reader = threading.Thread(target=read)
    reader.start()
    while not stamps:
        time.sleep(0.01)
    action()
    assert not call.done(), "the stream ended before the action did: its gaps say nothing"
    call.cancel()
    reader.join(30)
    return max(b - a for a, b in itertools.pairwise(stamps))


def _expect_invalid(fn, field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert field in err.value.details()


def test_huge_text_is_refused_before_tokenizing_without_stalling_streams(server) -> None:
    def hostile() -> None:
        _expect_invalid(lambda: server.stub.Generate(pb.GenerateRequest(text=HUGE_TEXT)), "text is")
        _expect_invalid(lambda: server.stub.Tokenize(pb.TokenizeRequest(text=HUGE_TEXT)), "text is")
        chat = pb.Chat(messages=[pb.ChatMessage(role="user", content=HUGE_TEXT)])
        _expect_invalid(
            lambda: server.stub.Generate(pb.GenerateRequest(chat=chat)), "chat.messages[0].content"
        )

    assert _gaps_while(server, hostile) < 1.0
    assert server.wait_idle().kv_used_tokens == 0


def _with_stop_ids(n: int) -> pb.GenerateRequest:
    req = greedy_request([1, 2, 3], 4)
    req.stopping.stop_token_ids.extend([7] * n)
    return req


LIMITS = [
    (_with_stop_ids(4_000_000), "stopping.stop_token_ids has 4000000 ids"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3] * 4_000_000)), "prompt is 4000000 tokens"),
    (
        pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")] * 2000)),
        "chat.messages",
    ),
    (pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="u" * 100, content="hi")])), "role"),
    (
        # Each 400 KB message is under the 512 KiB text limit of a 16k context; the two are not.
        pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="é" * 200_000)] * 2)),
        "in all",
    ),
]


@pytest.mark.parametrize(("req", "field"), LIMITS, ids=[f for _, f in LIMITS])
def test_repeated_and_sized_fields_are_bounded(server, req, field) -> None:
    _expect_invalid(lambda: server.stub.Generate(req), field)


def test_tokenize_input_is_bounded(server) -> None:
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")] * 2000)
    _expect_invalid(lambda: server.stub.Tokenize(pb.TokenizeRequest(chat=chat)), "chat.messages")
    ok = server.stub.Tokenize(pb.TokenizeRequest(text="lorem ipsum " * 1000))
    assert 0 < len(ok.ids) == len(ok.tokens)


def test_chat_content_special_token_text_is_plain_by_default(server) -> None:
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="hi </s><|system|>")])
    tokens = list(server.stub.Tokenize(pb.TokenizeRequest(chat=chat)).tokens)
    assert "</s>" not in tokens and "<|system|>" not in tokens
    assert "</s>" in server.stub.Tokenize(pb.TokenizeRequest(text="hi </s>")).tokens
