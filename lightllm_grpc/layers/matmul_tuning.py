"""Warm-up's choice of decode-sized matmuls (the Triton ops' ``tune`` hook, ``tune_matmuls``).

``tune_matmuls`` times the decode-sized matmuls per weight shape and binds the winners into each
layer of that shape: ``tune_gemv`` the GEMV kernel or cuBLAS for one-token inputs of unquantized
layers; ``tune_silu_gemv`` the GEMV with SiLU-and-mul folded into its loads for the down
projections where that beats the activation kernel followed by the layer's matmul;
``tune_norm_gemv`` the GEMV with the residual add + RMSNorm folded into its loads for qkv and
gate_up (the decoder's ``AddNormLinear`` steps) where that beats the norm kernel followed by the
matmul; ``tune_gemv_rows`` which of 2..4 tokens go through the few-token GEMV (``gemv_rows``)
rather than cuBLAS; ``tune_fp8_gemv`` the W8A16 kernel's tiles (for one token and for 2..16) of
FP8 layers, and which of 2..4 tokens go through the few-token GEMV instead. The two fusions run
once for the unquantized layers and once for the FP8 ones (weight-only at one token: the same
GEMV kernels read the e4m3 weight and apply its scales). The timings: ``matmul_timing``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from lightllm_grpc_kernels.fp8_gemv import (
    FP8_GEMV_CONFIGS,
    FP8_GEMV_CONFIGS_ONE_TOKEN,
    Fp8GemvConfig,
)
from lightllm_grpc_kernels.gemv import GemvConfig
from lightllm_grpc_kernels.gemv_rows import MAX_ROWS, RowsConfigs, rows_config
from torch import nn

from lightllm_grpc.layers.activation import ActIntoDown
from lightllm_grpc.layers.embedding import ParallelLMHead
from lightllm_grpc.layers.fp8 import (
    W8A16_MAX_M,
    Fp8Matmul,
    fp8_cuda_gemm,
    fp8_linear_cuda,
    fp8_linear_ref,
    is_fp8,
)
from lightllm_grpc.layers.fp8_act_quant import tune_fp8_act_quant
from lightllm_grpc.layers.linear import ColumnParallelLinear, LinearBase, Matmul
from lightllm_grpc.layers.matmul_timing import (
    RowsTimings,
    fp8_tiles,
    rows_timings,
    time_fp8_gemv,
    time_gemv,
    time_norm_gemv,
    time_silu_gemv,
)
from lightllm_grpc.layers.norm import AddNormLinear, norm_then_linear
from lightllm_grpc.layers.triton_ops import (
    GemvMatmul,
    SiluGemvMatmul,
    gemv_matmul,
    norm_gemv_step,
    silu_gemv_matmul,
)

log = logging.getLogger(__name__)

# (weight, split matmuls, GEMV configs) -> ([ms per split matmul], [(ms, config)]): the timing of a
# small op folded into the GEMV against the op then each matmul (time_silu_gemv, time_norm_gemv).
FusedTiming = Callable[..., tuple[list[float], list[tuple[float, GemvConfig]]]]


def _unquantized(layer: nn.Module) -> bool:
    """Multiplies an unquantized weight: cuBLAS, or the GEMV kernel warm-up chose."""
    return layer.matmul is F.linear or isinstance(layer.matmul, GemvMatmul)


def _fp8_on_gpu(layer: nn.Module) -> bool:
    """An FP8 layer on the Hopper path (weight-only GEMV at one token), not the reference matmul."""
    return isinstance(layer.matmul, Fp8Matmul) and layer.matmul.gemm is not fp8_linear_ref


def _gemv_kind(layer: nn.Module, fp8: bool) -> bool:
    """Whether ``layer``'s one-token matmul is the GEMV kind a fusion of that kind may replace."""
    return _fp8_on_gpu(layer) if fp8 else _unquantized(layer)


def _cublas_layers(model: nn.Module) -> list[LinearBase | ParallelLMHead]:
    """Layers that multiply with cuBLAS (not quantized ones); a head tied to the embedding is left
    out, as the embedding's weight is never tuned."""
    return [m for m in _tunable_layers(model) if m.matmul is F.linear]


def _tunable_layers(model: nn.Module) -> list[LinearBase | ParallelLMHead]:
    """The linear layers and LM head whose matmul warm-up may rebind; not a head tied to the
    embedding (the embedding's weight is never tuned)."""
    params = dict(model.named_parameters())  # a tied head's weight appears once, as the embedding
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, (LinearBase, ParallelLMHead)) and f"{name}.weight" in params
    ]


