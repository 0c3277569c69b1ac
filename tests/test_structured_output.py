"""Structured output over gRPC: JSON schemas, JSON, regexes, grammars and choices.

The served model has random weights, so whatever it writes is noise unless the constraint
holds it: an output that parses and validates shows the mask was applied on every step.
The server runs with a small KV pool and short prefill chunks so constrained rows are
preempted and resumed (their matchers replay the output so far) and prefilled in chunks.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest

from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.server.constraint import constraint
from lightllm_grpc.shard.grammar import GrammarCompiler
from tests.server_harness import ServerProcess, greedy_request

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -99, "maximum": 99},
                    "ok": {"type": "boolean"},
                },
                "required": ["x", "ok"],
            },
            "kind": {"enum": ["a", "b", "c"]},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["point", "kind"],
    },
    {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["id"],
        },
        "minItems": 2,
        "maxItems": 4,
    },
    {"enum": ["yes", "no", 42, None]},
]
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(cat|dog|bird)s?", r"[a-z]{2,6}@[a-z]{3}\.com"]
GRAMMAR = """
root ::= term (("+" | "-") term){0,3}
term ::= num | "(" num (("*" | "-") num){1,2} ")"
num ::= [1-9] [0-9]{0,2}
"""
PROMPTS = [[5, 77, 300, 12], [9, 401, 33], [100, 200, 300, 400, 17], [1, 2, 3]]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = ServerProcess(
        model_dir,
        tmp_path_factory.mktemp("log") / "server.log",
        "--max-total-tokens", "600",
        "--max-prefill-tokens", "16",
        "--json-whitespace", "compact",
    )  # fmt: skip
    yield srv
    srv.stop()


def _request(i: int, sampled: bool, max_new: int = 160) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=f"r{i}", token_ids=pb.TokenIds(ids=PROMPTS[i % len(PROMPTS)]))
    req.stopping.max_new_tokens = max_new
    if sampled:
        req.sampling.temperature = 1.0
        req.sampling.seed = 1000 + i
    else:
        req.sampling.temperature = 0.0
    return req


def _constrained(i: int, sampled: bool) -> tuple[pb.GenerateRequest, tuple[str, object]]:
    req = _request(i, sampled)
    if i % 5 == 0:  # penalties compose with the mask (applied before it)
        req.sampling.presence_penalty, req.sampling.frequency_penalty = 0.5, 0.3
    if i % 7 == 0:
        req.sampling.repetition_penalty = 1.3
    pick = i % 8
    if pick < 4:
        req.json_schema = json.dumps(SCHEMAS[pick])
        return req, ("schema", SCHEMAS[pick])
    if pick == 4:
        req.json_object = True
        return req, ("json", None)
    if pick == 5:
        regex = REGEXES[(i // 8) % len(REGEXES)]
        req.regex = regex
        return req, ("regex", regex)
    if pick == 6:
        req.ebnf = GRAMMAR
        return req, ("grammar", None)
    req.choice.choices.extend(["alpha", "beta", "gamma delta", 'quote " and \\ back'])
    return req, ("choice", ["alpha", "beta", "gamma delta", 'quote " and \\ back'])


def _check(text: str, want: tuple[str, object]) -> None:
    kind, spec = want
    if kind == "schema":
        jsonschema.validate(json.loads(text), spec)
    elif kind == "json":
        json.loads(text)
    elif kind == "regex":
        assert re.fullmatch(str(spec), text), (text, spec)
    elif kind == "grammar":
        assert re.fullmatch(r"[0-9+\-*()]+", text) and eval(text, {}) is not None, text
    else:
        assert text in spec, text  # type: ignore[operator]


def _accepts_prefix(model_dir, req: pb.GenerateRequest, ids: list[int]) -> bool:
    import xgrammar as xgr

    compiler = GrammarCompiler(model_dir, 512, (2,))  # the tiny model's vocabulary and EOS
    matcher = xgr.GrammarMatcher(compiler.compile(constraint(req, compact_json=True)))
    return all(matcher.accept_token(t) for t in ids)


def _run(stub, reqs: list[pb.GenerateRequest]) -> dict[str, pb.GenerateResponse]:
    with ThreadPoolExecutor(32) as pool:
        return dict(
            zip([r.request_id for r in reqs], pool.map(lambda r: stub.Generate(r, timeout=300), reqs))
        )


def test_constrained_outputs_validate_and_leave_the_others_unchanged(server, model_dir) -> None:
    plain = [_request(1000 + i, sampled=i % 2 == 1, max_new=24) for i in range(40)]
    for r in plain:
        r.stopping.ignore_eos = True
    alone = _run(server.stub, plain)
    constrained = [_constrained(i, sampled=i % 3 == 0) for i in range(200)]
    crowd = _run(server.stub, plain + [r for r, _ in constrained])
    for req, want in constrained:
        out = crowd[req.request_id]
        if want[0] == "json" and out.finish_reason == pb.FINISH_REASON_LENGTH:
            # Any JSON can go on for ever (a key the noise never closes): its output must
            # still be a prefix that the constraint accepts token by token.
            assert _accepts_prefix(model_dir, req, list(out.token_ids)), out.text
            continue
        assert out.finish_reason == pb.FINISH_REASON_STOP, (req.request_id, out.text)
        _check(out.text, want)
    for r in plain:
        assert list(crowd[r.request_id].token_ids) == list(alone[r.request_id].token_ids), r.request_id
    info = server.wait_idle()
    assert info.kv_used_tokens == 0
    assert info.num_preemptions > 0 and info.num_partial_prefills > 0  # constraints survived both
    # Seeded constrained sampling is reproducible alone, as it was in the crowd.
    for req, _ in constrained[:24:3]:
        assert server.stub.Generate(req).token_ids == crowd[req.request_id].token_ids, req.request_id


def test_n_completions_each_follow_the_constraint(server) -> None:
    req, want = _constrained(0, sampled=True)
    req.n = 3
    out = server.stub.Generate(req)
    assert len(out.completions) == 3
    for c in out.completions:
        _check(c.text, want)


def test_constraint_wins_over_min_new_tokens_and_logit_bias(server) -> None:
    req = _request(1, sampled=False, max_new=20)
    req.choice.choices.extend(["no", "yes"])
    req.stopping.min_new_tokens = 8  # EOS is suppressed, yet only EOS may follow the choice
    for token in range(60, 70):
        req.sampling.logit_bias[token] = 100.0
    req.response.skip_special_tokens = False  # junk special tokens before EOS would show
    out = server.stub.Generate(req)
    assert out.text.removesuffix("</s>") in ("no", "yes") and out.finish_reason == pb.FINISH_REASON_STOP


def test_stream_and_stop_strings(server) -> None:
    req = _request(2, sampled=False)
    req.regex = "(ab|cd){3}x[0-9]"
    text = "".join(m.text for m in server.stub.GenerateStream(req))
    assert re.fullmatch("(ab|cd){3}x[0-9]", text)
    req.stopping.stop.append("x")
    out = server.stub.Generate(req)
    assert re.fullmatch("(ab|cd){3}", out.text) and out.matched_stop.text == "x"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("json_schema", "{not json", "json_schema is not valid JSON"),
        ("json_schema", '"a string"', "must be a JSON object"),
        ("json_schema", '{"type": "objec"}', "json_schema: Unsupported type"),
        ("regex", "a(b", "regex: Regex parsing error"),
        ("regex", "", "regex is empty"),
        ("ebnf", "root ::= foo", 'ebnf: EBNF parser error at line 1, column 10: Rule "foo" is not defined'),
        ("json_schema", json.dumps({"enum": ["x" * 70000]}), "at most 65536"),
    ],
)
def test_invalid_constraints_are_refused_with_the_reason(server, field, value, message) -> None:
    req = _request(0, sampled=False)
    setattr(req, field, value)
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details(), err.value.details()


def test_bad_choice_lists_and_ignore_eos_are_refused(server) -> None:
    for choices, message in [([], "choice.choices is empty"), (["a", ""], "choice.choices[1] is empty")]:
        req = _request(0, sampled=False)
        req.choice.SetInParent()
        req.choice.choices.extend(choices)
        with pytest.raises(grpc.RpcError) as err:
            server.stub.Generate(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    req = greedy_request([1, 2, 3], 8)  # ignore_eos
    req.json_object = True
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(req)
    assert "ignore_eos" in err.value.details()
    assert server.wait_idle().kv_used_tokens == 0


def test_length_bounded_strings_admit_no_raw_control_characters(model_dir) -> None:
    """xgrammar 0.2.8 lets raw control characters into minLength/maxLength strings; the
    shard's rewrite of such schemas keeps the output valid JSON with the exact length."""
    import xgrammar as xgr

    compiler = GrammarCompiler(model_dir, 512, (2,))
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 4}}}
    compiled = compiler.compile(
        constraint(pb.GenerateRequest(json_schema=json.dumps(schema)), compact_json=True)
    )
    cases = {'{"s": "ab"}': True, '{"s": "abcd"}': True, '{"s": "a"}': False, '{"s": "abcde"}': False}
    cases |= {'{"s": "a\x0eb"}': False, '{"s": "é東"}': True}
    for text, ok in cases.items():
        matcher = xgr.GrammarMatcher(compiled)
        assert (matcher.accept_string(text) and matcher.is_completed()) == ok, text


def test_tensor_parallel_ranks_apply_the_same_constraints(server, model_dir, tmp_path) -> None:
    """Both ranks run the matchers on the same logits: outputs stay valid and equal TP=1's."""
    reqs = [_constrained(i, sampled=i % 2 == 0) for i in (0, 1, 3, 5, 6, 7, 8, 13)]
    alone = _run(server.stub, [r for r, _ in reqs])
    srv = ServerProcess(model_dir, tmp_path / "tp2.log", "--tp-size", "2", "--json-whitespace", "compact")
    try:
        tp2 = _run(srv.stub, [r for r, _ in reqs])
    finally:
        srv.stop()
    for req, want in reqs:
        _check(tp2[req.request_id].text, want)
        assert tp2[req.request_id].token_ids == alone[req.request_id].token_ids, req.request_id
