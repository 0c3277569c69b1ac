"""Matrix-vector product for one-token decode: ``y [1, N] = x [1, K] @ w [N, K]^T``.

At batch 1 a decode step is a chain of weight reads; cuBLAS's heuristics leave some of
these shapes well under the copy bandwidth (e.g. too few thread blocks for the SMs). This
kernel gives each program a slab of ``BLOCK_N`` weight rows and streams it once, with
fp32 accumulation. The serving path uses it only for the shapes where it measured faster.

Two variants fold the small op before a projection into the GEMV's loads, which removes
that op's launch (about 2 µs a layer in a batch-1 graph) and its round trip through memory:

- ``silu_gemv`` (the MLP's down projection) reads the gate_up output ``[1, 2K]`` and computes
  ``silu(gate) * up`` per K-slice, with ``activation.silu_mul``'s roundings;
- ``add_rmsnorm_gemv`` (qkv and gate_up after a decoder norm) reads ``x`` and ``residual``:
  every program first sums the squares of the row ``residual + x`` (8 KB for 4096 columns,
  from L2), then normalises each K-slice as it loads it; program 0 also stores ``residual + x``
  into a *second* buffer (every program reads the first, so writing it in place would race).

Both equal the unfused pair (``silu_and_mul`` or ``fused_add_rmsnorm``, then ``gemv`` with the
same config) bit for bit: the x values are the same expressions and the accumulation loop
is this one kernel's.

Each of the three also takes an e4m3 weight with per-row fp32 scales (``scale``; FP8 layers,
weight-only at one token): the weight converts to fp32 in the same loop, and the epilogue
multiplies by the scale and adds the bias in fp32 before the one rounding to the output
dtype. ``fp8_gemv.fp8_gemv`` sends its one-token calls here, so an FP8 layer's fused and
unfused steps are this one loop too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lightllm_grpc_kernels._launch import check_index, check_rows, on_gpu, pdl, wait_for_predecessor
from lightllm_grpc_kernels.activation import silu_mul
from lightllm_grpc_kernels.rmsnorm import add_rows, inv_rms, normed, squares


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 1  # K-loop tiles in flight (cp.async pipelining); 1: none


# Candidates tried per weight shape when the serving path tunes itself.
GEMV_CONFIGS = (
    GemvConfig(16, 256, 4),
    GemvConfig(32, 256, 4),
    GemvConfig(8, 512, 4),
    GemvConfig(16, 512, 8),
    GemvConfig(4, 1024, 4),
    # Pipelined: for shapes with few programs per SM (N = 2048..4096 at TP=1 and 2).
    GemvConfig(16, 256, 4, 3),
    GemvConfig(8, 512, 4, 3),
    GemvConfig(4, 1024, 4, 2),
    GemvConfig(8, 1024, 8, 2),
    GemvConfig(2, 2048, 4, 2),
)


# What the GEMV does to x before the dot (a constexpr of its body).
PLAIN, SILU_AND_MUL, ADD_RMSNORM = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _load_x(x_ptr, res_ptr, cols, col_mask, k, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    # The K-slice of the GEMV's input before its prologue's last step (ADD_RMSNORM: the summed row).
    if PROLOGUE == SILU_AND_MUL:
        gate = tl.load(x_ptr + cols, mask=col_mask, other=0.0)
        up = tl.load(x_ptr + k + cols, mask=col_mask, other=0.0)
        return silu_mul(gate, up)
    x = tl.load(x_ptr + cols, mask=col_mask, other=0.0)
    if PROLOGUE == ADD_RMSNORM and HAS_RESIDUAL:
        x = add_rows(x, tl.load(res_ptr + cols, mask=col_mask, other=0.0))
    return x


@triton.jit
def _gemv_body(
    x_ptr, w_ptr, y_ptr, n, k, stride_w,
    res_ptr, res_out_ptr, norm_w_ptr, eps,  # ADD_RMSNORM only
    scale_ptr, bias_ptr,  # SCALED only (HAS_BIAS: bias_ptr too)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_predecessor(PDL)
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    if PROLOGUE == ADD_RMSNORM:
        # The whole row's statistic, in every program (fp64: the same bits as rmsnorm.py's in any order).
        sq = tl.zeros([BLOCK_K], dtype=tl.float64)
        for start in tl.range(0, k, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            sq += squares(_load_x(x_ptr, res_ptr, cols, cols < k, k, PROLOGUE, HAS_RESIDUAL))
        rstd = inv_rms(tl.sum(sq, axis=0), k, eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for start in tl.range(0, k, BLOCK_K, num_stages=NUM_STAGES):
        cols = start + tl.arange(0, BLOCK_K)
        col_mask = cols < k
        x = _load_x(x_ptr, res_ptr, cols, col_mask, k, PROLOGUE, HAS_RESIDUAL)
        if PROLOGUE == ADD_RMSNORM:
            if HAS_RESIDUAL:  # one program writes the new residual stream
                tl.store(res_out_ptr + cols, x, mask=col_mask & (pid == 0))
            x = normed(x, rstd, tl.load(norm_w_ptr + cols, mask=col_mask, other=0.0))
        x = x.to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    store_output_row(y_ptr, acc, rows, row_mask, scale_ptr, bias_ptr, SCALED, HAS_BIAS)


@triton.jit
def store_output_row(
    y_row_ptr, acc, rows, row_mask, scale_ptr, bias_ptr, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr
):
    # One token's outputs from its [BLOCK_N, BLOCK_K] accumulator (gemv_rows.py's too).
    y = tl.sum(acc, axis=1)
    if SCALED:  # an e4m3 weight: its per-row scale, then the bias, in fp32 (fp8_gemv's epilogue)
        y *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(y_row_ptr + rows, y.to(y_row_ptr.dtype.element_ty), mask=row_mask)


# One kernel per prologue, so that a profile names them apart; each is the body above.
@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, y_ptr, n, k, stride_w, scale_ptr, bias_ptr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    _gemv_body(x_ptr, w_ptr, y_ptr, n, k, stride_w, x_ptr, x_ptr, x_ptr, 0.0, scale_ptr, bias_ptr,
               BLOCK_N, BLOCK_K, NUM_STAGES, PLAIN, False, SCALED, HAS_BIAS, PDL)  # fmt: skip


@triton.jit
def _silu_gemv_kernel(
    h_ptr, w_ptr, y_ptr, n, k, stride_w, scale_ptr, bias_ptr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    _gemv_body(h_ptr, w_ptr, y_ptr, n, k, stride_w, h_ptr, h_ptr, h_ptr, 0.0, scale_ptr, bias_ptr,
               BLOCK_N, BLOCK_K, NUM_STAGES, SILU_AND_MUL, False, SCALED, HAS_BIAS, PDL)  # fmt: skip


@triton.jit
def _add_rmsnorm_gemv_kernel(
    x_ptr, w_ptr, y_ptr, n, k, stride_w, scale_ptr, bias_ptr, res_ptr, res_out_ptr, norm_w_ptr, eps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    _gemv_body(x_ptr, w_ptr, y_ptr, n, k, stride_w, res_ptr, res_out_ptr, norm_w_ptr, eps,
               scale_ptr, bias_ptr, BLOCK_N, BLOCK_K, NUM_STAGES, ADD_RMSNORM, HAS_RESIDUAL,
               SCALED, HAS_BIAS, PDL)  # fmt: skip


def launch_tiles(
    x: torch.Tensor, w: torch.Tensor, config: GemvConfig | None, default: GemvConfig
) -> GemvConfig:
    """The tiles a GEMV launch over ``w`` [N, K] uses: ``config`` (None: ``default``) on a GPU;
    in Triton's interpreter (CPU), which wants few, large programs, tiles from w's shape."""
    if on_gpu(x):
        return config or default
    n, k = w.shape
    return GemvConfig(block_n=min(64, triton.next_power_of_2(n)), block_k=min(256, triton.next_power_of_2(k)))


def epilogue_pointers(
    x: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and bias pointers of a GEMV launch: where there is none, a valid pointer (x)
    that the kernel, specialised on SCALED / HAS_BIAS, never reads."""
    scale_arg = x if scale is None else scale
    return scale_arg, scale_arg if bias is None else bias