def tune_gemv(model: nn.Module, min_gain: float = 0.03) -> dict[tuple[int, int], GemvConfig]:
    """For each weight shape of ``model``'s cuBLAS layers, time cuBLAS and the GEMV kernel at one
    token (inside CUDA graphs, as decode runs); where the kernel is faster by ``min_gain``, bind
    it into every layer of that shape (``use_gemv``). Returns the chosen configs by shape."""
    weights = {tuple(m.weight.shape): m.weight for m in _cublas_layers(model)}
    chosen: dict[tuple[int, int], GemvConfig] = {}
    for shape, w in sorted(weights.items()):
        cublas_ms, best_ms, best = time_gemv(w)
        nbytes = w.numel() * w.element_size()
        if best_ms < cublas_ms * (1 - min_gain):
            chosen[shape] = best
        log.info(
            "weight %s at one token: cuBLAS %.1f us (%.2f TB/s), GEMV kernel %.1f us (%.2f TB/s) -> %s",
            shape, cublas_ms * 1e3, nbytes / cublas_ms / 1e9, best_ms * 1e3, nbytes / best_ms / 1e9,
            f"kernel {best}" if shape in chosen else "cuBLAS",
        )  # fmt: skip
    use_gemv(model, chosen)
    torch.cuda.empty_cache()  # the weight copies must not stay cached outside the graphs' pool
    return chosen


def use_gemv(model: nn.Module, configs: dict[tuple[int, int], GemvConfig]) -> int:
    """Bind ``gemv_matmul(configs[shape])`` into each cuBLAS layer of ``model`` whose weight has a
    shape in ``configs``; returns how many layers changed. Touches no other model."""
    changed = 0
    for layer in _cublas_layers(model):
        config = configs.get(tuple(layer.weight.shape))
        if config is not None:
            layer.matmul = gemv_matmul(config)
            changed += 1
    return changed


def tune_gemv_rows(model: nn.Module, min_gain: float = 0.03) -> dict[tuple[int, int], RowsConfigs]:
    """For each weight shape of ``model``'s unquantized layers (cuBLAS or ``tune_gemv``'s GEMV
    at one token), time cuBLAS and the few-token GEMV at each of 2..``MAX_ROWS`` tokens (inside
    CUDA graphs); bind the GEMV for the counts where it is faster by ``min_gain`` into every
    layer of that shape, beside its one-token choice. Returns the bound counts' configs by shape."""
    layers = [m for m in _tunable_layers(model) if _unquantized(m)]
    weights = {tuple(m.weight.shape): m.weight for m in layers}
    chosen: dict[tuple[int, int], RowsConfigs] = {}
    for shape, w in sorted(weights.items()):
        timed = rows_timings(w, F.linear)
        rows = pick_gemv_rows(timed, min_gain)
        if rows:
            chosen[shape] = rows
        log.info("weight %s at 2..%d tokens: %s", shape, MAX_ROWS, _describe_rows(timed, rows, "cuBLAS"))
    for layer in layers:
        rows = chosen.get(tuple(layer.weight.shape))
        if rows:  # the layer's matmul is cuBLAS (no config) or a GemvMatmul (_unquantized)
            layer.matmul = gemv_matmul(getattr(layer.matmul, "config", None), rows)
    torch.cuda.empty_cache()
    return chosen


def tune_matmuls(model: nn.Module, fuse: bool = True) -> None:
    """The warm-up hook of the Triton ops: ``tune_gemv``, ``tune_gemv_rows`` and
    ``tune_fp8_gemv``, then (unless ``fuse`` is False, as the decode profile's baseline asks)
    ``tune_silu_gemv`` and ``tune_norm_gemv`` for the unquantized layers, then for the FP8 ones
    (each fusion is timed at one token against the matmul the first three bound), and last
    ``tune_fp8_act_quant``: FP8 layers past ``W8A16_MAX_M`` tokens take their activation
    quantized by the norm kernel, and from a timed token count by the SiLU-and-mul kernel
    (it changes no number)."""
    tune_gemv(model)
    tune_gemv_rows(model)
    tune_fp8_gemv(model)
    if fuse:
        for fp8 in (False, True):
            tune_silu_gemv(model, fp8=fp8)
            tune_norm_gemv(model, fp8=fp8)
        if changed := tune_fp8_act_quant(model):
            log.info("FP8 layers that take their activation quantized by the kernel making it: %d", changed)


def tune_silu_gemv(
    model: nn.Module, min_gain: float = 0.01, fp8: bool = False
) -> dict[tuple[int, int], GemvConfig]:
    """For each down-projection weight shape of ``model``'s gated MLPs (``ActIntoDown``, with an
    unquantized down projection, or with ``fp8`` an FP8 one), time at one token, inside CUDA
    graphs, the activation kernel followed by the layer's matmul as bound now (after
    ``tune_gemv`` / ``tune_fp8_gemv``) against the GEMV with SiLU-and-mul folded in, per config;
    where the fused one is faster by ``min_gain``, bind it into every such MLP of that shape
    (``fuse_act_into_down``). Returns the chosen configs."""
    mlps = [m for m in model.modules() if isinstance(m, ActIntoDown) and _gemv_kind(m.down_proj, fp8)]
    what = "down %s at one token: SiLU kernel"
    chosen = _fused_wins([m.down_proj for m in mlps], time_silu_gemv, what, "separate SiLU", min_gain, fp8)
    use_silu_gemv(model, chosen, fp8)
    torch.cuda.empty_cache()
    return chosen


