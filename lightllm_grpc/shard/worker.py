"""Builds a shard: device, model, KV pool and runner, from a ShardConfig and a rank."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lightllm_grpc.config import ShardConfig
from lightllm_grpc.layers.forward_batch import ForwardBatch
from lightllm_grpc.layers.ops import Ops
from lightllm_grpc.models.config import ModelConfig
from lightllm_grpc.models.llama import KVCacheSpec
from lightllm_grpc.models.loader import load_model, resolve_dtype
from lightllm_grpc.parallel import ParallelState, set_parallel_state
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.shard import memory
from lightllm_grpc.shard.grammar import GrammarCompiler
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
    model: torch.nn.Module | None = None
    cuda_graphs: bool = False
    graph_batch_sizes: tuple[int, ...] = ()
    grammar: GrammarCompiler | None = None
    ops: Ops = field(default_factory=Ops.native)  # what the model was built with (its warm-up hook)


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


def prefill_step(row: int, num_tokens: int, capacity: int) -> shard_pb2.StepRequest:
    """A one-row prefill of ``num_tokens`` dummy tokens (warm-up and memory profiling)."""
    step = shard_pb2.StepRequest(step_id=0)
    step.admit.append(shard_pb2.RowSampling(row=row, top_k=-1, top_p=1.0, repetition_penalty=1.0))
    p = step.prefill
    p.rows.append(row)
    p.starts.append(0)
    p.lens.append(num_tokens)
    p.token_ids.extend([0] * num_tokens)
    p.slots.extend(i % capacity for i in range(num_tokens))
    p.prefix_lens.append(0)
    p.sample.append(True)
    return step


def _profile_prefill(model, spec: KVCacheSpec, cfg: ShardConfig, max_context: int, dtype, device):
    """Run the largest prefill on a scratch pool so its activation peak is measured."""

    def run() -> None:
        n = max(1, min(cfg.max_prefill_tokens, max_context - 1))
        kv = spec.make_cache(n + 1, dtype, device)
        runner = ModelRunner(lambda ids, b: model(ids, b, kv), kv, model.config.vocab_size, 1, n + 1, device)
        runner.step(prefill_step(0, n, n))  # the scratch pool is freed when this returns

    return run


def build_shard(cfg: ShardConfig, rank: int, world_size: int, init_method: str | None) -> Shard:
    started = time.perf_counter()
    device = pick_device(cfg.device, rank)
    init_distributed(rank, world_size, init_method, device)
    model_cfg = ModelConfig.from_pretrained(cfg.model)
    dtype = resolve_dtype(model_cfg, cfg.dtype, device)
    ops = Ops.for_device(device)  # Triton kernels on CUDA, torch on CPU: every layer and attention
    # + 1 row: the runner's padding row for CUDA-graph batches.
    backend = ops.attention(
        cfg.max_rows + 1, model_cfg.num_heads // world_size, model_cfg.head_dim, device, dtype
    )
    model = load_model(
        cfg.model,
        device=device,
        dtype=dtype,
        attn_backend=backend,
        ops=ops,
        load_format=cfg.load_format,
        quantization=cfg.quantization,
        progress=rank == 0,  # one bar, not one per TP rank
    )
    max_context = min(cfg.max_context or model_cfg.max_position_embeddings, model_cfg.max_position_embeddings)
    spec = model.kv_cache_spec
    bpt = spec.bytes_per_token(dtype)
    profile = (
        _profile_prefill(model, spec, cfg, max_context, dtype, device) if device.type == "cuda" else None
    )
    capacity = memory.kv_capacity(
        device, bpt, cfg.max_total_tokens, cfg.max_rows * max_context, cfg.gpu_memory_fraction, profile
    )
    kv = spec.make_cache(capacity + 1, dtype, device)  # + the padding slot

    def forward(ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return model(ids, batch, kv)

    grammar = GrammarCompiler(cfg.model, model_cfg.vocab_size, tuple(model_cfg.eos_token_ids))
    runner = ModelRunner(forward, kv, model_cfg.vocab_size, cfg.max_rows, max_context, device, grammar)
    log.info(
        "shard %d/%d ready in %.1fs: %s on %s (%s%s), KV pool %d tokens (%.1f GiB)",
        rank, world_size, time.perf_counter() - started, model_cfg.name, device, dtype,
        ", FP8 linear layers" if model.config.quantization else "", capacity, capacity * bpt / 2**30,
    )  # fmt: skip
    use_graphs = cfg.cuda_graphs and device.type == "cuda"
    return Shard(
        rank, world_size, device, dtype, model_cfg, runner, bpt,
        model=model, cuda_graphs=use_graphs, grammar=grammar, ops=model.ops,
    )  # fmt: skip
