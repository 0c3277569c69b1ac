"""Per-token FP8 (e4m3) quantization of activations, one program per row.

A row's scale is ``max(|x|) / 448`` (dynamic) or one per-tensor ``input_scale`` (static, from
a checkpoint); ``q = clamp(x / scale, -448, 448)`` rounded to e4m3. One launch instead of the
five small torch ops the reference takes, since it runs before every FP8 matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightllm_grpc_kernels._launch import block, check_rows, pdl, wait_for_predecessor

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_SCALE = 1e-12  # an all-zero row still gets a finite, positive scale


@triton.jit
def _per_token_quant_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    static_scale_ptr,
    stride_x,
    stride_q,
    cols,
    STATIC: tl.constexpr,
    BLOCK: tl.constexpr,
    QMAX: tl.constexpr,
    SCALE_MIN: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if STATIC:
        scale = tl.load(static_scale_ptr)
    else:
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / QMAX, SCALE_MIN)
    # Correctly rounded division, as torch's: the quantized values then match the reference.
    q = tl.clamp(tl.math.div_rn(x, scale), -QMAX, QMAX)
    tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def per_token_quant_fp8(
    x: torch.Tensor, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] (fp32/fp16/bf16) -> (e4m3 [M, K], fp32 scales [M, 1]) with ``x ≈ q * scale``.

    ``input_scale`` (fp32, one element): a static per-tensor scale for every row.
    """
    check_rows(x, "x", 2)
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=FP8, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if input_scale is not None:
        assert input_scale.numel() == 1 and input_scale.dtype == torch.float32, "input_scale: one fp32"
    if rows == 0:
        return q, scale
    size = block(cols)
    _per_token_quant_kernel[(rows,)](
        x,
        q,
        scale,
        scale if input_scale is None else input_scale,
        x.stride(0),
        q.stride(0),
        cols,
        STATIC=input_scale is not None,
        BLOCK=size,
        QMAX=FP8_MAX,
        SCALE_MIN=MIN_SCALE,
        num_warps=min(16, max(1, size // 1024)),
        **pdl(x),
    )
    return q, scale


def per_token_quant_fp8_ref(
    x: torch.Tensor, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`per_token_quant_fp8` (also the CPU path of the FP8 layers)."""
    x32 = x.float()
    if input_scale is None:
        scale = (x32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    else:
        scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    q = (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.contiguous()
