"""Per-token FP8 (e4m3) quantization of activations, one program per row.

A row's scale is ``max(|x|) / 448`` (dynamic) or one per-tensor ``input_scale`` (static, from
a checkpoint); ``q = clamp(x / scale, -448, 448)`` rounded to e4m3. One launch instead of the
five small torch ops the reference takes, since it runs before every FP8 matmul.

Two of those inputs are made by a kernel right before: the decoder norms' output (qkv and
gate_up read it) and SiLU-and-mul's (down reads it). ``add_rmsnorm_quant_fp8`` and
``silu_and_mul_quant_fp8`` compute them and quantize in the same pass, so the model-dtype
activation is never written and read back. Each rounds the activation to the model dtype
first, exactly as the separate kernel writes it, so its e4m3 values and scales are bit for bit
those of the two kernels in turn: the fusion changes no number.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightllm_grpc_kernels._launch import block, check_rows, on_gpu, pdl, wait_for_predecessor
from lightllm_grpc_kernels.activation import silu_and_mul, silu_mul
from lightllm_grpc_kernels.rmsnorm import fused_add_rmsnorm, norm_row, rmsnorm

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_SCALE = 1e-12  # an all-zero row still gets a finite, positive scale


@triton.jit
def _row_scale(absmax, static_scale_ptr, STATIC: tl.constexpr, QMAX: tl.constexpr, SCALE_MIN: tl.constexpr):
    """The row's scale: the static per-tensor one, or ``max(|x|) / QMAX`` (at least SCALE_MIN)."""
    if STATIC:
        return tl.load(static_scale_ptr)
    return tl.maximum(absmax / QMAX, SCALE_MIN)


@triton.jit
def _quantized(x, scale, QMAX: tl.constexpr):
    """``clamp(x / scale)`` in fp32, to store as e4m3. Correctly rounded division, as torch's:
    the quantized values then match the reference."""
    return tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -QMAX, QMAX)


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
    scale = _row_scale(tl.max(tl.abs(x), axis=0), static_scale_ptr, STATIC, QMAX, SCALE_MIN)
    tl.store(q_ptr + row * stride_q + offs, _quantized(x, scale, QMAX).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _add_rmsnorm_quant_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    q_ptr,
    scale_ptr,
    static_scale_ptr,
    stride_x,
    stride_r,
    stride_q,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    STATIC: tl.constexpr,
    BLOCK: tl.constexpr,
    QMAX: tl.constexpr,
    SCALE_MIN: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    # rmsnorm.py's kernel, ending in the quantization of what it would store.
    row = tl.program_id(0).to(tl.int64)
    y = norm_row(x_ptr, res_ptr, w_ptr, row, stride_x, stride_r, n_cols, eps, HAS_RESIDUAL, BLOCK)
    y = y.to(tl.float32)
    cols = tl.arange(0, BLOCK)
    scale = _row_scale(tl.max(tl.abs(y), axis=0), static_scale_ptr, STATIC, QMAX, SCALE_MIN)
    q = _quantized(y, scale, QMAX).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + row * stride_q + cols, q, mask=cols < n_cols)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _silu_and_mul_quant_kernel(
    h_ptr,
    q_ptr,
    scale_ptr,
    static_scale_ptr,
    stride_h,
    stride_q,
    inter,
    STATIC: tl.constexpr,
    BLOCK: tl.constexpr,
    QMAX: tl.constexpr,
    SCALE_MIN: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_predecessor(PDL)
    # One program per row, in BLOCK-wide chunks: an intermediate row (14,336 for the 8B shape)
    # is too wide to sit in registers with many rows resident. The first pass finds the row's
    # max, the second recomputes each chunk (its gate and up mostly still in L2) and stores it.
    row = tl.program_id(0).to(tl.int64)
    gate_row = h_ptr + row * stride_h
    offs = tl.arange(0, BLOCK)
    absmax = tl.zeros([BLOCK], dtype=tl.float32)
    if not STATIC:
        for start in range(0, inter, BLOCK):
            cols = start + offs
            mask = cols < inter
            gate = tl.load(gate_row + cols, mask=mask, other=0.0)
            up = tl.load(gate_row + inter + cols, mask=mask, other=0.0)
            absmax = tl.maximum(absmax, tl.abs(silu_mul(gate, up).to(tl.float32)))
    scale = _row_scale(tl.max(absmax, axis=0), static_scale_ptr, STATIC, QMAX, SCALE_MIN)
    for start in range(0, inter, BLOCK):
        cols = start + offs
        mask = cols < inter
        gate = tl.load(gate_row + cols, mask=mask, other=0.0)
        up = tl.load(gate_row + inter + cols, mask=mask, other=0.0)
        q = _quantized(silu_mul(gate, up), scale, QMAX)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def _outputs(
    rows: int, cols: int, device: torch.device, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, object]]:
    """The e4m3 ``[rows, cols]`` and fp32 ``[rows, 1]`` outputs, and the launch keywords every
    quantizing kernel takes."""
    q = torch.empty((rows, cols), dtype=FP8, device=device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=device)
    if input_scale is not None:
        assert input_scale.numel() == 1 and input_scale.dtype == torch.float32, "input_scale: one fp32"
    static = scale if input_scale is None else input_scale  # a valid pointer; unused when dynamic
    keywords = {"STATIC": input_scale is not None, "QMAX": FP8_MAX, "SCALE_MIN": MIN_SCALE}
    return q, scale, {"static_scale_ptr": static, **keywords}


