"""The batch-1 decode fusions, timed as warm-up times them (needs CUDA).

``python -m lightllm_grpc.bench.fusions [--tp 1] [--only silu,norm]`` prints, per weight
shape of the 8B Llama-3 model at that tensor-parallel size (bf16, one token, inside CUDA
graphs, each weight read from HBM by rotating among copies, as warm-up tunes: ``layers/matmul_timing.py``):

- ``silu``: the down projection (``I/tp -> 4096``): the SiLU-and-mul kernel then cuBLAS, or
  then the GEMV kernel of each config, against ``silu_gemv`` of each config;
- ``norm``: qkv (``4096 -> 6144/tp``) and gate_up (``4096 -> 28672/tp``): the residual add +
  RMSNorm kernel then cuBLAS, or then the GEMV of each config, against ``add_rmsnorm_gemv``
  of each config (every program of which re-reads the 8 KB rows from L2);

and which one warm-up would bind (the fused GEMV only where it beats the best unfused pair by
the tuner's margin). The gain per step is the per-layer gain times the 32 layers.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from lightllm_grpc_kernels.gemv import GEMV_CONFIGS

from lightllm_grpc.layers import matmul_timing, triton_ops

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4096, 14336, 32, 8, 128, 32  # Llama-3 8B
MIN_GAIN = 0.01  # the tuners' default margin
DEVICE = "cuda"


def _us(ms: float) -> str:
    return f"{ms * 1e3:7.1f} us"


def _gbs(nbytes: int, ms: float) -> str:
    return f"{nbytes / ms / 1e9:5.2f} TB/s"


def bench_silu(tp: int) -> list[str]:
    """The down projection at ``tp``: every unfused pair and every fused config."""
    return _pairs("down", (HIDDEN, INTER // tp), tp, "SiLU", matmul_timing.time_silu_gemv)


def bench_norm(tp: int) -> list[str]:
    """qkv and gate_up at ``tp``, each after its add + RMSNorm: every unfused pair and fused config."""
    qkv = ((HEADS + 2 * KV_HEADS) * HEAD_DIM // tp, HIDDEN)
    gate_up = (2 * INTER // tp, HIDDEN)
    return [
        line
        for name, shape in (("qkv", qkv), ("gate_up", gate_up))
        for line in _pairs(name, shape, tp, "add+RMSNorm", matmul_timing.time_norm_gemv)
    ]


def _pairs(name: str, shape: tuple[int, int], tp: int, op: str, timer: Callable) -> list[str]:
    w = torch.randn(*shape, device=DEVICE, dtype=torch.bfloat16) / shape[1] ** 0.5
    nbytes = w.numel() * w.element_size()
    lines = [f"{name} {tuple(w.shape)} (TP={tp}), weight {nbytes / 1e6:.1f} MB"]
    configs = GEMV_CONFIGS
    (cublas_ms, *gemv_ms), fused = timer(
        w, [F.linear, *(triton_ops.gemv_matmul(c) for c in configs)], configs
    )
    for config, pair_ms, (ms, _) in zip(configs, gemv_ms, fused, strict=True):
        lines.append(f"  {config}: {op} + GEMV {_us(pair_ms)}   fused {_us(ms)} {_gbs(nbytes, ms)}")
    lines.append(f"  {op} + cuBLAS {_us(cublas_ms)} {_gbs(nbytes, cublas_ms)}")
    split = [(cublas_ms, f"{op} + cuBLAS")]
    split += [(t, f"{op} + GEMV {c}") for t, c in zip(gemv_ms, configs, strict=True)]
    return lines + _verdict(min(split), min(fused, key=lambda t: t[0]), nbytes)


def _verdict(split: tuple[float, str], fused: tuple[float, object], nbytes: int) -> list[str]:
    (split_ms, split_name), (fused_ms, fused_config) = split, fused
    wins = fused_ms < split_ms * (1 - MIN_GAIN)
    gain = (split_ms - fused_ms) * 1e3
    return [
        f"  best unfused: {split_name} {_us(split_ms)} {_gbs(nbytes, split_ms)}",
        f"  best fused:   {fused_config} {_us(fused_ms)} {_gbs(nbytes, fused_ms)}",
        f"  -> {'fused' if wins else 'unfused'}: {gain:+.1f} us per layer, {gain * LAYERS:+.0f} us per step"
        f" ({LAYERS} layers)",
    ]


BENCHES: dict[str, Callable[[int], list[str]]] = {"silu": bench_silu, "norm": bench_norm}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size whose per-rank shapes to time")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHES))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("the benchmark needs a CUDA device")
    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    unknown = set(names) - set(BENCHES)
    if unknown:
        p.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    print(f"{torch.cuda.get_device_name()}  bf16  one token, CUDA graphs, weights from HBM")
    for name in names:
        for line in BENCHES[name](args.tp):
            print(line, flush=True)


if __name__ == "__main__":
    main()
