"""FP8 (e4m3) W8A8 linear layers: per-output-channel weight scales, per-token activation scales.

Each tensor-parallel linear class has an FP8 counterpart (``fp8_class``) that stores its
weight as ``float8_e4m3fn [out_per_rank, in_per_rank]`` with an fp32 ``weight_scale [out_per_rank]``
and cuts its rank's slice exactly as the high-precision class does. The matmul is picked when
the layer is built: ``torch._scaled_mm`` with row-wise scales on a Hopper GPU, otherwise
``fp8_linear_ref``, which reproduces the same quantization error in fp32 (the CPU path and the
reference the GPU path is tested against). docs/quantization.md has the formats and choices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightllm_grpc.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    ShardId,
)

if TYPE_CHECKING:
    from lightllm_grpc.layers.quantization import QuantConfig

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_SCALE = 1e-12  # an all-zero row still gets a finite, positive scale
# torch._scaled_mm: K and N multiples of 16; row-wise scales need compute capability 9.0.
_SCALED_MM_ALIGN = 16
_SCALED_MM_CAPABILITY = (9, 0)

Fp8Matmul = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor
]


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel: ``scale[n] = max|w[n, :]| / 448``; returns (e4m3 [N, K], fp32 [N])."""
    w32 = w.float()
    scale = (w32.abs().amax(dim=1) / FP8_MAX).clamp(min=MIN_SCALE)
    return (w32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_activation(
    x: torch.Tensor, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (row) of ``x`` [M, K], or with the static per-tensor ``input_scale``:
    (e4m3 [M, K], fp32 [M, 1]). The same rule as the Triton kernel ``per_token_quant_fp8``."""
    x32 = x.float()
    if input_scale is None:
        scale = (x32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    else:
        scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x W^T + b`` as the FP8 GEMM computes it: quantize ``x`` per token, multiply the e4m3
    values exactly in fp32, then apply both scales. Works on any device."""
    rows = x.reshape(-1, x.shape[-1])
    xq, x_scale = quantize_activation(rows, input_scale)
    y = (xq.float() @ weight.float().t()) * x_scale * weight_scale.view(1, -1)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], -1)


