"""The generated stubs: produced from protos/, importable under grpcio 1.84 and newer."""

from __future__ import annotations

import re
from pathlib import Path

from lightllm_grpc import protogen
from lightllm_grpc.proto import generation_pb2, generation_pb2_grpc, shard_pb2, shard_pb2_grpc


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def test_stubs_accept_grpcio_1_84() -> None:
    for mod in (generation_pb2_grpc, shard_pb2_grpc):
        source = Path(mod.__file__).read_text()
        generated = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", source)
        assert generated is not None
        assert _version(generated.group(1)) <= (1, 84, 0), "regenerate with grpcio-tools<=1.84.0"


def test_every_proto_is_generated() -> None:
    names = {p.stem for p in protogen.proto_files()}
    assert names == {"generation", "shard"}
    assert generation_pb2.DESCRIPTOR.package == "lightllm.v1"
    assert shard_pb2.DESCRIPTOR.package == "lightllm.shard.v1"
    assert set(generation_pb2.DESCRIPTOR.services_by_name["Generation"].methods_by_name) == {
        "Generate",
        "GenerateStream",
        "Tokenize",
        "GetModelInfo",
        "GetServerInfo",
        "Abort",
        "FlushCache",
    }


def test_optional_fields_distinguish_unset_from_zero() -> None:
    req = generation_pb2.GenerateRequest()
    assert not req.sampling.HasField("temperature")
    req.sampling.temperature = 0.0
    assert req.sampling.HasField("temperature")
