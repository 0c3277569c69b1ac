"""Build the model empty on its target device, then stream weights in from safetensors.

Checkpoint names map to our parameters through the model's declarative
``packed_modules_mapping`` (``q_proj -> (qkv_proj, "q")``); each parameter's
``weight_loader`` cuts this rank's slice. Missing and unexpected tensors are collected and
reported together, by checkpoint name.

FP8 KV-cache scales are optional tensors under any of their spellings (``KV_SCALE_NAMES``):
with ``kv_cache_dtype="fp8_e4m3"`` they fill the attention layers' ``k_scale``/``v_scale``
(one per layer, the same on every TP rank), otherwise they are skipped.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from lightllm_grpc.layers.attention.base import AttentionBackend
from lightllm_grpc.layers.fp8 import Fp8LinearMethod, is_fp8
from lightllm_grpc.layers.linear import ShardId, copy_checked
from lightllm_grpc.layers.norm import RMSNorm
from lightllm_grpc.layers.ops import Ops
from lightllm_grpc.models.config import ModelConfig
from lightllm_grpc.models.llama import LlamaForCausalLM
from lightllm_grpc.models.quantization import apply_kv_cache_dtype, apply_quantization_flag
from lightllm_grpc.models.registry import ModelSpec, get_model_spec

LoadFormat = Literal["auto", "safetensors", "dummy"]
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_INDEX_FILE = "model.safetensors.index.json"
log = logging.getLogger(__name__)
# A checkpoint's KV-cache scale tensors after ``...layers.N.self_attn.`` -> the attention
# buffers they fill: compressed-tensors / vLLM fp8 (k_scale, v_scale), ModelOpt (on the
# projections), older compressed-tensors / AutoFP8 (output scales of k/v_proj, or one kv_scale
# for both). Query and probability scales (FP8 attention math) have no use here: skipped.
KV_SCALE_NAMES: dict[str, tuple[str, ...]] = {
    "k_scale": ("k_scale",),
    "v_scale": ("v_scale",),
    "k_proj.k_scale": ("k_scale",),
    "v_proj.v_scale": ("v_scale",),
    "k_proj.output_scale": ("k_scale",),
    "v_proj.output_scale": ("v_scale",),
    "kv_scale": ("k_scale", "v_scale"),
    "q_scale": (),
    "q_proj.output_scale": (),
    "prob_scale": (),
}
_KV_SCALE = re.compile(
    r"^(?P<attn>.*\.layers\.\d+\.self_attn)\.(?P<name>" + "|".join(map(re.escape, KV_SCALE_NAMES)) + ")$"
)


def resolve_dtype(
    config: ModelConfig, requested: str | torch.dtype, device: torch.device | str
) -> torch.dtype:
    """``"auto"``: on CUDA the checkpoint's half-precision dtype, or bfloat16 for a float32
    checkpoint (decode is bound by weight reads, so fp32 would halve its speed); float32 on
    the CPU, where half precision is slow."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        return _DTYPE_NAMES[config.dtype] if config.dtype in ("bfloat16", "float16") else torch.bfloat16
    if requested not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(_DTYPE_NAMES)}, got {requested!r}")
    return _DTYPE_NAMES[requested]


