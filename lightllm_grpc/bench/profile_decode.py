"""Per-kernel GPU time of one decode step (8B Llama-3 shape, dummy weights), by kernel name.

``python -m lightllm_grpc.bench.profile_decode --batch 1 --context 128``: runs the shard's
eager decode forward under torch.profiler and prints each kernel's total CUDA time per
step, plus the replay time of the captured CUDA graph for the same batch. The difference
between the graph and the sum of kernel times is what launches cost inside the graph.

``--fusions off`` builds the same shard without the decode fusions (rotary in the KV store,
SiLU-and-mul and the residual add + RMSNorm folded into the GEMVs); ``--compare`` runs both,
each in its own process, and prints the two tables side by side with the graph replay times:
the before/after of the fusions in one command. ``--quantization fp8`` and ``--kv-cache-dtype
fp8_e4m3`` profile the FP8 step instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from lightllm_grpc.config import KV_CACHE_DTYPES, QUANTIZATIONS

MODULE = "lightllm_grpc.bench.profile_decode"


def _decode_step(batch: int, context: int):
    from lightllm_grpc.proto import shard_pb2

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


def unfuse(shard) -> None:
    """Before warm-up: the shard's model keeps rotary as its own kernel and warm-up binds no
    fused GEMV (``tune_matmuls(fuse=False)``); every other choice is as served."""
    from lightllm_grpc.layers import matmul_tuning

    for module in shard.model.modules():
        if hasattr(module, "rotary_in_kv_store"):
            module.rotary_in_kv_store = False
    if shard.ops.tune is not None:
        shard.ops = dataclasses.replace(
            shard.ops, tune=functools.partial(matmul_tuning.tune_matmuls, fuse=False)
        )


def profile_decode(
    batch: int,
    context: int,
    steps: int,
    fusions: bool,
    quantization: str | None = None,
    kv_cache_dtype: str = "auto",
) -> dict:
    """``{"graph_ms", "kernels_ms", "rows": [(name, ms per step, launches per step)]}``."""
    from torch.profiler import ProfilerActivity, profile

    from lightllm_grpc.bench.gpu import prepare_model_dir
    from lightllm_grpc.config import ShardConfig
    from lightllm_grpc.shard.cuda_graph import replay_ms
    from lightllm_grpc.shard.warmup import warmup
    from lightllm_grpc.shard.worker import build_shard, prefill_step

    model_dir = prepare_model_dir(Path(tempfile.mkdtemp()))
    cfg = ShardConfig(model=model_dir, device="cuda", dtype="bfloat16", load_format="dummy",
                      max_total_tokens=batch * (context + 1) + 64, max_rows=batch,
                      quantization=quantization, kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    shard = build_shard(cfg, 0, 1, None)
    if not fusions:
        unfuse(shard)
    warmup(shard, 256, batch)
    runner = shard.runner
    for row in range(batch):
        step = prefill_step(row, context, runner.kv_capacity)
        step.prefill.slots[:] = [row * context + i for i in range(context)]
        runner.step(step)
    graphs, runner.decode_graphs = runner.decode_graphs, None  # eager, to see kernels
    step = _decode_step(batch, context)
    runner.step(step)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.step(step)
        torch.cuda.synchronize()
    rows = kernel_table(prof, steps)
    runner.decode_graphs = graphs
    # The served steps also leave this batch (its rows and context lengths) in the graph's input
    # buffers, so the replays below attend over the real context (after capture they hold padding).
    step_ms = _served_step_ms(runner, step)
    graph = graphs.graphs[graphs.sizes[0] if batch == 1 else min(s for s in graphs.sizes if s >= batch)]
    return {"graph_ms": replay_ms(graph, 100, warmup=0), "step_ms": step_ms,
            "kernels_ms": sum(t for _, t, _ in rows), "rows": rows}  # fmt: skip


def _served_step_ms(runner, step, steps: int = 50) -> float:
    """Wall time of the whole served decode step (graph, sampling, the result's copy to the
    host, the step's Python): what the coordinator waits for when nothing overlaps it."""
    runner.step(step)
    begin = time.perf_counter()
    for _ in range(steps):
        runner.step(step)
    torch.cuda.synchronize()
    return (time.perf_counter() - begin) * 1e3 / steps


def print_table(result: dict, batch: int, context: int, label: str = "") -> None:
    total = result["kernels_ms"]
    print(f"{label}batch {batch}, context {context}: kernels {total:.3f} ms/step (eager, summed), "
          f"graph replay {result['graph_ms']:.3f} ms, served step {result['step_ms']:.3f} ms")  # fmt: skip
    print(f"{'ms/step':>8} {'share':>6} {'calls':>5}  kernel")
    for name, t, n in result["rows"][:25]:
        print(f"{t:8.3f} {t / total:6.1%} {n:5d}  {name}")


def print_comparison(off: dict, on: dict, batch: int, context: int) -> None:
    """The two profiles by kernel name: time and launches per step without and with the fusions."""
    print(f"batch {batch}, context {context}: graph replay {off['graph_ms']:.3f} -> {on['graph_ms']:.3f} ms "
          f"({(on['graph_ms'] - off['graph_ms']) * 1e3:+.1f} us); kernels summed "
          f"{off['kernels_ms']:.3f} -> {on['kernels_ms']:.3f} ms")  # fmt: skip
    before = {name: (t, n) for name, t, n in off["rows"]}
    after = {name: (t, n) for name, t, n in on["rows"]}
    names = sorted(
        before.keys() | after.keys(), key=lambda k: -max(before.get(k, (0, 0))[0], after.get(k, (0, 0))[0])
    )
    print(f"{'off ms':>8} {'calls':>5} {'on ms':>8} {'calls':>5}  kernel")
    for name in names[:30]:
        (t0, n0), (t1, n1) = before.get(name, (0.0, 0)), after.get(name, (0.0, 0))
        print(f"{t0:8.3f} {n0:5d} {t1:8.3f} {n1:5d}  {name}")
    launches = (sum(n for _, _, n in off["rows"]), sum(n for _, _, n in on["rows"]))
    print(f"launches per step: {launches[0]} -> {launches[1]}")


def _compare(args: argparse.Namespace) -> None:
    results = {}
    for fusions in ("off", "on"):  # one process each: two 8B models need not fit at once
        out = Path(tempfile.mkdtemp()) / f"{fusions}.json"
        cmd = [sys.executable, "-m", MODULE, "--batch", str(args.batch), "--context", str(args.context),
               "--steps", str(args.steps), "--fusions", fusions, "--json", str(out),
               "--kv-cache-dtype", args.kv_cache_dtype,
               *(["--quantization", args.quantization] if args.quantization else [])]  # fmt: skip
        subprocess.run(cmd, check=True)
        results[fusions] = json.loads(out.read_text())
    print_comparison(results["off"], results["on"], args.batch, args.context)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--fusions", choices=("on", "off"), default="on", help="the decode fusions (default: on)")
    p.add_argument(
        "--compare", action="store_true", help="profile with the fusions off, then on, and compare"
    )
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None, help="FP8 weights")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    args = p.parse_args(argv)
    if args.compare:
        _compare(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # warm-up's per-shape choices
    result = profile_decode(
        args.batch, args.context, args.steps, args.fusions == "on", args.quantization, args.kv_cache_dtype
    )
    print_table(result, args.batch, args.context, f"fusions {args.fusions}: ")
    if args.json:
        args.json.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
