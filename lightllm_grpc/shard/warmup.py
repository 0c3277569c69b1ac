"""Start-up forward passes at the largest shapes the coordinator will send.

They compile kernels and fill the allocator's pools, then (on GPU) capture the decode
CUDA graphs and, in their memory pool, the piecewise ones (prefill and mixed steps) and the
one-prompt prefill ones, and last run short mixed steps for the decode attention launches no
graph compiled, so the first real request pays for none of that. Every TP rank runs the same
passes and captures in the same order. Compiles after warm-up are logged as
warnings (shard/compile_watch.py): each one stalled a live step.
"""

from __future__ import annotations

from lightllm_grpc_kernels.decode_attention import decode_num_splits

from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.shard import compile_watch
from lightllm_grpc.shard.cuda_graph import CudaGraphDecoder
from lightllm_grpc.shard.piecewise_graph import PiecewiseCudaGraphs
from lightllm_grpc.shard.prefill_graph import CudaGraphPrefill
from lightllm_grpc.shard.runner import ModelRunner
from lightllm_grpc.shard.worker import Shard, prefill_step, profile_row

SHORT_PREFILL = 16


def warmup(shard: Shard, max_prefill_tokens: int, max_batch_size: int) -> None:
    watch = compile_watch.install()
    watch.disarm()  # until the end: warm-up's own compiles are expected
    runner = shard.runner
    capacity = runner.kv_capacity
    n = max(1, min(max_prefill_tokens, runner.max_context - 1, capacity))
    # The largest prefill, then a short one: prefill attention reads a long chunk's K/V through
    # TMA and a short one's by pointers (two specializations; lightllm_grpc_kernels.prefill_attention).
    for tokens in sorted({n, min(n, SHORT_PREFILL)}, reverse=True):
        runner.step(prefill_step(0, tokens, capacity))
        runner.reset()
    batch = max(1, min(max_batch_size, runner.max_rows))
    decode = shard_pb2.StepRequest(step_id=0)
    for row in range(batch):
        if runner.sampler.kernels:  # compile the sampling kernels before the first request
            decode.admit.append(profile_row(row))
        else:
            decode.admit.append(shard_pb2.RowSampling(row=row, top_k=-1, top_p=1.0, repetition_penalty=1.0))
    decode.decode.rows.extend(range(batch))
    decode.decode.slots.extend(i % capacity for i in range(batch))
    runner.step(decode)
    runner.reset()
    if shard.cuda_graphs and not shard.graph_batch_sizes:
        if shard.model is not None and shard.ops.tune is not None:
            shard.ops.tune(shard.model)  # Triton: GEMV or cuBLAS per layer and token count
        graphs = capture_decode_graphs(runner, batch)
        shard.graph_batch_sizes = tuple(graphs.sizes)
        mixed_tokens = min(shard.mixed_graph_tokens, max_prefill_tokens + batch)
        if mixed_tokens > 0 and shard.model is not None:
            mixed = PiecewiseCudaGraphs(
                shard.model, runner.kv, runner.forward, runner.pad_slot, mixed_tokens, runner.device
            )
            mixed.capture(graphs.pool)
            runner.prefill_forward = runner.mixed_forward = mixed  # prefill: until the next lines
            shard.mixed_graph_sizes = tuple(mixed.sizes)
        tokens = min(shard.prefill_graph_tokens, max_prefill_tokens)
        if tokens > 0:
            prefill = CudaGraphPrefill(
                runner.forward, runner.req_to_token, runner.pad_row, runner.pad_slot, tokens, runner.device,
                fallback=runner.mixed_forward,  # what one-prompt graphs do not take: piecewise or eager
            )  # fmt: skip
            prefill.capture(graphs.pool)
            runner.prefill_forward = prefill
            shard.prefill_graph_sizes = tuple(prefill.sizes)
    if runner.device.type == "cuda":
        _mixed_steps(runner, batch)
    watch.arm()


def mixed_decode_rows(max_batch: int) -> list[int]:
    """Decode-row counts, one per split count of the decode attention up to ``max_batch`` rows:
    the fewest rows that get each."""
    rows: dict[int, int] = {}
    for b in range(1, max_batch + 1):
        rows.setdefault(decode_num_splits(b), b)
    return sorted(rows.values())


def _mixed_steps(runner: ModelRunner, batch: int) -> None:
    """A short prompt beside each of ``mixed_decode_rows`` decode rows, then beside the same rows
    in prefix groups (2 rows for the 1-row split count: a group needs two). A mixed step
    attends its decode rows outside any graph, without programmatic dependent launch, and with
    cascade attention whenever the coordinator groups them (cascade graphs exist only from 64
    rows, one split). The decode attention specializes on its split count, so without these
    steps a fresh server compiled a kernel under its first mixed steps with a few decode rows
    (~0.6 s each; BENCHMARKS.md)."""
    capacity = runner.kv_capacity
    most = min(batch, runner.max_rows - 1, capacity - SHORT_PREFILL)
    for rows in mixed_decode_rows(most):
        runner.step(mixed_step(rows, capacity))
        runner.reset()
        # A group needs two rows, and 2 rows get the split count of 1 (the most splits).
        grouped = max(rows, 2)
        if grouped <= most:
            runner.step(mixed_step(grouped, capacity, grouped=True))
            runner.reset()


def mixed_step(decode_rows: int, capacity: int, grouped: bool = False) -> shard_pb2.StepRequest:
    """A ``SHORT_PREFILL``-token prompt in row ``decode_rows`` (slots from ``decode_rows`` on)
    beside decode rows ``0 .. decode_rows - 1`` (slots ``0 .. decode_rows - 1``), all admitted
    by the step itself. ``grouped``: the decode rows in prefix groups of two (an odd last row
    alone), sharing no key: the cascade kernels run, each group's shared part empty."""
    step = prefill_step(decode_rows, SHORT_PREFILL, capacity, first_slot=decode_rows)
    for row in range(decode_rows):
        step.admit.append(shard_pb2.RowSampling(row=row, top_k=-1, top_p=1.0, repetition_penalty=1.0))
    dec = step.decode
    dec.rows.extend(range(decode_rows))
    dec.slots.extend(range(decode_rows))
    if grouped:
        dec.shared_lens.extend([0] * decode_rows)
        dec.group_sizes.extend(2 if r % 2 == 0 and r + 1 < decode_rows else 0 for r in range(decode_rows))
    return step


def capture_decode_graphs(runner: ModelRunner, max_batch: int) -> CudaGraphDecoder:
    """Capture the decode graphs of batches up to ``max_batch`` and make the runner replay them."""
    graphs = CudaGraphDecoder(
        runner.forward, runner.req_to_token, runner.last_token, runner.pad_row, runner.pad_slot, max_batch,
        runner.device,
    )  # fmt: skip
    graphs.capture()
    runner.decode_graphs = graphs
    return graphs
