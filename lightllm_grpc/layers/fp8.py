"""FP8 (e4m3) W8A8 linear layers: per-output-channel weight scales, per-token activation scales.

``Fp8LinearMethod`` is a ``LinearMethod`` (layers/linear.py): any tensor-parallel linear class
built with it stores its weight as ``float8_e4m3fn [out_per_rank, in_per_rank]`` with an fp32
``weight_scale [out_per_rank]``, and cuts its rank's slice of both with the class's own
sharding. The matmul is picked when the layer is built: on a Hopper GPU ``fp8_linear_cuda``,
which runs up to ``W8A16_MAX_M`` tokens weight-only (a Triton kernel multiplies the e4m3 weight
by the unquantized activations) and more through ``torch._scaled_mm`` with row-wise scales;
otherwise ``fp8_linear_ref``, which reproduces W8A8's quantization error in fp32 (the CPU path
and the reference the ``_scaled_mm`` path is tested against).
``layers/quantization.py`` decides which layers get it; docs/quantization.md has the formats
and choices.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lightllm_grpc.layers.linear import LinearBase, LinearMethod, Matmul, ShardId

if TYPE_CHECKING:  # the kernels are imported only where they run
    from lightllm_grpc_kernels.fp8_gemv import Fp8GemvConfig
    from lightllm_grpc_kernels.gemv import GemvConfig
    from lightllm_grpc_kernels.gemv_rows import RowsConfigs

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_SCALE = 1e-12  # an all-zero row still gets a finite, positive scale
# torch._scaled_mm: K and N multiples of 16; row-wise scales need compute capability 9.0.
_SCALED_MM_ALIGN = 16
_SCALED_MM_CAPABILITY = (9, 0)
# Up to this many tokens an FP8 matmul is weight-only (W8A16): a decode-sized matmul is a read
# of its weight, and the W8A16 kernel reads each weight byte once for up to 16 tokens (its
# tl.dot tile), with no activation-quantization launch, where _scaled_mm measured slower than
# bf16 (H200, M = 1 and 16). W8A8 _scaled_mm takes over above, where it won from M ~ 256.
W8A16_MAX_M = 16

# (x, weight e4m3, weight_scale, input_scale, bias) -> x W^T + b: fp8_linear_cuda or _ref.
Fp8Gemm = Callable[
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
    return fp8_scaled_mm_ref(xq, x_scale, weight, weight_scale, bias, x.dtype).view(*x.shape[:-1], -1)


def fp8_linear_scaled_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The Hopper path: one Triton launch quantizes ``x`` per token, then ``fp8_scaled_mm``."""
    from lightllm_grpc_kernels.fp8_quant import per_token_quant_fp8

    xq, x_scale = per_token_quant_fp8(_token_rows(x), input_scale)
    y = fp8_scaled_mm(xq, x_scale, weight, weight_scale, bias, x.dtype)
    return y.view(*x.shape[:-1], -1)


def fp8_scaled_mm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``xq`` e4m3 ``[M, K]`` with its per-token scales ``[M, 1]`` (already quantized) times the
    e4m3 ``weight`` ``[N, K]``: cuBLASLt's FP8 GEMM with row-wise scales (``scale_a [M, 1]``,
    ``scale_b [1, N]``, fp32) writes bf16; then ``out_dtype`` and the bias. ``[M, N]``."""
    # weight is row-major [N, K]: its transpose is the column-major [K, N] operand _scaled_mm wants.
    y = torch._scaled_mm(
        xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1), out_dtype=torch.bfloat16
    )
    y = y.to(out_dtype)  # row-wise scaling writes bf16 only; an fp16 model pays one cast
    return y if bias is None else y + bias


def fp8_scaled_mm_ref(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``fp8_scaled_mm`` on any device: the e4m3 values multiplied exactly in fp32, then the scales."""
    y = ((xq.float() @ weight.float().t()) * x_scale * weight_scale.view(1, -1)).to(out_dtype)
    return y if bias is None else y + bias


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[tokens, K]`` with a unit last stride, as the kernels take it."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def fp8_linear_w8a16(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    config: Fp8GemvConfig | None = None,
) -> torch.Tensor:
    """Weight-only: the Triton kernel streams the e4m3 weight once and multiplies ``x`` as it is
    (no activation quantization, so ``input_scale`` is unused), scale and bias fused; writes x's
    dtype. ``config``: the kernel's tiles (None: its default)."""
    from lightllm_grpc_kernels.fp8_gemv import fp8_gemv

    y = fp8_gemv(_token_rows(x), weight, weight_scale, bias, config)
    return y.view(*x.shape[:-1], -1)