def load_model(
    model_dir: str | Path,
    *,
    device: torch.device | str,
    dtype: str | torch.dtype,
    attn_backend: AttentionBackend,
    ops: Ops | None = None,
    load_format: LoadFormat = "auto",
    seed: int = 0,
    progress: bool = False,
    quantization: str | None = None,
    kv_cache_dtype: str = "auto",
) -> LlamaForCausalLM:
    """Build the model for ``model_dir``'s config.json on ``device`` and fill its weights.

    ``ops`` chooses the layers' implementations (default: ``Ops.for_device(device)``).

    ``load_format="dummy"`` needs only config.json and fills random weights (seeded by ``seed``),
    for benchmarking a shape without a checkpoint. ``progress`` shows a bar on stderr while
    weights load (an 8B checkpoint takes a while). ``quantization="fp8"`` quantizes a
    high-precision checkpoint's linear layers at load; an FP8 checkpoint is served as stored
    whatever this says (docs/quantization.md). ``kv_cache_dtype="fp8_e4m3"`` gives the model
    an FP8 ``kv_cache_spec`` with the checkpoint's per-layer KV scales (1.0 where it has none).
    """
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"load_format must be 'auto', 'safetensors' or 'dummy', got {load_format!r}")
    folder = Path(model_dir)
    config = apply_quantization_flag(ModelConfig.from_pretrained(folder), quantization)
    config = apply_kv_cache_dtype(config, kv_cache_dtype)
    files = [] if load_format == "dummy" else checkpoint_files(folder)  # fail before allocating
    torch_dtype = resolve_dtype(config, dtype, device)
    model = build_model(config, device=device, dtype=torch_dtype, attn_backend=attn_backend, ops=ops)
    if load_format == "dummy":
        init_dummy_weights(model, seed=seed)
    else:
        load_safetensors_weights(model, files, get_model_spec(config.architecture), progress)
    return model


def build_model(
    config: ModelConfig,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    attn_backend: AttentionBackend,
    ops: Ops | None = None,
) -> LlamaForCausalLM:
    """Allocate every parameter uninitialised (``torch.empty``) directly on ``device`` in ``dtype``,
    each layer with the implementation ``ops`` chooses (default: ``Ops.for_device(device)``)."""
    spec = get_model_spec(config.architecture)
    ops = Ops.for_device(device) if ops is None else ops
    with _default_dtype(dtype), torch.device(device):
        model = spec.model_class(config, attn_backend, ops)
    return model.eval()


def checkpoint_files(model_dir: Path) -> list[Path]:
    """A checkpoint's safetensors files: those the index names if sharded, else every ``*.safetensors``."""
    index = model_dir / _INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors files in {model_dir}; only safetensors checkpoints are supported "
            "(load_format='dummy' needs just config.json)"
        )
    return files


def load_safetensors_weights(
    model: nn.Module, files: list[Path], spec: ModelSpec, progress: bool = False
) -> None:
    """Stream every tensor of ``files`` into ``model``; ``ValueError`` listing missing/unexpected names."""
    params = dict(model.named_parameters())  # a tied lm_head appears once, as the embedding
    model_config = getattr(model, "config", None)
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    buffers = dict(model.named_buffers())  # an FP8 KV cache's scales among them
    expected = _expected_checkpoint_names(params, spec)
    seen: set[str] = set()
    unexpected: list[str] = []
    kv_scales: list[str] = []  # the checkpoint's KV-cache scale tensors
    filled: set[str] = set()
    with torch.no_grad():
        tensors = tqdm(
            _iter_tensors(files),
            total=_count_tensors(files),
            desc="loading weights",
            unit="tensor",
            disable=not progress,
            mininterval=1.0,  # a line a second at most in a log file
        )
        for name, tensor in tensors:
            if name.endswith(spec.ignored_weight_suffixes) or (tied and name == "lm_head.weight"):
                continue  # derived buffers; a tied head reuses the embedding, as transformers does
            kv = _KV_SCALE.match(name)
            if kv is not None:
                kv_scales.append(name)
                for target in (f"{kv['attn']}.{t}" for t in KV_SCALE_NAMES[kv["name"]]):
                    if target in buffers:  # only with an FP8 KV cache
                        load_kv_scale(buffers[target], tensor, name)
                        filled.add(target)
                continue
            name = _canonical_name(name)
            param_name, shard_id = _map_name(name, spec)
            if param_name not in params:
                unexpected.append(name)
                continue
            param = params[param_name]
            loader = getattr(param, "weight_loader", _default_weight_loader)
            loader(param, tensor, shard_id)
            seen.add(name)
    _raise_on_mismatch(sorted(expected - seen), unexpected)
    _report_kv_scales(buffers, kv_scales, filled)


