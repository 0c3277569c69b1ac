"""Which linear layers of a checkpoint are quantized: ``QuantConfig``, without torch.

``ModelConfig`` carries one (the coordinator reads model configs and must not import torch);
``layers/quantization.py`` turns it into each layer's ``LinearMethod``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatch

from lightllm_grpc.config import QUANTIZATIONS

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
        if self.method not in QUANTIZATIONS:
            raise ValueError(f"quantization method must be one of {QUANTIZATIONS}, got {self.method!r}")
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