def per_token_quant_fp8(
    x: torch.Tensor, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] (fp32/fp16/bf16) -> (e4m3 [M, K], fp32 scales [M, 1]) with ``x ≈ q * scale``.

    ``input_scale`` (fp32, one element): a static per-tensor scale for every row.
    """
    check_rows(x, "x", 2)
    rows, cols = x.shape
    q, scale, keywords = _outputs(rows, cols, x.device, input_scale)
    if rows == 0:
        return q, scale
    size = block(cols)
    _per_token_quant_kernel[(rows,)](
        x, q, scale, stride_x=x.stride(0), stride_q=q.stride(0), cols=cols, BLOCK=size,
        num_warps=min(16, max(1, size // 1024)), **keywords, **pdl(x),
    )  # fmt: skip
    return q, scale


def add_rmsnorm_quant_fp8(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    input_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_token_quant_fp8(fused_add_rmsnorm(x, residual, weight, eps), input_scale)`` (or of
    ``rmsnorm(x, weight, eps)`` without a residual) in one kernel, bit for bit the same;
    ``residual += x`` in place, as ``fused_add_rmsnorm`` does. x [T, N], weight [N] of x's dtype."""
    check_rows(x, "x", 2)
    n_rows, n_cols = x.shape
    assert weight.shape == (n_cols,) and weight.dtype == x.dtype, "weight must be [N] of x's dtype"
    assert weight.is_contiguous(), "weight must be contiguous"
    if residual is not None:
        check_rows(residual, "residual", 2, x.dtype)
        assert residual.shape == x.shape, f"residual {tuple(residual.shape)} != x {tuple(x.shape)}"
    q, scale, keywords = _outputs(n_rows, n_cols, x.device, input_scale)
    if n_rows == 0:
        return q, scale
    res = x if residual is None else residual  # a valid pointer; unused without a residual
    width = block(n_cols)
    _add_rmsnorm_quant_kernel[(n_rows,)](
        x, res, weight, q, scale,
        stride_x=x.stride(0), stride_r=res.stride(0), stride_q=q.stride(0), n_cols=n_cols, eps=eps,
        HAS_RESIDUAL=residual is not None, BLOCK=width,
        num_warps=min(max(width // 512, 1), 16) if on_gpu(x) else 1,
        enable_fp_fusion=False,  # the norm's roundings, as rmsnorm.py keeps them
        **keywords, **pdl(x),
    )  # fmt: skip
    return q, scale


# Chunk of the intermediate row one program loads per step on a GPU: 2,048 bf16 is 16 bytes a
# thread at 8 warps, and keeps four rows' programs resident per SM at 512 rows.
SILU_QUANT_BLOCK = 2048


def silu_and_mul_quant_fp8(
    h: torch.Tensor, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_token_quant_fp8(silu_and_mul(h), input_scale)`` in one kernel, bit for bit the same:
    h [T, 2I] (gate | up) -> (e4m3 [T, I], fp32 [T, 1])."""
    check_rows(h, "h", 2)
    n_rows, width = h.shape
    assert width % 2 == 0, f"h's last dim {width} must be even (gate and up halves)"
    inter = width // 2
    q, scale, keywords = _outputs(n_rows, inter, h.device, input_scale)
    if n_rows == 0:
        return q, scale
    # The interpreter prefers one chunk per row.
    size = min(block(inter), SILU_QUANT_BLOCK) if on_gpu(h) else block(inter)
    _silu_and_mul_quant_kernel[(n_rows,)](
        h, q, scale, stride_h=h.stride(0), stride_q=q.stride(0), inter=inter, BLOCK=size,
        num_warps=min(8, max(1, size // 256)) if on_gpu(h) else 1,
        enable_fp_fusion=False,  # silu_mul's roundings, as activation.py keeps them
        **keywords, **pdl(h),
    )  # fmt: skip
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


def add_rmsnorm_then_quant_fp8(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    input_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two kernels :func:`add_rmsnorm_quant_fp8` replaces, in turn (what it must equal)."""
    y = rmsnorm(x, weight, eps) if residual is None else fused_add_rmsnorm(x, residual, weight, eps)
    return per_token_quant_fp8(y, input_scale)


def silu_and_mul_then_quant_fp8(
    h: torch.Tensor, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two kernels :func:`silu_and_mul_quant_fp8` replaces, in turn (what it must equal)."""
    return per_token_quant_fp8(silu_and_mul(h), input_scale)
