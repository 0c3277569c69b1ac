"""``ModelConfig``: a Hugging Face ``config.json`` converted once into our own frozen dataclass.

Both spellings transformers has used are read: the transformers-5 one (``rope_parameters``
holding ``rope_theta``/``rope_type``, ``dtype``) and the older one (top-level ``rope_theta``,
``rope_scaling`` with ``type`` or ``rope_type``, ``torch_dtype``). Everything downstream sees
only the normalized fields below.

Sliding-window attention is served by capping the context: when a window applies to any layer,
``max_position_embeddings`` becomes ``min(context, window)``, and within the window sliding
attention equals full attention, so results stay exact. Like transformers, a Mistral config
without a ``sliding_window`` key gets Mistral's default window of 4096.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightllm_grpc.config import KV_CACHE_DTYPES
from lightllm_grpc.layers.quant_config import QuantConfig
from lightllm_grpc.models.quantization import parse_kv_cache_scheme, parse_quantization

# transformers' config-class defaults for keys a config.json may leave out, per architecture
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"max_position_embeddings": 2048},
    "MistralForCausalLM": {"max_position_embeddings": 4096 * 32, "sliding_window": 4096},
    "Qwen2ForCausalLM": {"max_position_embeddings": 32768},
    "Qwen3ForCausalLM": {"max_position_embeddings": 32768, "head_dim": 128},
}
SUPPORTED_ARCHITECTURES = tuple(_ARCH_DEFAULTS)
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_REQUIRED_ROPE_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor",),
}

_DEFAULT_ROPE_THETA = 10_000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta
# A checkpoint's dtype spellings -> the name ModelConfig keeps (torch-free: the coordinator
# reads model configs too; models/loader.py maps the name to a torch dtype).
_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
}


@dataclass(frozen=True)
class ModelConfig:
    """The fields the Llama-family decoder and the server need, validated once."""

    name: str
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None for plain RoPE; else normalized, always has "rope_type"
    max_position_embeddings: int  # the usable context length (capped by a sliding window)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    dtype: str = "float32"  # the checkpoint's dtype: float32, float16 or bfloat16
    sliding_window: int | None = None  # informational; already folded into max_position_embeddings
    quantization: QuantConfig | None = None  # FP8 linear layers (docs/quantization.md); None: none
    # What the checkpoint declares for its KV cache: None, "fp8" (per-layer e4m3 scales among its
    # tensors) or why its declaration cannot be used (models/quantization.py).
    kv_cache_scheme: str | None = None
    # The KV pool's storage (--kv-cache-dtype): "auto" (the model dtype) or "fp8_e4m3".
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(_unsupported_message(self.architecture))
        for field_name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"{field_name} must be positive, got {getattr(self, field_name)}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be positive and even for RoPE, got {self.head_dim}")
        if self.max_position_embeddings <= 0 or self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("max_position_embeddings, rope_theta and rms_norm_eps must be positive")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_scaling needs a rope_type in {SUPPORTED_ROPE_TYPES}: {self.rope_scaling}")
        if self.dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(set(_DTYPES.values()))}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (and ``generation_config.json`` for extra EOS ids, ModelOpt's
        ``hf_quant_config.json`` for its quantization) from an HF folder."""
        folder = Path(path)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {folder}")
        hf = json.loads(config_file.read_text())
        gen_file = folder / "generation_config.json"
        generation = json.loads(gen_file.read_text()) if gen_file.is_file() else None
        quant_file = folder / "hf_quant_config.json"
        hf_quant = json.loads(quant_file.read_text()) if quant_file.is_file() else None
        return cls.from_dict(
            hf, name=folder.resolve().name, generation_config=generation, hf_quant_config=hf_quant
        )

    @classmethod
    def from_dict(
        cls,
        hf: dict[str, Any],
        *,
        name: str,
        generation_config: dict[str, Any] | None = None,
        hf_quant_config: dict[str, Any] | None = None,
    ) -> ModelConfig:
        """Convert a parsed HF ``config.json`` dict; raises ``ValueError`` for what we cannot serve."""
        architecture = _architecture(hf)
        hf = {**_ARCH_DEFAULTS[architecture], **hf}
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is unsupported; only 'silu' is")
        context = int(hf["max_position_embeddings"])
        window = _sliding_window(hf, architecture)
        rope_theta, rope_scaling = _rope(hf, context)
        generation = generation_config or {}
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        return cls(
            name=name,
            architecture=architecture,
            model_type=hf.get("model_type", ""),
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=min(context, window) if window else context,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=is_qwen2 or bool(hf.get("attention_bias", False)),
            # Qwen2 biases q/k/v only; Llama and Qwen3 put attention_bias on o_proj too.
            o_proj_bias=not is_qwen2 and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
            eos_token_ids=_merge_ids(hf.get("eos_token_id"), generation.get("eos_token_id")),
            bos_token_id=_first_id(hf.get("bos_token_id"), generation.get("bos_token_id")),
            dtype=_dtype(hf.get("dtype") or hf.get("torch_dtype")),
            sliding_window=window,
            quantization=parse_quantization(hf.get("quantization_config"), hf_quant_config),
            kv_cache_scheme=parse_kv_cache_scheme(hf.get("quantization_config"), hf_quant_config),
        )


