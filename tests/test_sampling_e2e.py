"""Every sampling parameter reaches the shard's sampler, over real gRPC.

Each test sets one parameter and checks an outcome only that parameter can produce: the
penalties must give exactly the greedy tokens of a transformers reference that applies the
same penalty, and the filters (top_k, top_p, min_p) set to keep one token must turn a
high-temperature sample into the greedy output. A parameter that is validated but not
forwarded to the shard (or forwarded as its "off" value) fails here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.scheduler.sampling import PARAMS, SamplingOptions, resolve, row_sampling
from tests.server_harness import ServerProcess, greedy_request

PROMPT = [5, 77, 300, 12, 9, 401]
NEW = 16
# (logits [V], prompt ids, generated ids) -> processed logits
Process = Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def reference_greedy(model, process: Process) -> list[int]:
    """Greedy decoding of PROMPT with ``process`` applied to each step's logits."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(torch.tensor([PROMPT + out])).logits[0, -1]
            out.append(int(process(logits, PROMPT, out).argmax()))
    return out


def _counts(ids: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(ids, dtype=torch.int64), minlength=vocab).float()


def presence(p: float) -> Process:
    return lambda logits, prompt, gen: logits - p * (_counts(gen, logits.numel()) > 0).float()


def frequency(f: float) -> Process:
    return lambda logits, prompt, gen: logits - f * _counts(gen, logits.numel())


def repetition(r: float) -> Process:
    def process(logits: torch.Tensor, prompt: list[int], gen: list[int]) -> torch.Tensor:
        seen = _counts(prompt + gen, logits.numel()) > 0
        return torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)

    return process


def _generate(server: ServerProcess, **sampling: float) -> list[int]:
    req = greedy_request(PROMPT, NEW)
    for name, value in sampling.items():
        setattr(req.sampling, name, value)
    return list(server.stub.Generate(req).token_ids)


def test_greedy_matches_the_reference(server, hf_model) -> None:
    plain = reference_greedy(hf_model, lambda logits, prompt, gen: logits)
    assert _generate(server) == plain
    assert len(set(plain)) < len(plain)  # it repeats itself, so the penalties below change it


@pytest.mark.parametrize(
    ("name", "value", "process"),
    [
        ("presence_penalty", 2.0, presence(2.0)),
        ("presence_penalty", -1.0, presence(-1.0)),
        ("frequency_penalty", 1.5, frequency(1.5)),
        ("repetition_penalty", 1.8, repetition(1.8)),
        ("repetition_penalty", 0.5, repetition(0.5)),
    ],
)
def test_penalties_match_the_reference(server, hf_model, name, value, process) -> None:
    got = _generate(server, **{name: value})
    assert got == reference_greedy(hf_model, process)
    assert got != _generate(server)


def test_a_large_presence_penalty_repeats_no_token(server) -> None:
    got = _generate(server, presence_penalty=2.0)
    assert len(set(got)) == len(got)


def _sampled(server: ServerProcess, seed: int, **sampling: float) -> list[int]:
    req = greedy_request(PROMPT, NEW)
    req.sampling.temperature = 3.0  # nearly uniform: an unfiltered draw is far from greedy
    req.sampling.seed = seed
    for name, value in sampling.items():
        setattr(req.sampling, name, value)
    return list(server.stub.Generate(req).token_ids)


@pytest.mark.parametrize(("name", "value"), [("top_k", 1), ("top_p", 1e-6), ("min_p", 1.0)])
def test_filters_that_keep_one_token_make_sampling_greedy(server, name, value) -> None:
    greedy = _generate(server)
    for seed in (1, 2):
        assert _sampled(server, seed) != greedy
        assert _sampled(server, seed, **{name: value}) == greedy


@pytest.mark.parametrize(("name", "value"), [("top_k", 3), ("top_p", 0.2), ("min_p", 0.5)])
def test_filters_change_a_seeded_sample(server, name, value) -> None:
    assert _sampled(server, 7, **{name: value}) != _sampled(server, 7)


def test_temperature_reaches_the_sampler(server) -> None:
    assert _sampled(server, 7) != _generate(server)
    assert _sampled(server, 7, temperature=0.0) == _generate(server)


def test_every_declared_parameter_is_tested_here() -> None:
    source = Path(__file__).read_text()
    assert all(f'"{p.name}"' in source for p in PARAMS)


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_logit_bias_forces_and_bans_tokens(server, temperature) -> None:
    req = greedy_request(PROMPT, 8)
    req.sampling.temperature = temperature
    req.sampling.seed = 3
    req.sampling.logit_bias[123] = 100.0
    assert list(server.stub.Generate(req).token_ids) == [123] * 8
    greedy = _generate(server)
    banned = greedy_request(PROMPT, NEW)
    banned.sampling.logit_bias[greedy[0]] = -100.0
    got = list(server.stub.Generate(banned).token_ids)
    assert greedy[0] not in got and got != greedy


@pytest.mark.parametrize(
    ("bias", "field"),
    [({600: 1.0}, "sampling.logit_bias"), ({5: 101.0}, "sampling.logit_bias[5]"), ({5: float("nan")}, "[5]")],
)
def test_logit_bias_limits(server, bias, field) -> None:
    req = greedy_request(PROMPT, 4)
    req.sampling.logit_bias.update(bias)
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()


def test_too_many_logit_biases(server) -> None:
    req = greedy_request(PROMPT, 4)
    req.sampling.logit_bias.update({i: 1.0 for i in range(301)})
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(req)
    assert "at most 300" in err.value.details()


def test_unset_fields_are_off_not_proto_zero() -> None:
    """An empty SamplingParams means temperature 1 and every filter and penalty off."""
    options = resolve(pb.SamplingParams(), SamplingOptions(), vocab_size=512)
    row = row_sampling(options, row=0)
    assert (row.temperature, row.top_k, row.top_p, row.min_p) == (1.0, -1, 1.0, 0.0)
    assert (row.repetition_penalty, row.presence_penalty, row.frequency_penalty) == (1.0, 0.0, 0.0)
