"""Which implementation each layer op uses: one ``Ops`` object, chosen once when the model is built.

``Ops.native()`` is plain torch: the CPU path and the references the kernels are tested
against. ``Ops.triton()`` is the fused Triton kernels of ``lightllm_grpc_kernels`` (the GPU
path; on CPU they run in Triton's interpreter, for tests). ``Ops.for_device`` picks one by
device. The loader hands the object to every layer, and each layer keeps the callables it
needs as attributes when it is constructed, so a forward pays no lookup or branch, and
models built with different ``Ops`` live side by side in one process.

Linear layers get their ``LinearMethod`` per layer from ``linear(prefix)``, the place a
quantized variant plugs in: ``with_quantization`` (called by the model with its config's
``quantization``) returns these ops with a ``linear`` that hands the layers the config covers
``Fp8LinearMethod`` (layers/quantization.py, layers/fp8.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lightllm_grpc.layers import activation, norm, rotary
from lightllm_grpc.layers.linear import UNQUANTIZED, LinearMethod, ShardId
from lightllm_grpc.layers.quant_config import QuantConfig
from lightllm_grpc.layers.quantization import quantized_linear

if TYPE_CHECKING:
    from torch import nn

    from lightllm_grpc.layers.attention.base import AttentionBackend

RmsNorm = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
# (x, residual, weight, eps) -> (norm(residual + x), residual + x); may update residual in place.
AddRmsNorm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
SiluAndMul = Callable[[torch.Tensor], torch.Tensor]
# (positions, q, k, cos_cache, sin_cache) -> (q, k) rotated; may rotate in place.
ApplyRotary = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]
# a linear layer's module name in the model (e.g. "model.layers.0.self_attn.qkv_proj") -> its method.
LinearFactory = Callable[[str], LinearMethod]
# (max_batch_size, num_heads, head_dim, device, dtype) -> the attention backend of a model.
AttentionFactory = Callable[[int, int, int, "torch.device | str", torch.dtype], "AttentionBackend"]


def unquantized(prefix: str) -> LinearMethod:
    """Every linear layer keeps its weight in the model dtype and multiplies with cuBLAS."""
    return UNQUANTIZED


def _torch_attention(
    max_batch_size: int, num_heads: int, head_dim: int, device: torch.device | str, dtype: torch.dtype
) -> AttentionBackend:
    from lightllm_grpc.layers.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()


@dataclass(frozen=True)
class Ops:
    """The op implementations one model uses; the single place that chooses them.

    ``rotary_in_kv_store``: the attention layers hand the rotary embedding to the backend,
    which rotates q and k as part of its KV store (``AttentionBackend.rotate_and_store``),
    instead of calling ``apply_rotary`` first; the Triton backend does both in one kernel.

    ``tune`` is a warm-up hook, run once on the loaded model before CUDA graphs are
    captured: the Triton ops time, per weight shape, a one-token GEMV kernel against cuBLAS
    and the FP8 kernel's tiles, and swap the winners into those layers
    (``matmul_tuning.tune_matmuls``); natively there is none.
    """

    name: str
    rms_norm: RmsNorm
    add_rms_norm: AddRmsNorm
    silu_and_mul: SiluAndMul
    apply_rotary: ApplyRotary
    attention: AttentionFactory
    linear: LinearFactory = unquantized
    rotary_in_kv_store: bool = False
    tune: Callable[[nn.Module], object] | None = None

    @classmethod
    def native(cls) -> Ops:
        """Plain torch: runs anywhere; the references of the kernels."""
        return cls(
            name="native",
            rms_norm=norm.rms_norm,
            add_rms_norm=norm.add_rms_norm,
            silu_and_mul=activation.silu_and_mul,
            apply_rotary=rotary.apply_rotary,
            attention=_torch_attention,
        )

    @classmethod
    def triton(cls) -> Ops:
        """The fused Triton kernels (compiled on CUDA, interpreted on CPU under TRITON_INTERPRET=1)."""
        # Imports the kernels: only when asked for.
        from lightllm_grpc.layers import matmul_tuning, triton_ops

        return cls(
            name="triton",
            rms_norm=triton_ops.rms_norm,
            add_rms_norm=triton_ops.add_rms_norm,
            silu_and_mul=triton_ops.silu_and_mul,
            apply_rotary=triton_ops.apply_rotary,
            attention=triton_ops.attention_backend,
            rotary_in_kv_store=True,
            tune=matmul_tuning.tune_matmuls,
        )

    @classmethod
    def for_device(cls, device: torch.device | str) -> Ops:
        """Triton kernels on CUDA, torch elsewhere."""
        return cls.triton() if torch.device(device).type == "cuda" else cls.native()

    def with_quantization(
        self, quant: QuantConfig | None, packed_modules: Mapping[str, tuple[str, ShardId]]
    ) -> Ops:
        """These ops with the linear layers ``quant`` covers FP8; the others keep ``self.linear``'s
        method. ``packed_modules`` (the model's ``packed_modules_mapping``) names the checkpoint
        modules a fused layer is loaded from, which ``quant``'s ignore list is written against."""
        if quant is None:
            return self
        return dataclasses.replace(self, linear=quantized_linear(quant, packed_modules, self.linear))