def fp8_linear_gemv_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    config: GemvConfig | None,
) -> torch.Tensor:
    """Weight-only for a few tokens (at most ``gemv_rows.MAX_ROWS``): the GEMV loop with the
    tokens unrolled, which converts each e4m3 weight once for all of them (no tl.dot tile)."""
    from lightllm_grpc_kernels.gemv_rows import gemv_rows

    y = gemv_rows(_token_rows(x), weight, config, weight_scale, bias)
    return y.view(*x.shape[:-1], -1)


@functools.cache
def fp8_cuda_gemm(
    one: Fp8GemvConfig | None = None, few: Fp8GemvConfig | None = None, rows: RowsConfigs = ()
) -> Fp8Gemm:
    """The Hopper path: W8A16 up to ``W8A16_MAX_M`` tokens (kernel tiles ``one`` for a single
    token, ``few`` for 2..16; None: the default), W8A8 ``_scaled_mm`` above. A token count that
    ``rows`` binds (``gemv_rows.rows_config``) goes through ``fp8_linear_gemv_rows`` with its
    tiles instead, where warm-up timed that faster. Chosen by the token count alone, so each
    decode CUDA graph (one per batch size) captures one path. One function per set of choices,
    shared by the layers that made it (``matmul_tuning.tune_fp8_gemv``)."""

    def gemm(
        x: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        input_scale: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        m = x.shape[:-1].numel()
        if m > W8A16_MAX_M:
            return fp8_linear_scaled_mm(x, weight, weight_scale, input_scale, bias)
        from lightllm_grpc_kernels.gemv_rows import rows_config

        config = rows_config(rows, m)
        if config is not None:
            return fp8_linear_gemv_rows(x, weight, weight_scale, bias, config)
        return fp8_linear_w8a16(x, weight, weight_scale, input_scale, bias, one if m == 1 else few)

    return gemm


fp8_linear_cuda = fp8_cuda_gemm()  # untuned: the kernel's default tiles


def scaled_mm_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= _SCALED_MM_CAPABILITY


def scaled_mm_applies(device: torch.device, in_features: int, out_features: int) -> bool:
    """Whether an FP8 layer of this shape on ``device`` multiplies with ``_scaled_mm`` (Hopper,
    K and N multiples of 16)."""
    aligned = in_features % _SCALED_MM_ALIGN == 0 and out_features % _SCALED_MM_ALIGN == 0
    return scaled_mm_supported(device) and aligned


def pick_fp8_gemm(device: torch.device, in_features: int, out_features: int) -> Fp8Gemm:
    """``fp8_linear_cuda`` where ``_scaled_mm`` runs (``scaled_mm_applies``), else the reference."""
    if scaled_mm_applies(device, in_features, out_features):
        return fp8_linear_cuda
    if device.type == "cuda":
        log.warning(
            "FP8 layer [%d x %d] on %s runs the slow reference matmul (needs compute capability "
            ">= %s and sizes that are multiples of %d)",
            out_features, in_features, device, _SCALED_MM_CAPABILITY, _SCALED_MM_ALIGN,
        )  # fmt: skip
    return fp8_linear_ref


@dataclass(frozen=True, eq=False)
class Fp8Matmul:
    """An FP8 layer's ``matmul(x, weight, bias)``: ``gemm`` with the layer's scales bound."""

    gemm: Fp8Gemm
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.gemm(x, weight, self.weight_scale, self.input_scale, bias)


@dataclass(frozen=True)
class Fp8LinearMethod(LinearMethod):
    """FP8 storage and matmul for any tensor-parallel linear layer (W8A8; W8A16 for a few tokens on GPU).

    Tensors it registers: ``weight`` e4m3 ``[out, in]`` per rank; ``weight_scale`` fp32
    ``[out]``, a parameter loaded from the checkpoint when it stores FP8 (``serialized``), else
    a buffer filled when the high-precision weight is quantized at load; ``input_scale`` fp32
    ``[1]`` only with ``static_activations`` (the maximum over the parts of a fused layer);
    ``bias`` in the model dtype. Their loaders wrap the layer's own sharding ``weight_loader``:
    a per-tensor checkpoint scale fills exactly the rows of its part. The layer's ``matmul`` is an
    ``Fp8Matmul`` bound to these tensors (loaders and dummy weights fill them in place).
    """

    serialized: bool = False  # the checkpoint stores e4m3 weights and their scales
    static_activations: bool = False  # a per-tensor input_scale from the checkpoint, not per token

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, bias: bool) -> None:
        assert isinstance(layer, LinearBase)
        layer.dense_dtype = torch.get_default_dtype()  # the model's: what the weight would be unquantized
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=FP8), requires_grad=False)
        layer.weight.weight_loader = functools.partial(self._load_weight, layer)
        scale = torch.ones(output_size, dtype=torch.float32)
        if self.serialized:
            layer.weight_scale = nn.Parameter(scale, requires_grad=False)
            layer.weight_scale.weight_loader = functools.partial(self._load_weight_scale, layer)
        else:
            layer.register_buffer("weight_scale", scale)
        if self.static_activations:
            layer.input_scale = nn.Parameter(torch.zeros(1, dtype=torch.float32), requires_grad=False)
            layer.input_scale.weight_loader = self._load_input_scale
        else:
            layer.register_parameter("input_scale", None)
        if bias:  # sharded by the layer's own weight_loader
            layer.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
        else:
            layer.register_parameter("bias", None)

    def matmul(self, layer: nn.Module) -> Matmul:
        out_features, in_features = layer.weight.shape
        gemm = pick_fp8_gemm(layer.weight.device, in_features, out_features)
        return Fp8Matmul(gemm, layer.weight_scale, layer.input_scale)

    def _load_weight(
        self, layer: LinearBase, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None
    ) -> None:
        if loaded.dtype == FP8:
            if not self.serialized:
                raise ValueError(
                    "the checkpoint stores FP8 weights but config.json has no quantization_config"
                )
            layer.weight_loader(param, loaded, shard_id)
            return
        if self.serialized:
            raise ValueError(
                f"a {loaded.dtype} weight where the checkpoint's quantization_config promises FP8"
            )
        # A high-precision checkpoint: quantize the whole tensor per output channel, then cut
        # this rank's rows (or columns) of the weight and of the scales as usual.
        q, scale = quantize_weight(loaded.to(param.device))
        layer.weight_loader(param, q, shard_id)
        layer.weight_loader(layer.weight_scale, scale, shard_id)

    def _load_weight_scale(
        self, layer: LinearBase, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None
    ) -> None:
        scale = loaded.to(torch.float32).reshape(-1)  # [], [1], [N] or [N, 1]
        if scale.numel() == 1:  # per tensor: every row this part fills gets it, exactly
            param.data.narrow(0, *layer.output_rows(shard_id)).fill_(scale.item())
        else:
            layer.weight_loader(param, scale, shard_id)

    @staticmethod
    def _load_input_scale(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        # Fused parts see the same input: the largest scale clips none of them.
        param.data.copy_(torch.maximum(param.data, loaded.to(param.device, torch.float32).reshape(1)))

    @staticmethod
    def load_dense_(layer: LinearBase, weight: torch.Tensor) -> None:
        """Quantize this rank's high-precision ``weight [out, in]`` into ``layer`` (dummy weights)."""
        q, scale = quantize_weight(weight)
        layer.weight.data.copy_(q)
        layer.weight_scale.data.copy_(scale)
        if layer.input_scale is not None:
            layer.input_scale.data.fill_(1.0)  # unit-RMS hidden states fit e4m3's range at scale 1

    @staticmethod
    def dequantized_weight(layer: LinearBase) -> torch.Tensor:
        """fp32 ``weight * weight_scale`` of an FP8 ``layer`` (tests and checks)."""
        return layer.weight.float() * layer.weight_scale.view(-1, 1)


def is_fp8(layer: nn.Module) -> bool:
    """Whether ``layer`` is a linear layer built with ``Fp8LinearMethod``."""
    return isinstance(layer, LinearBase) and isinstance(layer.method, Fp8LinearMethod)
