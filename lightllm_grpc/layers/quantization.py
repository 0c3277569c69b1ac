"""Which linear layers are quantized, and the one place a layer's class is picked from that.

``QuantConfig`` is what the model is built with (parsed from a checkpoint's
``quantization_config`` by ``models/quantization.py``, or asked for with ``--quantization``).
The model builds every projection through ``make_linear``; that factory is the only
integration point between a model and the quantized layers (docs/quantization.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any, TypeVar

from lightllm_grpc.layers.linear import LinearBase

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


L = TypeVar("L", bound=LinearBase)


def make_linear(
    cls: type[L], quant: QuantConfig | None, modules: Sequence[str], *args: Any, **kwargs: Any
) -> LinearBase:
    """Build ``cls(*args, **kwargs)``, or its FP8 counterpart when ``quant`` covers the layer.

    ``modules`` are the checkpoint module names the layer is loaded from (several for a fused
    layer: q/k/v, gate/up); they must all be quantized or none, since one matmul serves them.
    """
    if quant is None:
        return cls(*args, **kwargs)
    chosen = {quant.quantizes(m) for m in modules}
    if len(chosen) > 1:
        raise ValueError(
            f"the quantization config's ignore list names some but not all of {', '.join(modules)}, "
            "which are fused into one layer here"
        )
    if not chosen.pop():
        return cls(*args, **kwargs)
    from lightllm_grpc.layers.fp8 import fp8_class

    return fp8_class(cls)(*args, quant=quant, **kwargs)
