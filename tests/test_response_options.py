"""Response options over real gRPC: special tokens in the text, the matched stop, prompt logprobs."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lightllm_grpc.proto import generation_pb2 as pb
from tests.server_harness import ServerProcess, greedy_request, make_served_model

PROMPT = [5, 77, 300, 12, 9, 401]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_served_model("llama", tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--max-total-tokens", "400")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(str(model_dir))


def _special_request(tokenizer, **response: bool) -> pb.GenerateRequest:
    """Greedy output forced (by logit_bias) to be <|user|> every time."""
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    req = greedy_request(PROMPT, 1)
    req.sampling.logit_bias[user] = 100.0
    for name, value in response.items():
        setattr(req.response, name, value)
    return req


@pytest.mark.parametrize(
    ("response", "text"),
    [
        ({}, ""),
        ({"skip_special_tokens": True, "spaces_between_special_tokens": True}, ""),
        ({"skip_special_tokens": False}, "<|user|><|user|><|user|>"),
        ({"skip_special_tokens": False, "spaces_between_special_tokens": True}, "<|user|> <|user|> <|user|>"),
    ],
)
def test_special_tokens_in_the_text(server, tokenizer, response, text) -> None:
    req = _special_request(tokenizer, **response)
    req.stopping.max_new_tokens = 3
    unary = server.stub.Generate(req)
    assert unary.text == text and len(unary.token_ids) == 3
    assert "".join(m.text for m in server.stub.GenerateStream(req)) == text