def fp8_linear_scaled_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The Hopper path: one Triton launch quantizes ``x`` per token, then cuBLASLt's FP8 GEMM
    with row-wise scales (``scale_a [M, 1]``, ``scale_b [1, N]``, fp32) writes bf16."""
    from lightllm_grpc_kernels.fp8_quant import per_token_quant_fp8

    rows = x.reshape(-1, x.shape[-1])
    xq, x_scale = per_token_quant_fp8(rows if rows.stride(-1) == 1 else rows.contiguous(), input_scale)
    # weight is row-major [N, K]: its transpose is the column-major [K, N] operand _scaled_mm wants.
    y = torch._scaled_mm(
        xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1), out_dtype=torch.bfloat16
    )
    if y.dtype != x.dtype:  # row-wise scaling writes bf16 only; an fp16 model pays one cast
        y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], -1)


def scaled_mm_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= _SCALED_MM_CAPABILITY


def pick_fp8_matmul(device: torch.device, in_features: int, out_features: int) -> Fp8Matmul:
    """``torch._scaled_mm`` where it runs (Hopper, K and N multiples of 16), else the reference."""
    aligned = in_features % _SCALED_MM_ALIGN == 0 and out_features % _SCALED_MM_ALIGN == 0
    if scaled_mm_supported(device) and aligned:
        return fp8_linear_scaled_mm
    if device.type == "cuda":
        log.warning(
            "FP8 layer [%d x %d] on %s runs the slow reference matmul (needs compute capability "
            ">= %s and sizes that are multiples of %d)",
            out_features, in_features, device, _SCALED_MM_CAPABILITY, _SCALED_MM_ALIGN,
        )  # fmt: skip
    return fp8_linear_ref


class Fp8Linear(LinearBase):
    """Mixed in before a tensor-parallel linear class; keeps its sharding, replaces its storage.

    Parameters: ``weight`` e4m3 ``[out, in]`` per rank; ``weight_scale`` fp32 ``[out]``, a
    parameter loaded from the checkpoint when it stores FP8, else a buffer filled when the
    high-precision weight is quantized at load; ``input_scale`` fp32 ``[1]`` only with static
    activation scales (the maximum over the parts of a fused layer).
    """

    weight_dtype = FP8

    def __init__(self, *args: Any, quant: QuantConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        out_features, in_features = self.weight.shape
        self.serialized = quant.serialized
        self.dense_dtype = torch.get_default_dtype()  # the model's: what the weight would be unquantized
        scale = torch.ones(out_features, dtype=torch.float32)
        if quant.serialized:
            self.weight_scale = nn.Parameter(scale, requires_grad=False)
            self.weight_scale.weight_loader = self.weight_loader
        else:
            self.register_buffer("weight_scale", scale)
        if quant.static_activations:
            self.input_scale = nn.Parameter(torch.zeros(1, dtype=torch.float32), requires_grad=False)
            self.input_scale.weight_loader = self.weight_loader
        else:
            self.register_parameter("input_scale", None)
        self.fp8_matmul: Fp8Matmul = pick_fp8_matmul(self.weight.device, in_features, out_features)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if param is self.weight and loaded.dtype != FP8:
            # A high-precision checkpoint: quantize the whole tensor per output channel, then
            # cut this rank's rows (or columns) of the weight and of the scales as usual.
            if self.serialized:
                raise ValueError(
                    f"a {loaded.dtype} weight where the checkpoint's quantization_config promises FP8"
                )
            q, scale = quantize_weight(loaded.to(param.device))
            super().weight_loader(param, q, shard_id)
            super().weight_loader(self.weight_scale, scale, shard_id)
        elif param is self.weight and not self.serialized:
            raise ValueError("the checkpoint stores FP8 weights but config.json has no quantization_config")
        elif param is self.weight_scale:
            scale = loaded.to(torch.float32).reshape(-1)  # [], [1], [N] or [N, 1]
            if scale.numel() == 1:  # per tensor: every row this part fills gets it, exactly
                param.data.narrow(0, *self.output_rows(shard_id)).fill_(scale.item())
            else:
                super().weight_loader(param, scale, shard_id)
        elif param is self.input_scale:
            # Fused parts see the same input: the largest scale clips none of them.
            param.data.copy_(torch.maximum(param.data, loaded.to(param.device, torch.float32).reshape(1)))
        else:
            super().weight_loader(param, loaded, shard_id)

    def load_dense_(self, weight: torch.Tensor) -> None:
        """Quantize this rank's high-precision ``weight [out, in]`` into place (dummy weights)."""
        q, scale = quantize_weight(weight)
        self.weight.data.copy_(q)
        self.weight_scale.data.copy_(scale)
        if self.input_scale is not None:
            self.input_scale.data.fill_(1.0)  # unit-RMS hidden states fit e4m3's range at scale 1

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 ``weight * weight_scale`` (tests and checks)."""
        return self.weight.float() * self.weight_scale.view(-1, 1)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.fp8_matmul(x, self.weight, self.weight_scale, self.input_scale, bias)


class Fp8ColumnParallelLinear(Fp8Linear, ColumnParallelLinear):
    pass


class Fp8MergedColumnParallelLinear(Fp8Linear, MergedColumnParallelLinear):
    pass


class Fp8QKVParallelLinear(Fp8Linear, QKVParallelLinear):
    pass


class Fp8RowParallelLinear(Fp8Linear, RowParallelLinear):
    pass


_FP8_CLASSES: dict[type[LinearBase], type[Fp8Linear]] = {
    ColumnParallelLinear: Fp8ColumnParallelLinear,
    MergedColumnParallelLinear: Fp8MergedColumnParallelLinear,
    QKVParallelLinear: Fp8QKVParallelLinear,
    RowParallelLinear: Fp8RowParallelLinear,
}


def fp8_class(cls: type[LinearBase]) -> type[Fp8Linear]:
    if cls not in _FP8_CLASSES:
        raise ValueError(f"no FP8 version of {cls.__name__}")
    return _FP8_CLASSES[cls]
