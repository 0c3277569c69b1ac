"""Timings of the decode-sized matmuls and their fusions, for ``matmul_tuning`` (warm-up) and
``bench/fusions.py``.

Every timing runs inside CUDA graphs (``triton.testing.do_bench_cudagraph``) on rotating copies
of the weight: in decode each weight is read once per step from HBM, and a weight timed again
and again from L2 would look faster than it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from lightllm_grpc_kernels.activation import silu_and_mul
from lightllm_grpc_kernels.fp8_gemv import (
    FP8_GEMV_CONFIGS,
    FP8_GEMV_CONFIGS_ONE_TOKEN,
    Fp8GemvConfig,
    fp8_gemv,
)
from lightllm_grpc_kernels.gemv import GEMV_CONFIGS, GemvConfig, add_rmsnorm_gemv, gemv, silu_gemv
from lightllm_grpc_kernels.gemv_rows import GEMV_ROWS_CONFIGS, MAX_ROWS, gemv_rows
from lightllm_grpc_kernels.rmsnorm import fused_add_rmsnorm

from lightllm_grpc.layers.linear import Matmul

log = logging.getLogger(__name__)


def _rotating(w: torch.Tensor) -> Callable[[Callable[[torch.Tensor], object]], Callable[[], object]]:
    """``rotating(fn)``: a no-argument call of ``fn`` on the next of several copies of ``w``.

    In decode each weight is read once per step, from HBM: rotating among enough copies keeps
    the timed calls from being served from L2 (a weight smaller than L2 would look faster)."""
    nbytes = w.numel() * w.element_size()
    copies = [w] + [w.clone() for _ in range(min(7, (256 << 20) // nbytes))]
    turn = iter(range(1 << 30))

    def rotating(fn: Callable[[torch.Tensor], object]) -> Callable[[], object]:
        return lambda: fn(copies[next(turn) % len(copies)])

    return rotating


def time_silu_gemv(
    w: torch.Tensor,
    matmuls: Sequence[Matmul],
    configs: Sequence[GemvConfig] = GEMV_CONFIGS,
    scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[list[float], list[tuple[float, GemvConfig]]]:
    """At one token, in CUDA graphs, from HBM (rotating copies of ``w [N, I]``): the SiLU-and-mul
    kernel then each of ``matmuls``, and ``silu_gemv`` with each of ``configs``; returns
    ``([ms per matmul], [(ms, config)])``. An e4m3 ``w`` comes with its ``scale`` and the
    activations' ``dtype`` (default: w's). The warm-up's measurement, and the
    micro-benchmark's (``bench/fusions.py``)."""
    h = torch.randn(1, 2 * w.shape[1], device=w.device, dtype=dtype or w.dtype)

    def split(m: torch.Tensor, f: Matmul) -> object:
        return f(silu_and_mul(h), m, None)

    def fused(m: torch.Tensor, c: GemvConfig) -> object:
        return silu_gemv(h, m, c, scale)

    return _time_split_and_fused(w, split, fused, matmuls, configs)


