"""Property-based: any GenerateRequest / TokenizeRequest, or any bytes at all, ends in OK,
INVALID_ARGUMENT or RESOURCE_EXHAUSTED (never UNKNOWN, INTERNAL or a hang), and leaves no
KV behind. One live server; bounded to about 100 examples per property."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightllm_grpc.proto import generation_pb2 as pb
from tests.server_harness import ServerProcess, make_served_model

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
SETTINGS = settings(
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
UINT32 = 2**32 - 1

floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
texts = st.one_of(
    st.text(max_size=200),
    st.sampled_from(["", "</s>", "<|system|>", "\x00", "é" * 3, "🙂" * 10]),
    st.integers(60_000, 300_000).map(lambda n: "lorem " * (n // 6)),  # around the byte limit
)
id_lists = st.one_of(
    st.lists(st.integers(0, UINT32), max_size=40),
    st.lists(st.integers(0, 600), min_size=1, max_size=600),
    st.integers(100, 200_000).map(lambda n: [7] * n),
)


@st.composite
def sampling(draw) -> pb.SamplingParams:
    s = pb.SamplingParams()
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ):
        if draw(st.booleans()):
            setattr(s, name, draw(floats))
    if draw(st.booleans()):
        s.top_k = draw(st.integers(-(2**31), 2**31 - 1))
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    return s


@st.composite
def stopping(draw) -> pb.StoppingCriteria:
    s = pb.StoppingCriteria()
    if draw(st.booleans()):
        s.max_new_tokens = draw(st.one_of(st.integers(0, 12), st.sampled_from([511, 512, 100_000, UINT32])))
    if draw(st.booleans()):
        s.min_new_tokens = draw(st.one_of(st.integers(0, 12), st.just(UINT32)))
    s.stop.extend(draw(st.lists(texts, max_size=20)))
    s.stop_token_ids.extend(draw(id_lists))
    s.ignore_eos = draw(st.booleans())
    s.include_stop_str_in_output = draw(st.booleans())
    return s


chats = st.builds(
    lambda msgs, gen: pb.Chat(messages=msgs, add_generation_prompt=gen),
    st.lists(st.builds(pb.ChatMessage, role=st.one_of(st.just("user"), texts), content=texts), max_size=6)
    | st.integers(1000, 3000).map(lambda n: [pb.ChatMessage(role="user", content="x")] * n),
    st.booleans(),
)


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=draw(st.one_of(st.just(""), st.text(max_size=300))))
    kind = draw(st.sampled_from(["text", "token_ids", "chat", "none"]))
    if kind == "text":
        req.text = draw(texts)
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(id_lists))
    elif kind == "chat":
        req.chat.CopyFrom(draw(chats))
    req.sampling.CopyFrom(draw(sampling()))
    req.stopping.CopyFrom(draw(stopping()))
    req.response.return_token_ids = draw(st.booleans())
    req.response.logprobs = draw(st.booleans())
    req.response.top_logprobs = draw(st.one_of(st.integers(0, 25), st.just(UINT32)))
    return req


@st.composite
def tokenize_requests(draw) -> pb.TokenizeRequest:
    if draw(st.booleans()):
        req = pb.TokenizeRequest(text=draw(texts))
        if draw(st.booleans()):
            req.add_special_tokens = draw(st.booleans())
        return req
    return pb.TokenizeRequest(chat=draw(chats))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_served_model("llama", tmp_path_factory.mktemp("model") / "llama")
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = ServerProcess(model_dir, log, "--max-total-tokens", "400", "--default-max-new-tokens", "4")
    try:
        yield srv
        assert srv.wait_idle().kv_used_tokens == 0
        assert "Traceback" not in srv.log_path.read_text(errors="replace")
    finally:
        srv.stop()


def _outcome(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as err:
        assert err.code() in ALLOWED, f"{err.code()}: {err.details()}"
        return err.code()
    return grpc.StatusCode.OK


def test_any_generate_request(server) -> None:
    @SETTINGS
    @given(generate_requests())
    def check(req: pb.GenerateRequest) -> None:
        _outcome(lambda: server.stub.Generate(req, timeout=60))

    check()
    assert server.wait_idle().kv_used_tokens == 0


def test_any_generate_stream_request(server) -> None:
    @settings(SETTINGS, max_examples=40)
    @given(generate_requests())
    def check(req: pb.GenerateRequest) -> None:
        _outcome(lambda: list(server.stub.GenerateStream(req, timeout=60)))

    check()
    assert server.wait_idle().kv_used_tokens == 0


def test_any_tokenize_request(server) -> None:
    @SETTINGS
    @given(tokenize_requests())
    def check(req: pb.TokenizeRequest) -> None:
        _outcome(lambda: server.stub.Tokenize(req, timeout=60))

    check()


def test_any_bytes_on_the_wire(server) -> None:
    methods = {
        name: server.channel.unary_unary(f"/lightllm.v1.Generation/{name}")
        for name in ("Generate", "Tokenize", "Abort", "GetServerInfo")
    }

    @SETTINGS
    @given(st.sampled_from(sorted(methods)), st.binary(max_size=4096))
    def check(name: str, data: bytes) -> None:
        _outcome(lambda: methods[name](data, timeout=60))

    check()
    assert server.wait_idle().kv_used_tokens == 0