def check_weight(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
) -> None:
    """``w`` [N, K] in ``x``'s dtype; or e4m3 with its fp32 ``scale`` [N] (and a ``bias`` [N] in
    ``x``'s dtype, which only the scaled epilogue adds)."""
    if scale is None:
        check_rows(w, "w", 2, x.dtype)
        assert bias is None, "an unscaled GEMV adds no bias (its caller does)"
        return
    check_rows(w, "w", 2, torch.float8_e4m3fn)
    check_index(scale, "scale", w.shape[0], torch.float32)
    if bias is not None:
        check_index(bias, "bias", w.shape[0], x.dtype)


def _launch(
    kernel,
    x: torch.Tensor,
    w: torch.Tensor,
    config: GemvConfig | None,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    *args,
    **constexprs,
) -> torch.Tensor:
    """``kernel`` (one of the three above) over ``w``'s rows, with ``args`` after the shared ones."""
    n, k = w.shape
    cfg = launch_tiles(x, w, config, GemvConfig())
    y = x.new_empty((1, n))
    grid = (triton.cdiv(n, cfg.block_n),)
    kernel[grid](x, w, y, n, k, w.stride(0), *epilogue_pointers(x, scale, bias), *args,
                 BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NUM_STAGES=cfg.num_stages,
                 SCALED=scale is not None, HAS_BIAS=bias is not None, num_warps=cfg.num_warps,
                 **constexprs, **pdl(x, gemv=True))  # fmt: skip
    return y


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    config: GemvConfig | None = None,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ w.T`` for x [1, K] and w [N, K] of one dtype (last dims contiguous); returns [1, N].
    With ``scale``: w is e4m3 and the result ``(x @ w.T) * scale + bias``, as ``fp8_gemv``."""
    check_rows(x, "x", 2)
    check_weight(x, w, scale, bias)
    assert x.shape[0] == 1, f"gemv takes one row, got x {tuple(x.shape)}"
    assert x.shape[1] == w.shape[1], f"x {tuple(x.shape)} does not match w {tuple(w.shape)}"
    return _launch(_gemv_kernel, x, w, config, scale, bias)


def silu_gemv(
    h: torch.Tensor,
    w: torch.Tensor,
    config: GemvConfig | None = None,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``silu_and_mul(h) @ w.T`` for the gate_up output h [1, 2K] (gate then up) and w [N, K]
    of one dtype, without the [1, K] intermediate; returns [1, N]. ``scale``, ``bias``: as ``gemv``."""
    check_rows(h, "h", 2)
    check_weight(h, w, scale, bias)
    assert h.shape[0] == 1, f"silu_gemv takes one row, got h {tuple(h.shape)}"
    assert h.shape[1] == 2 * w.shape[1], (
        f"h {tuple(h.shape)} must be [1, 2 * {w.shape[1]}] for w {tuple(w.shape)}"
    )
    return _launch(_silu_gemv_kernel, h, w, config, scale, bias)


