"""Architecture name (``config.json``'s ``architectures``) -> model class and checkpoint name mapping."""

from __future__ import annotations

from dataclasses import dataclass

from lightllm_grpc.models.config import SUPPORTED_ARCHITECTURES
from lightllm_grpc.models.llama import LlamaForCausalLM


@dataclass(frozen=True)
class ModelSpec:
    model_class: type[LlamaForCausalLM]
    # checkpoint module name -> (our fused module, shard id); see LlamaForCausalLM
    packed_modules_mapping: dict[str, tuple[str, str | int]]
    ignored_weight_suffixes: tuple[str, ...]


_LLAMA = ModelSpec(
    LlamaForCausalLM, LlamaForCausalLM.packed_modules_mapping, LlamaForCausalLM.ignored_weight_suffixes
)
# The whole family shares one decoder: the differences are ModelConfig flags.
_REGISTRY: dict[str, ModelSpec] = {arch: _LLAMA for arch in SUPPORTED_ARCHITECTURES}


def supported_architectures() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_model_spec(architecture: str) -> ModelSpec:
    """The spec for ``architecture``; ``ValueError`` naming the supported ones otherwise."""
    if architecture not in _REGISTRY:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        )
    return _REGISTRY[architecture]
