"""Which linear layers are quantized, and the one place a layer's ``LinearMethod`` is picked from that.

``QuantConfig`` is what the model is built with (``ModelConfig.quantization``: parsed from a
checkpoint's ``quantization_config`` by ``models/quantization.py``, or asked for with
``--quantization``). ``quantized_linear`` turns it into the ``Ops.linear`` factory
(``Ops.with_quantization``) that hands each layer ``Fp8LinearMethod`` or the unquantized
method, by the layer's name: the only integration point between a model and the quantized
layers (docs/quantization.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch

from lightllm_grpc.layers.fp8 import Fp8LinearMethod
from lightllm_grpc.layers.linear import LinearMethod, ShardId

QUANT_METHODS = ("fp8",)
# Where the FP8 weights come from: quantized here from a bf16/fp16/fp32 checkpoint, or stored so.
SOURCES = ("load-time", "compressed-tensors", "modelopt", "fp8")


@dataclass(frozen=True)
class QuantConfig:
    """W8A8 FP8 (e4m3) for the decoder's linear layers that ``targets`` name and ``ignore`` does not.

    Weights always end up with one fp32 scale per output channel (a checkpoint's per-tensor
    scale is broadcast to its rows, exactly). Activations are quantized per token at run time
    (``static_activations=False``) or with the checkpoint's per-tensor ``input_scale``.
    """

    method: str = "fp8"
    source: str = "load-time"
    static_activations: bool = False
    # Checkpoint module names (``model.layers.0.mlp.down_proj``): "Linear" (every linear layer),
    # an exact name, a ``re:`` regular expression, or a shell wildcard (ModelOpt's ``*``).
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ValueError(f"quantization method must be one of {QUANT_METHODS}, got {self.method!r}")
        if self.source not in SOURCES:
            raise ValueError(f"quantization source must be one of {SOURCES}, got {self.source!r}")
        if self.static_activations and self.source == "load-time":
            raise ValueError("static activation scales need a checkpoint that stores them")

    @property
    def serialized(self) -> bool:
        """The checkpoint stores FP8 weights and their scales (else they are quantized at load)."""
        return self.source != "load-time"

    def quantizes(self, module: str) -> bool:
        """Whether the checkpoint module ``module`` (e.g. ``model.layers.0.self_attn.q_proj``) is FP8."""
        targeted = any(p == "Linear" or _matches(p, module) for p in self.targets)
        return targeted and not any(_matches(p, module) for p in self.ignore)


def _matches(pattern: str, module: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return module == pattern or module.startswith(pattern + ".") or fnmatch(module, pattern)


def quantized_linear(
    quant: QuantConfig,
    packed_modules: Mapping[str, tuple[str, ShardId]],
    fallback: Callable[[str], LinearMethod],
) -> Callable[[str], LinearMethod]:
    """An ``Ops.linear`` factory: ``Fp8LinearMethod`` for the layers ``quant`` covers, ``fallback``'s
    method for the others.

    A layer is named by its module in the model (``model.layers.0.self_attn.qkv_proj``); a fused
    one is looked up by the checkpoint modules it is loaded from (``packed_modules``, the model's
    ``packed_modules_mapping``: ``q_proj -> (qkv_proj, "q")``), which must all be quantized or
    none, since one matmul serves them.
    """
    method = Fp8LinearMethod(serialized=quant.serialized, static_activations=quant.static_activations)
    sources: dict[str, list[str]] = {}
    for source, (target, _) in packed_modules.items():
        sources.setdefault(target, []).append(source)

    def linear(prefix: str) -> LinearMethod:
        parent, _, name = prefix.rpartition(".")
        modules = [f"{parent}.{part}" if parent else part for part in sources.get(name, [name])]
        chosen = {quant.quantizes(m) for m in modules}
        if len(chosen) > 1:
            raise ValueError(
                f"the quantization config's ignore list names some but not all of {', '.join(modules)}, "
                "which are fused into one layer here"
            )
        return method if chosen.pop() else fallback(prefix)

    return linear
