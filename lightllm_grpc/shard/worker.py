"""Builds a shard: device, model, KV pool and runner, from a ShardConfig and a rank."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lightllm_grpc.config import ShardConfig
from lightllm_grpc.layers.forward_batch import ForwardBatch
from lightllm_grpc.layers.ops import Ops
from lightllm_grpc.models.config import ModelConfig
from lightllm_grpc.models.llama import KVCacheSpec
from lightllm_grpc.models.loader import load_model, resolve_dtype
from lightllm_grpc.parallel import (
    ParallelState,
    build_custom_all_reduce,
    min_over_ranks,
    set_custom_all_reduce,
    set_parallel_state,
)
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.shard import memory
from lightllm_grpc.shard.grammar import GrammarCompiler, RowGrammars
from lightllm_grpc.shard.runner import ModelRunner
from lightllm_grpc.shard.sampler import Sampler

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
    kv_cache_dtype: str  # what the pool stores: "fp8_e4m3" or the model dtype's name
    model: torch.nn.Module | None = None
    cuda_graphs: bool = False
    graph_batch_sizes: tuple[int, ...] = ()
    prefill_graph_tokens: int = 0  # largest one-sequence prefill replayed from a CUDA graph (0: none)
    prefill_graph_sizes: tuple[int, ...] = ()
    mixed_graph_tokens: int = 0  # largest prefill or mixed step run as piecewise CUDA graphs (0: none)
    mixed_graph_sizes: tuple[int, ...] = ()
    grammar: GrammarCompiler | None = None
    ops: Ops = field(default_factory=Ops.native)  # what the model was built with (its warm-up hook)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, as Info reports dtypes."""
    return str(dtype).removeprefix("torch.")


