"""Response options over real gRPC: special tokens in the text, the matched stop, prompt logprobs."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lightllm_grpc.proto import generation_pb2 as pb
from tests.server_harness import greedy_request

PROMPT = [5, 77, 300, 12, 9, 401]


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


def test_matched_stop_names_the_token_or_string(server) -> None:
    base = server.stub.Generate(greedy_request(PROMPT, 24))
    assert base.finish_reason == pb.FINISH_REASON_LENGTH and not base.HasField("matched_stop")
    token = base.token_ids[5]
    by_token = greedy_request(PROMPT, 24)
    by_token.stopping.stop_token_ids.append(token)
    unary = server.stub.Generate(by_token)
    assert unary.finish_reason == pb.FINISH_REASON_STOP
    assert unary.matched_stop.WhichOneof("kind") == "token_id" and unary.matched_stop.token_id == token
    last = list(server.stub.GenerateStream(by_token))[-1]
    assert last.matched_stop.token_id == token and last.stop_reason == str(token)
    stop = base.text[4:7]
    by_text = greedy_request(PROMPT, 24)
    by_text.stopping.stop.append(stop)
    by_text.n = 2
    unary = server.stub.Generate(by_text)
    assert unary.matched_stop.WhichOneof("kind") == "text" and unary.matched_stop.text == stop
    assert all(c.matched_stop.text == stop for c in unary.completions)
    last = list(server.stub.GenerateStream(by_text))[-1]
    assert last.matched_stop.text == stop == last.stop_reason
