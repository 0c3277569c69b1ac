"""A checkpoint's quantization settings, read once into ``QuantConfig`` (layers/quantization.py).

FP8 checkpoints are recognized by config.json's ``quantization_config`` (or ModelOpt's
``hf_quant_config.json``):

- ``quant_method: "compressed-tensors"`` (llm-compressor): ``config_groups`` whose ``weights``
  are ``num_bits: 8, type: "float"`` with ``strategy`` ``"tensor"`` or ``"channel"``, and
  ``input_activations`` dynamic (per token) or static per tensor; ``ignore`` lists modules kept
  in high precision (names or ``re:`` patterns).
- ``quant_method: "modelopt"`` / hf_quant_config.json with ``quant_algo: "FP8"`` (static
  per-tensor ``input_scale``) or ``"FP8_PER_CHANNEL_PER_TOKEN"``; ``exclude_modules`` (wildcards).
- ``quant_method: "fp8"`` with ``activation_scheme`` dynamic or static and per-tensor or
  per-channel ``weight_scale`` (or ``weight_scale_inv``); block-wise ``weight_block_size`` is not
  supported.

Anything else fails here with one error that names the offending key.

A checkpoint's FP8 KV-cache declaration (compressed-tensors ``kv_cache_scheme``, ModelOpt
``kv_cache_quant_algo``) is read apart, by ``parse_kv_cache_scheme``: it says the checkpoint
stores calibrated per-layer ``k_scale``/``v_scale`` tensors. They are used only with
``--kv-cache-dtype fp8_e4m3`` (``apply_kv_cache_dtype``); the default ``auto`` keeps the
KV cache in the model dtype, as vLLM does (docs/quantization.md). A checkpoint that
quantizes only its KV cache has no quantized linear layers.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from lightllm_grpc.config import KV_CACHE_DTYPES
from lightllm_grpc.layers.quant_config import QuantConfig

if TYPE_CHECKING:
    from lightllm_grpc.models.config import ModelConfig

log = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("fp8",)  # what --quantization may ask for
_SUPPORTED = "compressed-tensors (FP8), modelopt (FP8) and fp8"
_CT_FORMATS = ("float-quantized", "naive-quantized")
_MODELOPT_ALGOS = {"FP8": True, "FP8_PER_CHANNEL_PER_TOKEN": False}  # -> static activation scales
KV_SCHEME_FP8 = "fp8"  # the one KV-cache declaration whose scales we read: per-tensor e4m3


def parse_quantization(
    quantization_config: dict[str, Any] | None, hf_quant_config: dict[str, Any] | None = None
) -> QuantConfig | None:
    """``config.json``'s ``quantization_config`` (or ``hf_quant_config.json``) -> ``QuantConfig``;
    None for an unquantized checkpoint; ``ValueError`` naming the key for what we cannot serve."""
    if quantization_config is None and hf_quant_config is not None:
        quantization_config = {"quant_method": "modelopt", **hf_quant_config}
    if quantization_config is None or _kv_cache_only(quantization_config):
        return None
    method = quantization_config.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(quantization_config)
    if method == "modelopt":
        return _modelopt(quantization_config)
    if method == "fp8":
        return _fp8(quantization_config)
    raise ValueError(f"quantization_config.quant_method {method!r} is unsupported; supported: {_SUPPORTED}")


def parse_kv_cache_scheme(
    quantization_config: dict[str, Any] | None, hf_quant_config: dict[str, Any] | None = None
) -> str | None:
    """What a checkpoint's config declares for its KV cache: None (nothing), ``"fp8"``
    (per-tensor e4m3 scales stored as tensors) or, for anything else, why it cannot be used."""
    if quantization_config is None and hf_quant_config is not None:
        quantization_config = {"quant_method": "modelopt", **hf_quant_config}
    qc = quantization_config or {}
    if qc.get("quant_method") == "compressed-tensors" and qc.get("kv_cache_scheme") is not None:
        scheme = qc["kv_cache_scheme"]
        wanted = {"num_bits": 8, "type": "float", "strategy": "tensor"}
        for key, value in wanted.items():
            if scheme.get(key, value if key == "strategy" else None) != value:
                return f"kv_cache_scheme.{key} = {scheme.get(key)!r} (FP8 KV scales are {key} {value!r})"
        return KV_SCHEME_FP8
    if qc.get("quant_method") == "modelopt":
        algo = qc.get("quantization", qc).get("kv_cache_quant_algo")
        if algo is None:
            return None
        return KV_SCHEME_FP8 if algo == "FP8" else f"kv_cache_quant_algo = {algo!r} (only 'FP8' is read)"
    return None


def apply_kv_cache_dtype(config: ModelConfig, requested: str) -> ModelConfig:
    """``--kv-cache-dtype``: ``"auto"`` keeps K/V in the model dtype (a checkpoint's FP8 KV
    scales then go unused); ``"fp8_e4m3"`` stores them in e4m3 with per-layer scales from the
    checkpoint (1.0 where it has none). A KV-cache declaration we cannot read fails here."""
    if requested not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {requested!r}")
    scheme = config.kv_cache_scheme
    if requested == "fp8_e4m3" and scheme not in (None, KV_SCHEME_FP8):
        raise ValueError(
            f"--kv-cache-dtype fp8_e4m3: the checkpoint's KV-cache quantization is unsupported: {scheme}"
        )
    return dataclasses.replace(config, kv_cache_dtype=requested)


def _kv_cache_only(qc: dict[str, Any]) -> bool:
    """A checkpoint that quantizes its KV cache and no linear layer (compressed-tensors with no
    ``config_groups``; ModelOpt with no ``quant_algo``)."""
    if qc.get("quant_method") == "compressed-tensors":
        return not qc.get("config_groups") and qc.get("kv_cache_scheme") is not None
    if qc.get("quant_method") == "modelopt":
        section = qc.get("quantization", qc)
        return section.get("quant_algo") is None and section.get("kv_cache_quant_algo") is not None
    return False


def apply_quantization_flag(config: ModelConfig, requested: str | None) -> ModelConfig:
    """``--quantization``: None keeps the checkpoint's own; ``"fp8"`` quantizes a high-precision
    checkpoint at load (an FP8 checkpoint is served as stored)."""
    if requested not in (None, *QUANTIZATION_CHOICES):
        raise ValueError(f"quantization must be one of {QUANTIZATION_CHOICES}, got {requested!r}")
    if requested is None or config.quantization is not None:
        return config
    return dataclasses.replace(config, quantization=QuantConfig())


def _fail(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"quantization_config.{key} = {value!r} is unsupported: {why}")


def _compressed_tensors(qc: dict[str, Any]) -> QuantConfig:
    fmt = qc.get("format")
    if fmt is not None and fmt not in _CT_FORMATS:
        raise _fail("format", fmt, f"FP8 checkpoints use {' or '.join(_CT_FORMATS)}")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise _fail("config_groups", groups, "at least one group is needed")
    static: set[bool] = set()
    targets: list[str] = []
    for name, group in groups.items():
        key = f"config_groups.{name}"
        _ct_weights(f"{key}.weights", group.get("weights"))
        static.add(_ct_inputs(f"{key}.input_activations", group.get("input_activations")))
        if group.get("output_activations") is not None:
            raise _fail(f"{key}.output_activations", group["output_activations"], "outputs stay unquantized")
        targets += list(group.get("targets") or ["Linear"])
    if len(static) > 1:
        raise _fail("config_groups", sorted(groups), "groups mix static and dynamic activation scales")
    return QuantConfig(
        source="compressed-tensors",
        static_activations=static.pop(),
        targets=tuple(targets),
        ignore=tuple(qc.get("ignore") or ()),
    )


def _ct_weights(key: str, spec: dict[str, Any] | None) -> None:
    if spec is None:
        raise _fail(key, spec, "weights must be quantized")
    _ct_fp8(key, spec)
    if spec.get("strategy", "tensor") not in ("tensor", "channel"):
        raise _fail(f"{key}.strategy", spec["strategy"], "only 'tensor' and 'channel' weight scales are")
    _no_groups(key, spec)
    if spec.get("dynamic", False):
        raise _fail(f"{key}.dynamic", spec["dynamic"], "weight scales must be stored")


def _ct_inputs(key: str, spec: dict[str, Any] | None) -> bool:
    """True for a static per-tensor activation scale, False for dynamic."""
    if spec is None:
        raise _fail(key, spec, "weight-only FP8 is not served; activations must be FP8 too")
    _ct_fp8(key, spec)
    strategy = spec.get("strategy", "tensor")
    if spec.get("dynamic", False):
        if strategy not in ("token", "tensor"):
            raise _fail(f"{key}.strategy", strategy, "dynamic activation scales are per token or tensor")
        _no_groups(key, spec)
        return False  # a dynamic per-tensor scale is served per token (as fine or finer)
    if strategy != "tensor":
        raise _fail(f"{key}.strategy", strategy, "static activation scales must be per tensor")
    _no_groups(key, spec)
    return True


def _ct_fp8(key: str, spec: dict[str, Any]) -> None:
    if spec.get("num_bits") != 8:
        raise _fail(f"{key}.num_bits", spec.get("num_bits"), "only 8-bit FP8 is")
    if spec.get("type") != "float":
        raise _fail(f"{key}.type", spec.get("type"), "only 'float' (FP8 e4m3) is")
    if spec.get("symmetric", True) is not True:
        raise _fail(f"{key}.symmetric", spec.get("symmetric"), "FP8 scales are symmetric")


def _no_groups(key: str, spec: dict[str, Any]) -> None:
    for field in ("group_size", "block_structure"):
        if spec.get(field) is not None:
            raise _fail(f"{key}.{field}", spec[field], "group and block scales are not supported")


def _modelopt(qc: dict[str, Any]) -> QuantConfig:
    section = qc.get("quantization", qc)  # hf_quant_config.json nests it; config.json may not
    algo = section.get("quant_algo")
    if algo not in _MODELOPT_ALGOS:
        raise _fail("quant_algo", algo, f"ModelOpt checkpoints served: {', '.join(_MODELOPT_ALGOS)}")
    return QuantConfig(
        source="modelopt",
        static_activations=_MODELOPT_ALGOS[algo],
        ignore=tuple(section.get("exclude_modules") or ()),
    )


def _fp8(qc: dict[str, Any]) -> QuantConfig:
    if qc.get("weight_block_size") is not None:
        raise _fail("weight_block_size", qc["weight_block_size"], "block-wise FP8 scales are not supported")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise _fail("activation_scheme", scheme, "must be 'dynamic' or 'static'")
    ignore = qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ()
    return QuantConfig(source="fp8", static_activations=scheme == "static", ignore=tuple(ignore))
