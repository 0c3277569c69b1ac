"""Sizing the KV pool from the memory left after the weights (and, on GPU, activations)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from lightllm_grpc.config import DEFAULT_ROWS, LARGE_DEVICE_GIB, LARGE_DEVICE_ROWS

log = logging.getLogger(__name__)

# On CPU the pool takes at most this share of the memory that is free at start-up, and
# no more than CPU_MAX_BYTES: a CPU serves few tokens per second, so a huge pool only
# costs start-up time and memory.
CPU_MEMORY_FRACTION = 0.1
CPU_MAX_BYTES = 1 << 30
# Left free on GPU for the decode CUDA graphs' memory pool, kernel workspaces and fragmentation
# (the prefill graphs' share of the pool is measured: ``graph_profile``).
GPU_SLACK_BYTES = 1 << 30


def available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_max_rows(device: torch.device) -> int:
    """The row count a shard on ``device`` takes when ``--max-running-requests`` is not given."""
    if device.type != "cuda":
        return DEFAULT_ROWS
    large = torch.cuda.get_device_properties(device).total_memory >= LARGE_DEVICE_GIB << 30
    return LARGE_DEVICE_ROWS if large else DEFAULT_ROWS


def kv_capacity(
    device: torch.device,
    bytes_per_token: int,
    requested: int | None,
    upper_bound: int,
    gpu_memory_fraction: float,
    profile: Callable[[], None] | None = None,
    graph_profile: Callable[[], None] | None = None,
    decode_graph_bytes: int = 0,
) -> int:
    """Tokens the pool should hold: ``requested`` if given, else what memory allows.

    ``upper_bound`` (rows x context) caps the automatic size: more slots than every row
    could ever address would be dead weight. ``profile`` runs a largest-size forward
    pass on GPU so the peak activation memory is known before the pool is sized.
    ``graph_profile`` runs the largest graphed prefill or mixed step eagerly: its activation peak
    is about what the prefill and piecewise CUDA graphs' pool and buffers keep for good, beside
    (not inside) that peak. ``decode_graph_bytes`` is what the decode CUDA graphs will hold
    (``decode_graph_reserve``).
    """
    if requested is not None:
        return requested
    if device.type == "cuda":
        budget = _cuda_budget(device, gpu_memory_fraction, profile, graph_profile, decode_graph_bytes)
    else:
        budget = min(int(available_host_bytes() * CPU_MEMORY_FRACTION), CPU_MAX_BYTES)
    tokens = min(upper_bound, budget // bytes_per_token)
    if tokens < 16:
        raise MemoryError(
            f"only {budget / 2**20:.0f} MiB left for the KV cache ({tokens} tokens); "
            "lower --max-running-requests, raise --gpu-memory-fraction or use a smaller model"
        )
    return tokens


def _peak_extra(device: torch.device, run: Callable[[], None] | None) -> int:
    """Bytes ``run`` allocated at its peak beyond what was allocated before and after it."""
    if run is None:
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)


def _cuda_budget(
    device: torch.device,
    fraction: float,
    profile: Callable[[], None] | None,
    graph_profile: Callable[[], None] | None = None,
    decode_graph_bytes: int = 0,
) -> int:
    # Activations at the profiled peak must fit beside the pool, and so must the prefill
    # graphs' pool (its own memory: eager forwards cannot reuse it), plus some slack for the
    # decode graphs and the allocator's fragmentation.
    peak_extra = _peak_extra(device, profile)
    graph_bytes = _peak_extra(device, graph_profile)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free
    reserved = peak_extra + graph_bytes + decode_graph_bytes + GPU_SLACK_BYTES
    budget = int(total * fraction) - used_by_others - reserved
    log.info(
        "GPU memory: total %.1f GiB, in use %.1f GiB, activation peak %.2f GiB, prefill/piecewise graphs "
        "%.2f GiB, decode graphs %.2f GiB -> KV budget %.1f GiB",
        total / 2**30,
        used_by_others / 2**30,
        peak_extra / 2**30,
        graph_bytes / 2**30,
        decode_graph_bytes / 2**30,
        budget / 2**30,
    )
    return max(budget, 0)


def decode_graph_reserve(max_rows: int, vocab: int, dtype: torch.dtype) -> int:
    """The decode CUDA graphs' lasting memory, dominated by the logits: the fp32 buffer every
    graph writes (shard/cuda_graph.py) and, in the graphs' pool, the largest batch's logits in
    the model's dtype before the cast. The other activations of a decode step (a few MiB per
    row) fit in ``GPU_SLACK_BYTES``."""
    return max_rows * vocab * (4 + dtype.itemsize)
