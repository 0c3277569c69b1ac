"""Unset sampling fields take the checkpoint's generation_config.json values, reported in
GetModelInfo; a request's own values still win."""

from __future__ import annotations

import json

import pytest

from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.scheduler.sampling import generation_config_defaults
from tests.server_harness import ServerProcess, make_served_model

PROMPT = [5, 77, 300, 12, 9, 401]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_served_model("llama", tmp_path_factory.mktemp("model") / "llama")
    path = folder / "generation_config.json"
    config = json.loads(path.read_text())
    # Greedy by default, and top_k 1 so that even a request asking for temperature 3 is greedy
    # unless it sets top_k itself. top_p is out of range: it must be ignored, not applied.
    config.update(temperature=0.0, top_k=1, repetition_penalty=1.3, top_p=1.5, do_sample=False)
    path.write_text(json.dumps(config))
    srv = ServerProcess(folder, tmp_path_factory.mktemp("log") / "server.log", "--max-total-tokens", "400")
    yield srv
    srv.stop()


def _tokens(server: ServerProcess, **sampling: float) -> list[int]:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT))
    req.stopping.max_new_tokens = 12
    req.stopping.ignore_eos = True
    for name, value in sampling.items():
        setattr(req.sampling, name, value)
    return list(server.stub.Generate(req).token_ids)


def test_model_info_reports_the_defaults(server) -> None:
    d = server.stub.GetModelInfo(pb.GetModelInfoRequest()).default_sampling
    assert (d.temperature, d.top_k, d.repetition_penalty) == (0.0, 1, pytest.approx(1.3))
    assert (d.top_p, d.min_p, d.presence_penalty, d.frequency_penalty) == (1.0, 0.0, 0.0, 0.0)
    assert not d.HasField("seed") and not d.logit_bias


def test_unset_fields_take_the_model_defaults(server) -> None:
    default = _tokens(server)
    # Unseeded requests differ unless the default temperature 0 made them greedy.
    assert _tokens(server) == default
    assert default == _tokens(server, temperature=0.0, repetition_penalty=1.3)
    assert default != _tokens(server, temperature=0.0, repetition_penalty=1.0)
    # The default top_k 1 keeps a hot request greedy; setting top_k lets it sample.
    assert _tokens(server, temperature=3.0, seed=1, repetition_penalty=1.0) == _tokens(
        server, repetition_penalty=1.0
    )
    assert _tokens(server, temperature=3.0, seed=1, top_k=-1) != default


def test_an_out_of_range_value_is_ignored_with_a_warning(server) -> None:
    assert server.stub.GetModelInfo(pb.GetModelInfoRequest()).default_sampling.top_p == 1.0
    assert "generation_config.json top_p must be in (0, 1], got 1.5; ignored" in server.log()


def test_generation_config_parsing() -> None:
    defaults, problems = generation_config_defaults(
        {"temperature": 0.6, "top_k": 0, "top_p": 1.5, "min_p": "x", "max_length": 20}
    )
    assert (defaults.temperature, defaults.top_k, defaults.top_p) == (0.6, -1, 1.0)
    assert defaults.min_p == 0.0
    assert any("top_p" in p for p in problems) and any("min_p" in p for p in problems)
    empty, none = generation_config_defaults({})
    assert empty.temperature == 1.0 and none == []