def use_silu_gemv(model: nn.Module, configs: dict[tuple[int, int], GemvConfig], fp8: bool = False) -> int:
    """Fold SiLU-and-mul into the down projection of each of ``model``'s gated MLPs with an
    unquantized (``fp8``: FP8) down weight of a shape in ``configs``: ``silu_gemv_matmul(config)``,
    or for FP8 a ``SiluGemvMatmul`` with the layer's scale and its matmul for more tokens.
    Returns how many changed."""
    changed = 0
    for m in model.modules():
        if isinstance(m, ActIntoDown) and _gemv_kind(m.down_proj, fp8):
            down = m.down_proj
            config = configs.get(tuple(down.weight.shape))
            if config is None:
                continue
            if fp8:
                m.fuse_act_into_down(SiluGemvMatmul(config, down.weight_scale, down.matmul))
            else:  # more tokens keep the layer's matmul (the few-token GEMV where tune_gemv_rows bound it)
                m.fuse_act_into_down(silu_gemv_matmul(config, down.matmul))
            changed += 1
    return changed


def tune_norm_gemv(
    model: nn.Module, min_gain: float = 0.01, fp8: bool = False
) -> dict[tuple[int, int], GemvConfig]:
    """For each weight shape of the projections ``model``'s decoder norms feed (``AddNormLinear``
    with an unquantized, or with ``fp8`` an FP8, column-parallel linear: qkv and gate_up), time
    at one token, inside CUDA graphs, the add + RMSNorm kernel followed by the layer's matmul
    as bound now (after ``tune_gemv`` / ``tune_fp8_gemv``) against ``add_rmsnorm_gemv`` per
    config; where the fused one is faster by ``min_gain``, bind it into every such step of that
    shape. Returns the chosen configs."""
    pairs = [m for m in model.modules() if isinstance(m, AddNormLinear) and _norm_fusable(m, fp8)]
    linears = [m.pair[1] for m in pairs]
    what = "%s after its norm at one token: add+RMSNorm kernel"
    chosen = _fused_wins(linears, time_norm_gemv, what, "separate norm", min_gain, fp8)
    use_norm_gemv(model, chosen, fp8)
    torch.cuda.empty_cache()
    return chosen


def use_norm_gemv(model: nn.Module, configs: dict[tuple[int, int], GemvConfig], fp8: bool = False) -> int:
    """Bind ``norm_gemv_step(configs[shape], fp8)`` into each of ``model``'s ``AddNormLinear``
    steps whose column-parallel linear (unquantized, or ``fp8``) has a shape in ``configs``;
    returns how many changed."""
    changed = 0
    for m in model.modules():
        if isinstance(m, AddNormLinear) and _norm_fusable(m, fp8):
            config = configs.get(tuple(m.pair[1].weight.shape))
            if config is not None:
                m.step = norm_gemv_step(config, fp8)
                changed += 1
    return changed


def _fused_wins(
    linears: Sequence[LinearBase],
    time_fused: FusedTiming,
    what: str,
    separate: str,
    min_gain: float,
    fp8: bool = False,
) -> dict[tuple[int, int], GemvConfig]:
    """Per weight shape of ``linears``: ``time_fused`` (``time_silu_gemv`` or ``time_norm_gemv``)
    times the small op followed by the layer's matmul as bound now against the fused GEMV per
    config (``fp8``: the W8A16 kernel's one-token tiles, the weight's scales, activations in
    the model dtype); the fused one's fastest config where it wins by ``min_gain``, by shape.
    ``what`` (with the shape for %s) and ``separate`` name the two in the log line."""
    shapes = {tuple(linear.weight.shape): linear for linear in linears}
    chosen: dict[tuple[int, int], GemvConfig] = {}
    for shape, linear in sorted(shapes.items()):
        if fp8:
            timings = time_fused(
                linear.weight, [linear.matmul], FP8_GEMV_CONFIGS_ONE_TOKEN, linear.weight_scale,
                linear.dense_dtype,
            )  # fmt: skip
        else:
            timings = time_fused(linear.weight, [linear.matmul])
        (split_ms,), timed = timings
        best_ms, best = min(timed, key=lambda t: t[0])
        if best_ms < split_ms * (1 - min_gain):
            chosen[shape] = best
        log.info(
            what + " + %s %.1f us, fused GEMV %.1f us -> %s",
            shape, _name(linear.matmul), split_ms * 1e3, best_ms * 1e3,
            f"fused {best}" if shape in chosen else separate,
        )  # fmt: skip
    return chosen


