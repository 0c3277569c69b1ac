"""Start-up forward passes at the largest shapes the coordinator will send.

They compile kernels, fill the allocator's pools and (on GPU, later) capture CUDA graphs,
so the first real request does not pay for any of that.
"""

from __future__ import annotations

from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.shard.worker import Shard


def warmup(shard: Shard, max_prefill_tokens: int, max_batch_size: int) -> None:
    runner = shard.runner
    capacity = runner.kv.num_slots
    n = max(1, min(max_prefill_tokens, runner.max_context - 1, capacity))
    prefill = shard_pb2.StepRequest(step_id=0)
    prefill.admit.append(shard_pb2.RowSampling(row=0, top_k=-1, top_p=1.0, repetition_penalty=1.0))
    p = prefill.prefill
    p.rows.append(0)
    p.starts.append(0)
    p.lens.append(n)
    p.token_ids.extend([0] * n)
    p.slots.extend(i % capacity for i in range(n))
    p.prefix_lens.append(0)
    p.sample.append(True)
    runner.step(prefill)
    runner.reset()
    batch = max(1, min(max_batch_size, runner.max_rows))
    decode = shard_pb2.StepRequest(step_id=0)
    for row in range(batch):
        decode.admit.append(shard_pb2.RowSampling(row=row, top_k=-1, top_p=1.0, repetition_penalty=1.0))
    decode.decode.rows.extend(range(batch))
    decode.decode.slots.extend(i % capacity for i in range(batch))
    runner.step(decode)
    runner.reset()
