"""Builds a shard: device, model, KV pool and runner, from a ShardConfig and a rank."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightllm_grpc.config import ShardConfig
from lightllm_grpc.layers.attention.base import AttentionBackend
from lightllm_grpc.models.config import ModelConfig
from lightllm_grpc.models.forward_batch import ForwardBatch
from lightllm_grpc.models.loader import load_model, resolve_dtype
from lightllm_grpc.parallel import ParallelState, set_parallel_state
from lightllm_grpc.shard import memory
from lightllm_grpc.shard.runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass
class Shard:
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    model_config: ModelConfig
    runner: ModelRunner
    kv_bytes_per_token: int
    graph_batch_sizes: tuple[int, ...] = ()


def pick_device(requested: str, rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is visible")
    torch.cuda.set_device(rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def init_distributed(rank: int, world_size: int, init_method: str | None, device: torch.device) -> None:
    set_parallel_state(ParallelState(rank, world_size))
    if world_size == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


def attention_backend(
    device: torch.device, cfg: ShardConfig, num_heads: int, head_dim: int, dtype: torch.dtype
) -> AttentionBackend:
    if device.type == "cuda":
        from lightllm_grpc.layers.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(cfg.max_rows, num_heads, head_dim, device, dtype)
    from lightllm_grpc.layers.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()


def build_shard(cfg: ShardConfig, rank: int, world_size: int, init_method: str | None) -> Shard:
    started = time.perf_counter()
    device = pick_device(cfg.device, rank)
    init_distributed(rank, world_size, init_method, device)
    model_cfg = ModelConfig.from_pretrained(cfg.model)
    dtype = resolve_dtype(model_cfg, cfg.dtype, device)
    heads = model_cfg.num_heads // world_size
    backend = attention_backend(device, cfg, heads, model_cfg.head_dim, dtype)
    model = load_model(
        cfg.model, device=device, dtype=dtype, attn_backend=backend, load_format=cfg.load_format
    )
    max_context = min(cfg.max_context or model_cfg.max_position_embeddings, model_cfg.max_position_embeddings)
    spec = model.kv_cache_spec
    bpt = spec.bytes_per_token(dtype)
    capacity = memory.kv_capacity(
        device, bpt, cfg.max_total_tokens, cfg.max_rows * max_context, cfg.gpu_memory_fraction
    )
    kv = spec.make_cache(capacity, dtype, device)

    def forward(ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return model(ids, batch, kv)

    runner = ModelRunner(forward, kv, model_cfg.vocab_size, cfg.max_rows, max_context, device)
    log.info(
        "shard %d/%d ready in %.1fs: %s on %s (%s), KV pool %d tokens (%.1f MiB)",
        rank,
        world_size,
        time.perf_counter() - started,
        model_cfg.name,
        device,
        dtype,
        capacity,
        capacity * bpt / 2**20,
    )
    return Shard(rank, world_size, device, dtype, model_cfg, runner, bpt)