def pick_device(requested: str, rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is visible")
    torch.cuda.set_device(rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def check_kv_cache_dtype(kv_cache_dtype: str, device: torch.device) -> None:
    """Triton converts to and from e4m3 on compute capability 8.9 (Ada, Hopper) and newer only."""
    if kv_cache_dtype != "fp8_e4m3" or device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(
            f"--kv-cache-dtype fp8_e4m3 needs a GPU of compute capability 8.9 or newer; {name} is "
            f"{capability[0]}.{capability[1]}"
        )


def init_distributed(rank: int, world_size: int, init_method: str | None, device: torch.device) -> None:
    set_parallel_state(ParallelState(rank, world_size))
    if world_size == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


def setup_all_reduce(
    cfg: ShardConfig, world_size: int, hidden: int, dtype: torch.dtype, device: torch.device, rows: int
) -> None:
    """Pick the all-reduce path (collective: every rank calls it) and log it. ``rows``: the most
    tokens of a forward the P2P kernels should serve (decode batch, graphed prefill)."""
    if world_size == 1:
        return
    custom = None
    if device.type != "cuda":
        line = "all-reduce: gloo (CPU)"
    elif not cfg.custom_all_reduce:
        line = "all-reduce: NCCL (--disable-custom-all-reduce)"
    else:
        # The largest decode or graphed-prefill message: one hidden-state row per token.
        custom, line = build_custom_all_reduce(
            rows * hidden * dtype.itemsize, dtype, device, barrier_free=cfg.fused_all_reduce
        )
    set_custom_all_reduce(custom)
    log.info("%s", line)


def prefill_step(row: int, num_tokens: int, capacity: int, first_slot: int = 0) -> shard_pb2.StepRequest:
    """A one-row prefill of ``num_tokens`` dummy tokens (warm-up and memory profiling), at slots
    from ``first_slot`` on (modulo ``capacity``)."""
    step = shard_pb2.StepRequest(step_id=0)
    step.admit.append(shard_pb2.RowSampling(row=row, top_k=-1, top_p=1.0, repetition_penalty=1.0))
    p = step.prefill
    p.rows.append(row)
    p.starts.append(0)
    p.lens.append(num_tokens)
    p.token_ids.extend([0] * num_tokens)
    p.slots.extend((first_slot + i) % capacity for i in range(num_tokens))
    p.prefix_lens.append(0)
    p.sample.append(True)
    return step


def prefill_graph_tokens(cfg: ShardConfig, max_context: int, device: torch.device) -> int:
    """The largest one-sequence prefill replayed from a CUDA graph; 0: none. The same on every
    rank (config only), as the ranks must capture the same graphs."""
    if not (cfg.cuda_graphs and device.type == "cuda"):
        return 0
    return min(cfg.cuda_graph_max_prefill_tokens, cfg.max_prefill_tokens, max_context)


def mixed_graph_tokens(cfg: ShardConfig, device: torch.device) -> int:
    """The largest prefill or mixed step run as piecewise CUDA graphs; 0: none. Config only, so
    the same on every rank. A step holds at most ``max_prefill_tokens`` prompt tokens beside a
    decode token per row."""
    if not (cfg.cuda_graphs and device.type == "cuda"):
        return 0
    return min(cfg.cuda_graph_max_mixed_tokens, cfg.max_prefill_tokens + cfg.max_rows)


def _profile_prefill(model, spec: KVCacheSpec, cfg: ShardConfig, max_context: int, dtype, device):
    """Run the largest forward pass on a scratch pool so its activation peak is measured.

    That is a mixed step: ``max_prefill_tokens`` prompt tokens beside a decode token for every
    row, in one pass. It is profiled as a prefill of as many tokens (the layers see the same
    ``[T, hidden]`` activations), cut into prompts no longer than the context allows.
    """

    def run() -> None:
        total = cfg.max_prefill_tokens + cfg.max_rows
        chunk = max(1, min(total, max_context - 1))
        rows = -(-total // chunk)
        kv = spec.make_cache(total + 1, dtype, device)
        runner = ModelRunner(
            lambda ids, b: model(ids, b, kv), kv, model.config.vocab_size, rows, chunk, device
        )
        step = shard_pb2.StepRequest(step_id=0)
        for row in range(rows):
            step.MergeFrom(prefill_step(row, min(chunk, total - row * chunk), total, first_slot=row * chunk))
        runner.step(step)  # the scratch pool is freed when this returns

    return run


def _profile_graphed(model, spec: KVCacheSpec, num_tokens: int, max_context: int, dtype, device):
    """Run a ``num_tokens`` prefill (in prompts no longer than the context allows) on a scratch
    pool of two slots (the tokens share them) so its activation peak is measured."""

    def run() -> None:
        chunk = max(1, min(num_tokens, max_context - 1))
        rows = -(-num_tokens // chunk)
        kv = spec.make_cache(2, dtype, device)
        runner = ModelRunner(
            lambda ids, b: model(ids, b, kv), kv, model.config.vocab_size, rows, chunk + 1, device
        )
        step = shard_pb2.StepRequest(step_id=0)
        for row in range(rows):
            step.MergeFrom(prefill_step(row, min(chunk, num_tokens - row * chunk), 1))
        runner.step(step)  # the scratch pool is freed on return

    return run


# The frontend's limit on top logprobs (server.request_builder.MAX_TOP_LOGPROBS).
PROFILE_TOP_LOGPROBS = 20


def profile_row(row: int) -> shard_pb2.RowSampling:
    """A row with every sampling option on: what a step may cost the sampler at most."""
    return shard_pb2.RowSampling(
        row=row, temperature=1.0, top_k=50, top_p=0.9, min_p=0.05,
        repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5, penalty_prompt_ids=[0],
        min_new_tokens=1, suppress_ids=[1], logit_bias_ids=[2], logit_bias_values=[1.0],
        logprobs=True, top_logprobs=PROFILE_TOP_LOGPROBS,
    )  # fmt: skip


def profile_sampling(
    sampler: Sampler, rows: int, vocab: int, dtype: torch.dtype, device: torch.device
) -> None:
    """Sample a full decode batch with every option on, so its float32 logits (cast from the
    model's dtype, as the LM head does) and the sampler's temporaries are in the profiled peak."""
    batch = np.arange(rows)
    for row in batch.tolist():
        sampler.admit(profile_row(row))
    logits = torch.randn(rows, vocab, device=device).to(dtype).float()
    sampler.sample(logits, batch)
    del logits
    for row in batch.tolist():
        sampler.release(row)


def build_shard(cfg: ShardConfig, rank: int, world_size: int, init_method: str | None) -> Shard:
    started = time.perf_counter()
    device = pick_device(cfg.device, rank)
    check_kv_cache_dtype(cfg.kv_cache_dtype, device)
    init_distributed(rank, world_size, init_method, device)
    if cfg.max_rows is None:
        # Collective: every rank must capture the same decode graphs, so all take the
        # smallest card's choice.
        cfg = replace(cfg, max_rows=min_over_ranks(memory.default_max_rows(device), device))
    model_cfg = ModelConfig.from_pretrained(cfg.model)
    dtype = resolve_dtype(model_cfg, cfg.dtype, device)
    max_context = min(cfg.max_context or model_cfg.max_position_embeddings, model_cfg.max_position_embeddings)
    graph_tokens = prefill_graph_tokens(cfg, max_context, device)
    mixed_tokens = mixed_graph_tokens(cfg, device)
    # Before the KV pool is sized: the symmetric buffer's memory is then already counted.
    setup_all_reduce(cfg, world_size, model_cfg.hidden_size, dtype, device, max(cfg.max_rows, graph_tokens))
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
        kv_cache_dtype=cfg.kv_cache_dtype,
        progress=rank == 0,  # one bar, not one per TP rank
    )
    spec = model.kv_cache_spec
    bpt = spec.bytes_per_token(dtype)  # 1 byte an element with an FP8 cache: twice the tokens
    kv_dtype = "fp8_e4m3" if spec.fp8 else dtype_name(dtype)
    # Built before the pool is sized: its penalty-count table is memory the pool cannot use.
    grammar = GrammarCompiler(cfg.model, model_cfg.vocab_size, tuple(model_cfg.eos_token_ids))
    grammars = RowGrammars(grammar, cfg.max_rows + 1, model_cfg.vocab_size, device)
    sampler = Sampler(cfg.max_rows + 1, model_cfg.vocab_size, device, grammars=grammars)
    profile = graph_profile = None
    if device.type == "cuda":
        prefill = _profile_prefill(model, spec, cfg, max_context, dtype, device)

        def profile() -> None:
            prefill()
            profile_sampling(sampler, cfg.max_rows, model_cfg.vocab_size, dtype, device)

        # What the prefill and piecewise graphs' pool and buffers will hold: about the largest
        # bucket's activations of one layer, which an eager forward of that bucket peaks at.
        if graph_tokens or mixed_tokens:
            graph_profile = _profile_graphed(
                model, spec, max(graph_tokens, mixed_tokens), max_context, dtype, device
            )

    use_graphs = cfg.cuda_graphs and device.type == "cuda"
    graphs_bytes = memory.decode_graph_reserve(cfg.max_rows, model_cfg.vocab_size, dtype) if use_graphs else 0
    capacity = memory.kv_capacity(
        device, bpt, cfg.max_total_tokens, cfg.max_rows * max_context, cfg.gpu_memory_fraction, profile,
        graph_profile, graphs_bytes,
    )  # fmt: skip
    kv = spec.make_cache(capacity + 1, dtype, device)  # + the padding slot

    def forward(ids: torch.Tensor, batch: ForwardBatch, logits_out: Tensor | None = None) -> Tensor:
        return model(ids, batch, kv, logits_out)

    runner = ModelRunner(forward, kv, model_cfg.vocab_size, cfg.max_rows, max_context, device, sampler)
    log.info(
        "shard %d/%d ready in %.1fs: %s on %s (%s%s), KV pool %d tokens (%.1f GiB, %s)",
        rank, world_size, time.perf_counter() - started, model_cfg.name, device, dtype,
        ", FP8 linear layers" if model.config.quantization else "", capacity, capacity * bpt / 2**30,
        kv_dtype,
    )  # fmt: skip
    return Shard(
        rank, world_size, device, dtype, model_cfg, runner, bpt, kv_dtype,
        model=model, cuda_graphs=use_graphs, grammar=grammar, ops=model.ops,
        prefill_graph_tokens=graph_tokens, mixed_graph_tokens=mixed_tokens,
    )  # fmt: skip