def add_rmsnorm_gemv(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    w: torch.Tensor,
    config: GemvConfig | None = None,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(residual + x) @ w.T, residual + x)`` for x, residual [1, K], the norm's weight [K]
    and w [N, K], all of one dtype: ``fused_add_rmsnorm`` then ``gemv``, bit for bit, without
    materialising the norm's output. ``residual`` is read only: the sum goes to a new tensor
    (returned). Without a residual it is ``(rmsnorm(x) @ w.T, x)``. ``scale``, ``bias``: as ``gemv``."""
    check_rows(x, "x", 2)
    check_weight(x, w, scale, bias)
    assert x.shape[0] == 1, f"add_rmsnorm_gemv takes one row, got x {tuple(x.shape)}"
    assert x.shape[1] == w.shape[1], f"x {tuple(x.shape)} does not match w {tuple(w.shape)}"
    assert norm_weight.shape == (w.shape[1],) and norm_weight.dtype == x.dtype, (
        "norm weight: [K] of x's dtype"
    )
    assert norm_weight.is_contiguous(), "norm weight must be contiguous"
    if residual is None:  # a valid pointer for the unread residual arguments
        y = _launch(_add_rmsnorm_gemv_kernel, x, w, config, scale, bias, x, x, norm_weight, eps,
                    HAS_RESIDUAL=False)  # fmt: skip
        return y, x
    check_rows(residual, "residual", 2, x.dtype)
    assert residual.shape == x.shape, f"residual {tuple(residual.shape)} != x {tuple(x.shape)}"
    summed = torch.empty_like(x)
    y = _launch(_add_rmsnorm_gemv_kernel, x, w, config, scale, bias, residual, summed, norm_weight, eps,
                HAS_RESIDUAL=True)  # fmt: skip
    return y, summed


def gemv_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float() @ w.float().T).to(x.dtype)