def _unsupported_message(architecture: str) -> str:
    return f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"


def _architecture(hf: dict[str, Any]) -> str:
    architectures = hf.get("architectures") or []
    for arch in architectures:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise ValueError(_unsupported_message(", ".join(architectures) or "<none in config.json>"))


def _sliding_window(hf: dict[str, Any], architecture: str) -> int | None:
    """The window that some layer uses, or None when every layer attends to the full context."""
    if architecture == "LlamaForCausalLM":
        window = None
    elif architecture == "MistralForCausalLM":  # one window for all layers
        window = hf.get("sliding_window")
    elif hf.get("layer_types") is not None:
        window = hf.get("sliding_window") if "sliding_attention" in hf["layer_types"] else None
    else:  # Qwen2/Qwen3 before layer_types: layers from max_window_layers on slide
        slides = hf.get("max_window_layers", 28) < hf["num_hidden_layers"]
        window = hf.get("sliding_window") if hf.get("use_sliding_window") and slides else None
    return int(window) if window else None


def _rope(hf: dict[str, Any], context: int) -> tuple[float, dict[str, Any] | None]:
    """Return ``(rope_theta, rope_scaling)`` from either spelling, with the defaults transformers applies."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})  # transformers' precedence
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are unsupported for the Llama family")
    theta = float(params.pop("rope_theta", None) or hf.get("rope_theta") or _DEFAULT_ROPE_THETA)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor {partial} is unsupported; only full rotary embeddings are")
    if rope_type == "default":
        return theta, None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        supported = ", ".join(SUPPORTED_ROPE_TYPES)
        raise ValueError(f"rope type {rope_type!r} is unsupported; supported: {supported}")
    missing = [key for key in _REQUIRED_ROPE_KEYS[rope_type] if key not in params]
    if missing:
        raise ValueError(f"rope type {rope_type!r} needs {', '.join(missing)} in its rope parameters")
    params["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn"):
        # Like transformers: a top-level value wins (Phi3 style), then the rope dict's, then the context.
        original = hf.get("original_max_position_embeddings") or params.get(
            "original_max_position_embeddings"
        )
        params["original_max_position_embeddings"] = int(original or context)
    if rope_type in ("dynamic", "yarn"):
        # Dynamic NTK and yarn's default factor depend on the configured (not capped) context.
        params["max_position_embeddings"] = context
    return theta, params


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _merge_ids(*values: Any) -> tuple[int, ...]:
    merged: list[int] = []
    for value in values:
        merged += [i for i in _as_ids(value) if i not in merged]
    return tuple(merged)


def _first_id(*values: Any) -> int | None:
    for value in values:
        ids = _as_ids(value)
        if ids:
            return ids[0]
    return None


def _dtype(name: str | None) -> str:
    if name is None:
        return "float32"  # what transformers assumes for a config without a dtype
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported checkpoint dtype {name!r}; supported: {', '.join(_DTYPES)}")
    return _DTYPES[key]
