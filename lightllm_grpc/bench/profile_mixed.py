"""Eager vs piecewise CUDA graphs for a mixed step (8B Llama-3 shape, dummy weights, bf16).

``python -m lightllm_grpc.bench.profile_mixed --prompt-tokens 64,256 --decode-rows 8,32``:
builds a shard as ``serve`` does (decode, prefill and piecewise graphs captured at warm-up),
fills ``--decode-rows`` rows with ``--context`` tokens each, then times one mixed step (a
prompt of N new tokens beside the B decode rows, one forward pass, sampling of every row and
the copy of the tokens to the host) with the eager forward and with the piecewise graphs, for
every (N, B). Two times per path, medians of ``--iters``: ``launch`` is the host time to queue
the step (what Python costs), ``step`` the time until its tokens are on the host. Nothing is
asserted. ``--model DIR --device cpu --dtype float32`` runs it on a small checkpoint (a smoke
run: the pieces then run uncaptured, and the times mean nothing).

``--prompts P`` puts P prompts of N tokens each in the step (W2's chunks: ``--prompts 32
--prompt-tokens 256 --decode-rows 416 --context 384``, 8,192 prompt tokens beside 416 rows), and
``--kernels K`` prints the K costliest kernels of the eager step (CUDA only; torch.profiler).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lightllm_grpc.config import ShardConfig
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.shard.piecewise_graph import PiecewiseCudaGraphs
from lightllm_grpc.shard.runner import ModelRunner
from lightllm_grpc.shard.warmup import warmup
from lightllm_grpc.shard.worker import build_shard, prefill_step


def _sync(runner: ModelRunner) -> None:
    if runner.device.type == "cuda":
        torch.cuda.synchronize()


def _mixed_step(
    prompt: int, decode_rows: int, prompt_row: int, context: int, prompts: int = 1
) -> shard_pb2.StepRequest:
    """Rows ``prompt_row .. prompt_row + prompts - 1`` each prefill ``prompt`` tokens (slots from
    ``prompt_row * (context + 1)`` on, one after the other) beside decode rows
    ``0..decode_rows-1``, each at position ``context`` (its slot: ``r * (context + 1) + context``)."""
    step = shard_pb2.StepRequest(step_id=0)
    first = prompt_row * (context + 1)
    for i in range(prompts):
        one = prefill_step(prompt_row + i, prompt, 1 << 62, first + i * prompt)
        step.admit.extend(one.admit)
        step.prefill.MergeFrom(one.prefill)
    step.decode.rows.extend(range(decode_rows))
    step.decode.slots.extend(r * (context + 1) + context for r in range(decode_rows))
    return step


def _time(
    runner: ModelRunner, step: shard_pb2.StepRequest, decode_rows: int, context: int, iters: int
) -> tuple[float, float]:
    """Median ms to launch ``step`` and to have its tokens on the host; the decode rows'
    lengths are put back before each run, so every run is the same step (the prompt's row is
    written from the step's own starts)."""
    launch, total = [], []
    for _ in range(iters + 3):
        runner.row_len[:decode_rows] = context
        _sync(runner)
        start = time.perf_counter()
        pending = runner.launch(step)
        queued = time.perf_counter()
        pending.finish()
        launch.append((queued - start) * 1e3)
        total.append((time.perf_counter() - start) * 1e3)
    return statistics.median(launch[3:]), statistics.median(total[3:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", default="64,256", help="comma-separated new tokens of the prompt")
    p.add_argument("--decode-rows", default="8,32", help="comma-separated decode rows beside it")
    p.add_argument("--context", type=int, default=512, help="tokens already in each decode row")
    p.add_argument("--prompts", type=int, default=1, help="prompts of --prompt-tokens each in the step")
    p.add_argument("--kernels", type=int, default=0, help="print the K costliest kernels of the eager step")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--max-mixed-tokens", type=int, default=ShardConfig.cuda_graph_max_mixed_tokens)
    p.add_argument("--model", type=Path, default=None, help="a checkpoint (default: 8B shape, dummy weights)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    prompts = [int(x) for x in args.prompt_tokens.split(",")]
    batches = [int(x) for x in args.decode_rows.split(",")]
    rows, context = max(batches), args.context
    model_dir = args.model or _dummy_model_dir()
    max_prefill = max(max(prompts) * args.prompts, context)
    cfg = ShardConfig(
        model=model_dir, device=args.device, dtype=args.dtype, load_format="auto" if args.model else "dummy",
        max_total_tokens=rows * (context + 1) + max(prompts) * args.prompts + 16,
        max_rows=rows + args.prompts, max_context=max(context, max(prompts)) + 1,
        max_prefill_tokens=max_prefill, cuda_graph_max_mixed_tokens=args.max_mixed_tokens,
    )  # fmt: skip
    shard = build_shard(cfg, 0, 1, None)
    warmup(shard, max_prefill, rows + args.prompts)
    runner = shard.runner
    graphs = runner.mixed_forward
    if not isinstance(graphs, PiecewiseCudaGraphs):  # no CUDA graphs (CPU): the pieces uncaptured
        assert shard.model is not None and args.max_mixed_tokens > 0, "no piecewise graphs to time"
        graphs = PiecewiseCudaGraphs(
            shard.model, runner.kv, runner.forward, runner.pad_slot, args.max_mixed_tokens, runner.device
        )
    for r in range(rows):  # each decode row's context (dummy tokens)
        runner.step(prefill_step(r, context, runner.kv_capacity, first_slot=r * (context + 1)))
    name = torch.cuda.get_device_name() if runner.device.type == "cuda" else "CPU"
    print(
        f"{name}, {shard.model_config.name}, {shard.dtype}; context {context}; "
        f"{args.prompts} prompt(s) a step; buckets {graphs.sizes}"
    )
    print("prompt  rows tokens bucket | eager launch   step | piecewise launch   step | speed-up")
    profiles = []
    for n in prompts:
        for b in batches:
            # Rows from `rows` on are the prompts', past the decode rows.
            step = _mixed_step(n, b, rows, context, args.prompts)
            runner.mixed_forward = runner.forward
            eager = _time(runner, step, b, context, args.iters)
            if args.kernels and runner.device.type == "cuda":
                profiles.append((n, b, eager[1], _kernels(runner, step, b, context)))
            runner.mixed_forward = graphs
            before = graphs.replays
            pieces = _time(runner, step, b, context, args.iters)
            t = n * args.prompts + b
            if graphs.replays == before:
                print(
                    f"{n:6d} {b:5d} {t:6d} {'-':>6} | {eager[0]:12.2f} {eager[1]:6.2f} | (eager: no bucket)"
                )
                continue
            size = min(s for s in graphs.sizes if s >= t)
            print(
                f"{n:6d} {b:5d} {t:6d} {size:6d} | {eager[0]:12.2f} {eager[1]:6.2f} | {pieces[0]:16.2f} "
                f"{pieces[1]:6.2f} | {eager[1] / pieces[1]:7.2f}x"
            )

    for n, b, step_ms, table in profiles:
        total = sum(ms for _, ms, _ in table)
        print(f"\n{args.prompts} x {n} prompt tokens beside {b} decode rows, eager: step {step_ms:.2f} ms, "
              f"kernels {total:.2f} ms (summed)")  # fmt: skip
        for kernel, ms, launches in table[: args.kernels]:
            print(f"{ms:9.3f} ms {100 * ms / total:5.1f}% {launches:5d}  {kernel}")


def _kernels(
    runner: ModelRunner, step: shard_pb2.StepRequest, decode_rows: int, context: int, steps: int = 3
) -> list[tuple[str, float, int]]:
    """(kernel, ms per step, launches per step) of the eager step, costliest first."""
    from torch.profiler import ProfilerActivity, profile

    from lightllm_grpc.bench.profile_decode import kernel_table

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.row_len[:decode_rows] = context
            runner.launch(step).finish()
        torch.cuda.synchronize()
    return kernel_table(prof, steps)


def _dummy_model_dir() -> Path:
    from lightllm_grpc.bench.gpu import prepare_model_dir

    return prepare_model_dir(Path(tempfile.mkdtemp()))


if __name__ == "__main__":
    main()
