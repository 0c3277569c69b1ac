"""A request's output constraint: checked here, compiled on the shards.

What can be checked without the vocabulary (sizes, JSON syntax, the choice list) is refused
here with a message naming the field; the shards' compiler finds the rest (an unsupported
schema keyword, a bad regex, an undefined grammar rule) before the request is queued.
"""

from __future__ import annotations

import json

from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.server.errors import invalid

MAX_CONSTRAINT_BYTES = 64 * 1024
MAX_CHOICES = 1024
Kind = shard_pb2.Constraint.Kind


def constraint(msg: pb.GenerateRequest, compact_json: bool = False) -> shard_pb2.Constraint | None:
    """The canonical constraint of ``msg``, or None when it has none.

    ``compact_json``: JSON output has no whitespace but the separators' (--json-whitespace).
    """
    kind = msg.WhichOneof("constraint")
    if kind is None:
        return None
    if msg.stopping.ignore_eos:
        raise invalid(f"{kind} cannot be combined with stopping.ignore_eos: constrained output ends with EOS")
    if kind == "json_schema":
        _check_size(msg.json_schema, kind)
        try:
            schema = json.loads(msg.json_schema)
        except ValueError as exc:
            raise invalid(f"json_schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise invalid("json_schema must be a JSON object (or true/false)")
        return shard_pb2.Constraint(
            kind=Kind.KIND_JSON_SCHEMA, spec=msg.json_schema, compact_json=compact_json
        )
    if kind == "json_object":
        if not msg.json_object:
            raise invalid("json_object must be true when set")
        return shard_pb2.Constraint(kind=Kind.KIND_JSON_OBJECT, compact_json=compact_json)
    if kind == "regex":
        _check_size(msg.regex, kind)
        if not msg.regex:
            raise invalid("regex is empty")
        return shard_pb2.Constraint(kind=Kind.KIND_REGEX, spec=msg.regex)
    if kind == "ebnf":
        _check_size(msg.ebnf, kind)
        if not msg.ebnf.strip():
            raise invalid("ebnf is empty")
        return shard_pb2.Constraint(kind=Kind.KIND_EBNF, spec=msg.ebnf)
    return shard_pb2.Constraint(kind=Kind.KIND_EBNF, spec=choice_grammar(list(msg.choice.choices)))


def choice_grammar(choices: list[str]) -> str:
    """A grammar whose only sentences are ``choices``, each a string literal."""
    if not choices:
        raise invalid("choice.choices is empty")
    if len(choices) > MAX_CHOICES:
        raise invalid(f"choice.choices has {len(choices)} strings; at most {MAX_CHOICES} are allowed")
    for i, c in enumerate(choices):
        if not c:
            raise invalid(f"choice.choices[{i}] is empty")
    # json.dumps escapes exactly what a grammar literal needs: quotes, backslashes, controls.
    grammar = "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in dict.fromkeys(choices))
    _check_size(grammar, "choice")
    return grammar


def _check_size(text: str, field: str) -> None:
    n = len(text.encode())
    if n > MAX_CONSTRAINT_BYTES:
        raise invalid(f"{field} is {n} bytes; at most {MAX_CONSTRAINT_BYTES} are allowed")
