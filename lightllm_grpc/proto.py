"""Import point for the generated stubs; generates them first when they are missing."""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("lightllm_grpc._proto.lightllm.v1.generation_pb2") is None:
    from lightllm_grpc import protogen

    protogen.generate()

from lightllm_grpc._proto.lightllm.shard.v1 import shard_pb2, shard_pb2_grpc
from lightllm_grpc._proto.lightllm.v1 import generation_pb2, generation_pb2_grpc

__all__ = ["generation_pb2", "generation_pb2_grpc", "shard_pb2", "shard_pb2_grpc"]