def _norm_fusable(step: AddNormLinear, fp8: bool = False) -> bool:
    linear = step.pair[1]
    return (
        step.step is norm_then_linear and isinstance(linear, ColumnParallelLinear) and _gemv_kind(linear, fp8)
    )


def _name(matmul: Matmul) -> str:
    if matmul is F.linear:
        return "cuBLAS"
    if isinstance(matmul, Fp8Matmul):
        return "W8A16 GEMV (tune_fp8_gemv's tiles)"
    if isinstance(matmul, GemvMatmul) and matmul.config is None:  # the GEMV only for 2..4 tokens
        return "cuBLAS"
    return f"GEMV {getattr(matmul, 'config', matmul)}"


# What tune_fp8_gemv binds per weight shape: tiles for one token and for 2..16 (tl.dot), and the
# few-token GEMV's tiles for the token counts where it was faster (gemv_rows.RowsConfigs).
Fp8Choice = tuple[Fp8GemvConfig, Fp8GemvConfig, RowsConfigs]


def tune_fp8_gemv(model: nn.Module) -> dict[tuple[int, int], Fp8Choice]:
    """For each weight shape of ``model``'s FP8 layers on the Hopper path, time the W8A16
    kernel's tile configs at one token and at ``W8A16_MAX_M`` tokens (inside CUDA graphs), and
    the few-token GEMV against the chosen ``tl.dot`` tiles at each of 2..``MAX_ROWS`` tokens
    (``pick_gemv_rows``); bind the choices into every layer of that shape. Returns them by shape."""
    layers = [m for m in model.modules() if is_fp8(m) and _untuned_fp8(m.matmul)]
    weights = {tuple(m.weight.shape): (m.weight, m.weight_scale) for m in layers}
    chosen: dict[tuple[int, int], Fp8Choice] = {}
    for shape, (w, scale) in sorted(weights.items()):
        one_timed, few_timed = (time_fp8_gemv(w, scale, m) for m in (1, W8A16_MAX_M))
        (one_ms, one), (few_ms, few) = (min(timed, key=lambda t: t[0]) for timed in (one_timed, few_timed))
        default_ms = {c: t for t, c in one_timed}[FP8_GEMV_CONFIGS[0]]
        tiles = functools.partial(fp8_tiles, scale=scale, config=few)
        rows_timed = rows_timings(w, tiles, scale, torch.bfloat16)
        rows = pick_gemv_rows(rows_timed)
        chosen[shape] = (one, few, rows)
        log.info(
            "FP8 weight %s: one token %.1f us (%.2f TB/s; default tiles %.1f us) with %s; "
            "%d tokens %.1f us with %s; few-token GEMV %s",
            shape, one_ms * 1e3, w.numel() / one_ms / 1e9, default_ms * 1e3, one,
            W8A16_MAX_M, few_ms * 1e3, few, _describe_rows(rows_timed, rows, "tl.dot"),
        )  # fmt: skip
    for m in layers:
        m.matmul = dataclasses.replace(m.matmul, gemm=fp8_cuda_gemm(*chosen[tuple(m.weight.shape)]))
    torch.cuda.empty_cache()
    return chosen


def pick_gemv_rows(timed: RowsTimings, min_gain: float = 0.0) -> RowsConfigs:
    """Per token count of ``timed`` (2, 3, ...): the few-token GEMV's fastest tiles where they beat
    the alternative by ``min_gain``, else None; trailing Nones dropped (``()``: never)."""
    rows = []
    for m in range(2, 2 + len(timed)):
        base_ms, candidates = timed[m]
        best_ms, best = min(candidates, key=lambda t: t[0], default=(float("inf"), None))
        rows.append(best if best_ms < base_ms * (1 - min_gain) else None)
    while rows and rows[-1] is None:
        rows.pop()
    return tuple(rows)


def _describe_rows(timed: RowsTimings, rows: RowsConfigs, base: str) -> str:
    def count(m: int, base_ms: float, candidates: list[tuple[float, GemvConfig]]) -> str:
        if not candidates:
            return f"{m} tokens: no tile gave {base}'s numbers"
        config = rows_config(rows, m)
        took = f"GEMV {config}" if config else base
        best_ms = min(t for t, _ in candidates)
        return f"{m} tokens {best_ms * 1e3:.1f} vs {base} {base_ms * 1e3:.1f} us -> {took}"

    return "; ".join(count(m, *timed[m]) for m in sorted(timed))


def _untuned_fp8(matmul: object) -> bool:
    return isinstance(matmul, Fp8Matmul) and matmul.gemm is fp8_linear_cuda
