"""SiLU of the gate times the up projection: the MLP's activation on a fused gate_up output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lightllm_grpc_kernels._launch import check_rows, on_gpu, pdl, wait_for_predecessor


@triton.jit
def silu_mul(gate, up):
    """``silu(gate) * up`` in the activation dtype, rounded as torch's two ops round (also the
    down-projection GEMV's prologue, ``gemv.silu_gemv``). No multiply here feeds an add, so
    FMA contraction cannot change it."""
    g = gate.to(tl.float32)
    # Round silu(gate) to the activation dtype before the product, as torch's two ops do.
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    return (act * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr, PDL: tl.constexpr = False
):
    wait_for_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, silu_mul(gate, up), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Returns ``silu(x[:, :I]) * x[:, I:]`` for x [T, 2I] (last dim contiguous) as [T, I]."""
    check_rows(x, "x", 2)
    n_rows, width = x.shape
    assert width % 2 == 0, f"x's last dim {width} must be even (gate and up halves)"
    inter = width // 2
    out = x.new_empty((n_rows, inter)) if out is None else out
    check_rows(out, "out", 2, x.dtype)
    assert out.shape == (n_rows, inter), f"out {tuple(out.shape)} != {(n_rows, inter)}"
    if n_rows == 0:
        return out
    # 1024 elements of 2 bytes per program gives 16-byte loads with 4 warps; the interpreter
    # prefers fewer, larger programs.
    block_size = 1024 if on_gpu(x) else 4096
    grid = (n_rows, triton.cdiv(inter, block_size))
    # No FMA contraction, so the rounding of silu(gate) before the product is kept.
    _silu_and_mul_kernel[grid](
        x, out, x.stride(0), out.stride(0), inter, BLOCK=block_size, enable_fp_fusion=False, **pdl(x)
    )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`silu_and_mul`."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