def load_kv_scale(buffer: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    """One layer's K or V cache scale: a single finite, positive number (the dequantization
    multiplier, amax / 448), replicated on every TP rank."""
    if loaded.numel() != 1:
        raise ValueError(
            f"{name} has shape {list(loaded.shape)}: only one KV-cache scale per layer is supported "
            "(not per head or channel)"
        )
    value = float(loaded.float())
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} = {value}: a KV-cache scale must be finite and positive")
    buffer.fill_(value)


def _report_kv_scales(buffers: dict[str, torch.Tensor], found: list[str], filled: set[str]) -> None:
    """Say which KV-cache scales the model got: from the checkpoint, 1.0, or none needed."""
    wanted = {name for name in buffers if name.endswith((".self_attn.k_scale", ".self_attn.v_scale"))}
    if not wanted:
        if found:
            log.info("the checkpoint's %d KV-cache scales are unused: the KV cache keeps the model dtype "
                     "(--kv-cache-dtype fp8_e4m3 would use them)", len(found))  # fmt: skip
        return
    if filled == wanted:
        values = [float(buffers[name]) for name in sorted(wanted)]
        log.info("FP8 KV cache: %d per-layer scales from the checkpoint (%.3g .. %.3g)",
                 len(values), min(values), max(values))  # fmt: skip
        return
    log.warning(
        "FP8 KV cache: the checkpoint has no scale for %d of %d layer K/V caches; those use 1.0 "
        "(values beyond ±448 clip, below 2^-6 lose precision; calibrated k_scale/v_scale avoid both)",
        len(wanted - filled), len(wanted),
    )  # fmt: skip


def init_dummy_weights(model: nn.Module, *, seed: int = 0, std: float = 0.02) -> None:
    """Random normal weights, zero biases and unit norms, generated on the parameters' device.

    An FP8 layer's weight is drawn in the model dtype, in the same order and from the same
    generator as unquantized, then quantized: an FP8 dummy model is exactly the quantized
    version of the unquantized one with the same seed (what FP8 accuracy checks compare).
    """
    generators: dict[torch.device, torch.Generator] = {}

    def generator(device: torch.device) -> torch.Generator:
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        return generators[device]

    fp8 = {id(m.weight): m for m in model.modules() if is_fp8(m)}
    scales = {id(p) for m in fp8.values() for p in (m.weight_scale, m.input_scale) if p is not None}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.zero_()
            elif id(param) in fp8:
                layer = fp8[id(param)]
                dense = torch.empty(param.shape, dtype=layer.dense_dtype, device=param.device)
                Fp8LinearMethod.load_dense_(layer, dense.normal_(0.0, std, generator=generator(param.device)))
            elif id(param) not in scales:  # scales were set with their weight
                param.normal_(0.0, std, generator=generator(param.device))
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _count_tensors(files: list[Path]) -> int:
    """Tensors in ``files``, from their headers alone."""
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            total += len(handle.keys())
    return total


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                yield name, handle.get_tensor(name)


def _canonical_name(name: str) -> str:
    """The ``fp8`` method's ``weight_scale_inv`` multiplies the weight as ``weight_scale`` does."""
    return name.removesuffix("_inv") if name.endswith(".weight_scale_inv") else name


def _map_name(name: str, spec: ModelSpec) -> tuple[str, ShardId]:
    for source, (target, shard_id) in spec.packed_modules_mapping.items():
        if f".{source}." in name:
            return name.replace(f".{source}.", f".{target}."), shard_id
    return name, None


def _expected_checkpoint_names(params: dict[str, nn.Parameter], spec: ModelSpec) -> set[str]:
    """Every checkpoint name the model needs, unpacking fused parameters into their sources."""
    expected: set[str] = set()
    for name in params:
        sources = [
            name.replace(f".{target}.", f".{source}.")
            for source, (target, _) in spec.packed_modules_mapping.items()
            if f".{target}." in name
        ]
        expected.update(sources or [name])
    return expected


def _default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
    copy_checked(param.data, loaded)


def _raise_on_mismatch(missing: list[str], unexpected: list[str]) -> None:
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected tensors: {', '.join(unexpected)}")
    raise ValueError("checkpoint does not match the model; " + "; ".join(parts))