def time_norm_gemv(
    w: torch.Tensor,
    matmuls: Sequence[Matmul],
    configs: Sequence[GemvConfig] = GEMV_CONFIGS,
    scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[list[float], list[tuple[float, GemvConfig]]]:
    """At one token, in CUDA graphs, from HBM (rotating copies of ``w [N, K]``): the residual
    add + RMSNorm kernel then each of ``matmuls``, and ``add_rmsnorm_gemv`` with each of
    ``configs``; returns ``([ms per matmul], [(ms, config)])``. ``scale``, ``dtype``: as
    ``time_silu_gemv``. The warm-up's measurement, and the micro-benchmark's (``bench/fusions.py``)."""
    act = dtype or w.dtype
    x, residual = (torch.randn(1, w.shape[1], device=w.device, dtype=act) for _ in range(2))
    norm_w = torch.ones(w.shape[1], device=w.device, dtype=act)

    def split(m: torch.Tensor, f: Matmul) -> object:
        return f(fused_add_rmsnorm(x, residual, norm_w, 1e-5), m, None)

    def fused(m: torch.Tensor, c: GemvConfig) -> object:
        return add_rmsnorm_gemv(x, residual, norm_w, 1e-5, m, c, scale)

    return _time_split_and_fused(w, split, fused, matmuls, configs)


def _time_split_and_fused(
    w: torch.Tensor,
    split: Callable[[torch.Tensor, Matmul], object],
    fused: Callable[[torch.Tensor, GemvConfig], object],
    matmuls: Sequence[Matmul],
    configs: Sequence[GemvConfig],
) -> tuple[list[float], list[tuple[float, GemvConfig]]]:
    """``split(copy, matmul)`` per matmul and ``fused(copy, config)`` per config, each timed in
    CUDA graphs on rotating copies of ``w``."""
    import triton.testing

    rotating = _rotating(w)
    bench = triton.testing.do_bench_cudagraph
    return (
        [bench(rotating(lambda m, f=f: split(m, f))) for f in matmuls],
        [(bench(rotating(lambda m, c=c: fused(m, c))), c) for c in configs],
    )


def time_gemv(w: torch.Tensor) -> tuple[float, float, GemvConfig]:
    """At one token: (cuBLAS ms, the GEMV kernel's best ms, its config) over ``GEMV_CONFIGS``."""
    import triton.testing

    rotating = _rotating(w)
    x = torch.randn(1, w.shape[1], device=w.device, dtype=w.dtype)
    cublas = triton.testing.do_bench_cudagraph(rotating(lambda m: F.linear(x, m)))
    timed = [
        (triton.testing.do_bench_cudagraph(rotating(lambda m, c=c: gemv(x, m, c))), c) for c in GEMV_CONFIGS
    ]
    best_ms, best = min(timed, key=lambda t: t[0])
    return cublas, best_ms, best


# tokens -> (ms of the alternative, [(ms, config) of each few-token GEMV candidate])
RowsTimings = dict[int, tuple[float, list[tuple[float, GemvConfig]]]]


def fp8_tiles(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, config: Fp8GemvConfig) -> torch.Tensor:
    """The W8A16 kernel with ``config``'s tiles: the alternative the few-token GEMV is timed
    against for an FP8 layer (``rows_timings``)."""
    return fp8_gemv(x, w, scale, None, config)


def rows_timings(
    w: torch.Tensor,
    alternative: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> RowsTimings:
    """``_time_rows`` at each of 2..``MAX_ROWS`` tokens of random activations (``dtype``: w's by
    default; an e4m3 ``w`` comes with its ``scale``)."""
    rotating = _rotating(w)
    return {
        m: _time_rows(
            w,
            torch.randn(m, w.shape[1], device=w.device, dtype=dtype or w.dtype),
            alternative,
            scale,
            rotating,
        )
        for m in range(2, MAX_ROWS + 1)
    }


def _time_rows(
    w: torch.Tensor,
    x: torch.Tensor,
    alternative: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scale: torch.Tensor | None,
    rotating: Callable[[Callable[[torch.Tensor], object]], Callable[[], object]],
) -> tuple[float, list[tuple[float, GemvConfig]]]:
    """``x``'s rows through ``alternative(x, w)`` (cuBLAS, or an FP8 layer's tl.dot tiles), and
    through each few-token GEMV tile (``scale``: w's, if e4m3) that gives its numbers (to bf16
    rounding and summation order; one that does not is logged and left out, so a kernel that
    is wrong on this GPU is never bound). Inside CUDA graphs, on ``rotating`` copies of ``w``."""
    import triton.testing

    base_ms = triton.testing.do_bench_cudagraph(rotating(lambda m: alternative(x, m)))
    ref = alternative(x, w).float()
    timed = []
    for c in GEMV_ROWS_CONFIGS:
        err = ((gemv_rows(x, w, c, scale).float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        if not err < 1e-2:
            log.error("few-token GEMV %s at %d tokens: relative error %.3g; not used", c, len(x), err)
            continue
        timed.append(
            (triton.testing.do_bench_cudagraph(rotating(lambda m, c=c: gemv_rows(x, m, c, scale))), c)
        )
    return base_ms, timed


def time_fp8_gemv(w: torch.Tensor, scale: torch.Tensor, tokens: int) -> list[tuple[float, Fp8GemvConfig]]:
    """(ms, config) of every W8A16 tile candidate for ``tokens`` rows of input (the one-token list
    includes the default tiles, ``FP8_GEMV_CONFIGS[0]``)."""
    import triton.testing

    configs = FP8_GEMV_CONFIGS_ONE_TOKEN if tokens == 1 else FP8_GEMV_CONFIGS
    rotating = _rotating(w)
    x = torch.randn(tokens, w.shape[1], device=w.device, dtype=torch.bfloat16)
    return [
        (triton.testing.do_bench_cudagraph(rotating(lambda m, c=c: fp8_gemv(x, m, scale, None, c))), c)
        for c in configs
    ]
