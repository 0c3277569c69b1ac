"""FP8 layers whose activation is quantized by the kernel that makes it (GPU, more than
``W8A16_MAX_M`` tokens).

Above ``W8A16_MAX_M`` tokens an FP8 layer is W8A8: ``per_token_quant_fp8`` reads its input and
writes e4m3 plus per-token scales, then ``_scaled_mm`` runs. For three of a decoder layer's four
projections the input is made by a kernel right before: qkv and gate_up read a decoder norm's
output, down reads SiLU-and-mul's. ``QuantNormStep`` (an ``AddNormLinear`` step) and
``QuantSiluMatmul`` (an ``ActIntoDown`` matmul) run those as ``add_rmsnorm_quant_fp8`` and
``silu_and_mul_quant_fp8`` instead: one launch and one pass over the activation less per
projection, and bit for bit the same e4m3 values and scales (fp8_quant.py), so the same
outputs. Up to ``W8A16_MAX_M`` tokens the weight-only kernels read the activation as it is,
and each wrapper hands those calls to what was bound before (``small``).

``tune_fp8_act_quant`` binds them at warm-up (``matmul_tuning.tune_matmuls``) into every FP8 layer
that multiplies with ``_scaled_mm``; the o projection keeps its separate quantization (its
input is the attention output). The norm's fused kernel has the row in registers, as the
norm kernel does, and is faster from 17 tokens on (H200). The SiLU one walks the wide
intermediate row twice in chunks, one program per row: slower than the two kernels' 2-D grid
while few rows keep few SMs busy, faster for many. Where the two cross depends on the width
(H200: 256 tokens for 14,336; above 512 for 7,168, the 8B shape at TP=2), so warm-up times
both at ``SILU_QUANT_PROBES`` token counts per width (those whose buffers fit in half the spare
memory), and the fused one runs from the smallest count past which it won at every probe
(``silu_quant_min_rows``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from lightllm_grpc_kernels.activation import silu_and_mul
from lightllm_grpc_kernels.fp8_quant import (
    add_rmsnorm_quant_fp8,
    silu_and_mul_quant_fp8,
    silu_and_mul_then_quant_fp8,
)
from torch import nn

from lightllm_grpc.layers.activation import ActIntoDown
from lightllm_grpc.layers.fp8 import W8A16_MAX_M, fp8_scaled_mm, is_fp8, scaled_mm_applies
from lightllm_grpc.layers.linear import ColumnParallelLinear, LinearBase, Matmul
from lightllm_grpc.layers.norm import AddNormLinear, NormLinearStep, RMSNorm

log = logging.getLogger(__name__)

# Token counts at which warm-up times the SiLU kernel that quantizes against the two kernels.
SILU_QUANT_PROBES = (32, 64, 128, 256, 512, 1024, 2048, 8192)
# (token count -> (ms of the two kernels, ms of the fused one)): time_silu_quant's result.
SiluQuantTimings = Mapping[int, tuple[float, float]]

# (xq e4m3 [M, K], x_scale [M, 1], weight e4m3 [N, K], weight_scale [N], bias, out dtype) -> [M, N]
Fp8Mm = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.dtype], torch.Tensor
]


@dataclass(frozen=True, eq=False)
class QuantNormStep:
    """An ``AddNormLinear`` step for an FP8 column-parallel linear: more than ``W8A16_MAX_M``
    tokens run the residual add, RMSNorm and the quantization as one kernel, then ``mm``; fewer
    run ``small`` (the step bound before: the norm then the W8A16 matmul, or their one-token
    fusion). ``mm``: ``fp8_scaled_mm`` (tests pass its reference)."""

    small: NormLinearStep
    mm: Fp8Mm = fp8_scaled_mm

    def __call__(
        self, norm: RMSNorm, linear: LinearBase, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] <= W8A16_MAX_M:
            return self.small(norm, linear, x, residual)
        q, scale = add_rmsnorm_quant_fp8(x, residual, norm.weight, norm.eps, linear.input_scale)
        y = self.mm(q, scale, linear.weight, linear.weight_scale, linear.bias, x.dtype)
        return y, x if residual is None else residual  # the kernel added into residual in place


@dataclass(frozen=True, eq=False)
class SiluThenMatmul:
    """A down projection's matmul that takes the gate_up output: SiLU-and-mul, then ``matmul``."""

    matmul: Matmul

    def __call__(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.matmul(silu_and_mul(h), weight, bias)


@dataclass(frozen=True, eq=False)
class QuantSiluMatmul:
    """An FP8 down projection's matmul that takes the gate_up output ``[T, 2I]`` (``ActIntoDown``):
    from ``min_rows`` tokens (more than ``W8A16_MAX_M``) SiLU-and-mul and the quantization run
    as one kernel, then ``mm``; fewer run ``small``, which takes the gate_up output for any
    token count (``SiluThenMatmul`` of the layer's FP8 matmul, or the one-token fused GEMV
    warm-up bound, whose fallback is that matmul)."""

    small: Matmul
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None
    min_rows: int
    mm: Fp8Mm = fp8_scaled_mm

    def __post_init__(self) -> None:
        assert self.min_rows > W8A16_MAX_M, "up to W8A16_MAX_M tokens the activation is not quantized"

    def __call__(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if h.shape[0] < self.min_rows:
            return self.small(h, weight, bias)
        q, scale = silu_and_mul_quant_fp8(h, self.input_scale)
        return self.mm(q, scale, weight, self.weight_scale, bias, h.dtype)


def _scaled_mm_layer(layer: LinearBase) -> bool:
    """An FP8 layer that multiplies more than ``W8A16_MAX_M`` tokens with ``_scaled_mm``."""
    out_features, in_features = layer.weight.shape
    return is_fp8(layer) and scaled_mm_applies(layer.weight.device, in_features, out_features)


def use_fp8_act_quant(model: nn.Module, silu_min_rows: Mapping[int, int], mm: Fp8Mm = fp8_scaled_mm) -> int:
    """Bind ``QuantNormStep`` into each ``AddNormLinear`` of ``model`` with an FP8 column-parallel
    linear, and ``QuantSiluMatmul`` into each gated MLP with an FP8 down projection whose input
    width has an entry in ``silu_min_rows`` (its ``min_rows``), where those layers multiply with
    ``_scaled_mm``; each keeps what was bound before for fewer tokens. Idempotent. Returns how
    many changed."""
    changed = 0
    for m in model.modules():
        if isinstance(m, AddNormLinear) and not isinstance(m.step, QuantNormStep):
            linear = m.pair[1]
            if isinstance(linear, ColumnParallelLinear) and _scaled_mm_layer(linear):
                m.step = QuantNormStep(m.step, mm)
                changed += 1
        elif isinstance(m, ActIntoDown) and _scaled_mm_layer(m.down_proj):
            down = m.down_proj
            min_rows = silu_min_rows.get(down.weight.shape[1])
            if min_rows is None or isinstance(down.matmul, QuantSiluMatmul):
                continue
            # Before this, the MLP either applies SiLU-and-mul itself (the down matmul takes its
            # output) or warm-up folded it into the down matmul (which takes the gate_up output).
            small = down.matmul if m.act_in_down else SiluThenMatmul(down.matmul)
            m.fuse_act_into_down(QuantSiluMatmul(small, down.weight_scale, down.input_scale, min_rows, mm))
            changed += 1
    return changed


def tune_fp8_act_quant(model: nn.Module) -> int:
    """Warm-up: for each input width of ``model``'s FP8 down projections on the ``_scaled_mm``
    path, time the SiLU kernel that quantizes against the two kernels (``time_silu_quant``) and
    pick where it takes over (``silu_quant_min_rows``); then ``use_fp8_act_quant``. Returns
    how many layers changed."""
    widths: dict[int, tuple[torch.device, torch.dtype]] = {}
    for m in model.modules():
        if isinstance(m, ActIntoDown) and _scaled_mm_layer(m.down_proj):
            widths[m.down_proj.weight.shape[1]] = (m.down_proj.weight.device, m.down_proj.dense_dtype)
    silu_min_rows: dict[int, int] = {}
    for inter, (device, dtype) in sorted(widths.items()):
        timed = time_silu_quant(inter, device, dtype, affordable_probes(inter, _spare_bytes(device)))
        min_rows = silu_quant_min_rows(timed)
        if min_rows is not None:
            silu_min_rows[inter] = min_rows
        probes = ", ".join(f"{n}: {a * 1e3:.1f} vs {b * 1e3:.1f}" for n, (a, b) in sorted(timed.items()))
        taken = f"one kernel from {min_rows} tokens" if min_rows else "two kernels"
        log.info("SiLU-and-mul of %d then FP8 quantization, two kernels vs one (tokens: us): %s -> %s",
                 inter, probes, taken)  # fmt: skip
    changed = use_fp8_act_quant(model, silu_min_rows)
    torch.cuda.empty_cache()
    return changed


def affordable_probes(
    inter: int, spare_bytes: int, probes: tuple[int, ...] = SILU_QUANT_PROBES
) -> tuple[int, ...]:
    """The ``probes`` whose timing buffers (~8 bytes a token per intermediate column: the bf16
    gate_up input, the SiLU output, two e4m3 outputs) take at most half of ``spare_bytes``.
    Warm-up runs after the KV pool took the memory, so a server configured with short prefill
    chunks may have less spare than the largest probe needs."""
    return tuple(rows for rows in probes if 8 * rows * inter <= spare_bytes // 2)


def _spare_bytes(device: torch.device) -> int:
    """What torch can still hand out on ``device``: free memory plus its cache's unused blocks."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def time_silu_quant(
    inter: int, device: torch.device, dtype: torch.dtype, probes: tuple[int, ...] = SILU_QUANT_PROBES
) -> SiluQuantTimings:
    """ms of ``silu_and_mul_then_quant_fp8`` and of ``silu_and_mul_quant_fp8`` on ``[T, 2 * inter]``
    random activations, at each of ``probes`` tokens, inside CUDA graphs."""
    import triton.testing

    timed = {}
    for rows in probes:
        h = torch.randn(rows, 2 * inter, device=device, dtype=dtype)
        split = triton.testing.do_bench_cudagraph(lambda h=h: silu_and_mul_then_quant_fp8(h))
        fused = triton.testing.do_bench_cudagraph(lambda h=h: silu_and_mul_quant_fp8(h))
        timed[rows] = (split, fused)
    return timed


def silu_quant_min_rows(timed: SiluQuantTimings) -> int | None:
    """The smallest probed token count from which the fused kernel was faster at every larger
    probe (None: not even at the largest). A count between two probes takes the smaller one's
    choice."""
    min_rows = None
    for rows in sorted(timed, reverse=True):
        split, fused = timed[rows]
        if not fused < split:
            break
        min_rows = rows
    return None if min_rows is None else max(min_rows, W8A16_MAX_M + 1)
