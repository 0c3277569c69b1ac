"""Which linear layers are quantized, and the one place a layer's ``LinearMethod`` is picked from that.

``QuantConfig`` is what the model is built with (``ModelConfig.quantization``: parsed from a
checkpoint's ``quantization_config`` by ``models/quantization.py``, or asked for with
``--quantization``). ``quantized_linear`` turns it into the ``Ops.linear`` factory
(``Ops.with_quantization``) that hands each layer ``Fp8LinearMethod`` or the unquantized
method, by the layer's name: the only integration point between a model and the quantized
layers (docs/quantization.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from lightllm_grpc.layers.fp8 import Fp8LinearMethod
from lightllm_grpc.layers.linear import LinearMethod, ShardId
from lightllm_grpc.layers.quant_config import QuantConfig


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
