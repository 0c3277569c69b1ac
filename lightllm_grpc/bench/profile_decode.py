"""Per-kernel GPU time of one decode step (8B Llama-3 shape, dummy weights), by kernel name.

``python -m lightllm_grpc.bench.profile_decode --batch 1 --context 128``: runs the shard's
eager decode forward under torch.profiler and prints each kernel's total CUDA time per
step, plus the replay time of the captured CUDA graph for the same batch. The difference
between the graph and the sum of kernel times is what launches cost inside the graph.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lightllm_grpc.bench.gpu import prepare_model_dir
from lightllm_grpc.config import ShardConfig
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.shard.warmup import warmup
from lightllm_grpc.shard.worker import build_shard, prefill_step


def _decode_step(batch: int, context: int) -> shard_pb2.StepRequest:
    step = shard_pb2.StepRequest(step_id=1)
    step.decode.rows.extend(range(batch))
    step.decode.slots.extend(batch * context + i for i in range(batch))
    return step


def kernel_table(prof, steps: int) -> list[tuple[str, float, int]]:
    """(kernel name, ms per step, launches per step) of a profile over ``steps`` steps, largest first."""
    times: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            name = evt.name[:90]
            times[name] += evt.device_time / 1e3 / steps  # ms per step
            counts[name] += 1
    return sorted(((n, t, counts[n] // steps) for n, t in times.items()), key=lambda r: -r[1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    model_dir = prepare_model_dir(Path(tempfile.mkdtemp()))
    cfg = ShardConfig(model=model_dir, device="cuda", dtype="bfloat16", load_format="dummy",
                      max_total_tokens=args.batch * (args.context + 1) + 64, max_rows=args.batch)  # fmt: skip
    shard = build_shard(cfg, 0, 1, None)
    warmup(shard, 256, args.batch)
    runner = shard.runner
    for row in range(args.batch):
        step = prefill_step(row, args.context, runner.kv_capacity)
        step.prefill.slots[:] = [row * args.context + i for i in range(args.context)]
        runner.step(step)
    graphs, runner.decode_forward = runner.decode_forward, runner.forward  # eager, to see kernels
    step = _decode_step(args.batch, args.context)
    runner.step(step)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            runner.step(step)
        torch.cuda.synchronize()
    rows = kernel_table(prof, args.steps)
    total = sum(t for _, t, _ in rows)
    graph = graphs.graphs[
        graphs.sizes[0] if args.batch == 1 else min(s for s in graphs.sizes if s >= args.batch)
    ]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(100):
        graph.replay()
    end.record()
    end.synchronize()
    print(f"batch {args.batch}, context {args.context}: kernels {total:.3f} ms/step (eager, summed), "
          f"graph replay {start.elapsed_time(end) / 100:.3f} ms")  # fmt: skip
    print(f"{'ms/step':>8} {'share':>6} {'calls':>5}  kernel")
    for name, t, n in rows[:25]:
        print(f"{t:8.3f} {t / total:6.1%} {n:5d}  {name}")


if __name__ == "__main__":
    main()
