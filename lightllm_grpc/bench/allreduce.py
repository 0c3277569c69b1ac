"""The P2P all-reduce on the local GPUs: checked against NCCL, and timed against it.

``python -m lightllm_grpc.bench.allreduce --check`` (or ``--time``) starts one process per
GPU (``--world-size``, default 2) and prints rank 0's result as JSON:

  --check  the custom all-reduce equals NCCL's sum, bf16 and fp32, at sizes that take the
           barrier-free, one-shot, two-shot and NCCL paths, eagerly and inside a CUDA graph
           replayed with new input; and the norm kernels that fold the barrier-free all-reduce
           in equal NCCL's sum then the plain kernels, mixed in one graph of several sizes
           (tests/test_gpu_tp.py runs this)
  --time   microseconds per all-reduce of barrier-free, one-shot, two-shot and NCCL at
           8 KiB..8 MiB of bf16, each as 20 back-to-back calls captured in a CUDA graph (so
           launch costs are those of a decode graph)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lightllm_grpc.bench.server import free_port
from lightllm_grpc.config import NO_MULTICAST_ENV
from lightllm_grpc.parallel import (
    CustomAllReduce,
    ParallelState,
    all_reduce,
    build_custom_all_reduce,
    set_custom_all_reduce,
    set_parallel_state,
)

MODULE = "lightllm_grpc.bench.allreduce"
HIDDEN = 4096
CHECK_BUFFER_BYTES = 2 << 20
# Rows of HIDDEN: bf16 1..64 rows one-shot (<= 512 KiB), 65..256 two-shot, 512 NCCL; fp32
# halves the rows per path.
CHECK_ROWS = (1, 7, 64, 65, 128, 256, 512)
TIME_BYTES = tuple(8 << (10 + i) for i in range(11))  # 8 KiB .. 8 MiB
CALLS_PER_GRAPH = 20


def run_group(module: str, world_size: int, args: list[str], timeout: float) -> dict:
    """Run ``python -m module`` once per GPU as ranks of one NCCL group; rank 0's JSON result.

    Each rank gets ``--rank R --world-size N --dist-init tcp://127.0.0.1:PORT --result FILE``
    and the shards' environment (no NVLink multicast). A rank that fails or a group that
    outlives ``timeout`` kills the rest (a rank left alone would wait in a collective).
    """
    init = f"tcp://127.0.0.1:{free_port()}"
    result = Path(tempfile.mkdtemp()) / "result.json"
    env = {**os.environ, **NO_MULTICAST_ENV}
    common = ["--world-size", str(world_size), "--dist-init", init, "--result", str(result), *args]
    procs = [
        subprocess.Popen([sys.executable, "-m", module, "--rank", str(r), *common], env=env)
        for r in range(world_size)
    ]
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]  # every one polled: any() would stop at the first
            if None not in codes or any(codes) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0] * world_size:
        raise RuntimeError(f"{module} {' '.join(args)}: ranks exited with {codes} (timeout {timeout:.0f}s)")
    return json.loads(result.read_text())


def init_rank(rank: int, world_size: int, init: str) -> torch.device:
    os.environ.update(NO_MULTICAST_ENV)
    torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world_size, device_id=device)
    set_parallel_state(ParallelState(rank, world_size))
    return device


def _inputs(rows: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed * 1000 + dist.get_rank())
    return torch.randn(rows, HIDDEN, generator=gen, device=device).to(dtype)


def _nccl_sum(x: torch.Tensor) -> torch.Tensor:
    ref = x.clone()
    dist.all_reduce(ref)
    return ref


def _mismatch(got: torch.Tensor, ref: torch.Tensor) -> float:
    """0.0 when equal. Two ranks add two numbers, which any order rounds alike, so the
    result must be bit-identical to NCCL's; more ranks may differ in the last bits."""
    if dist.get_world_size() == 2:
        return 0.0 if torch.equal(got, ref) else float((got.float() - ref.float()).abs().max())
    close = torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
    return 0.0 if close else float((got.float() - ref.float()).abs().max())


def check(device: torch.device) -> dict:
    cases, fused = [], []
    for dtype in (torch.bfloat16, torch.float32):
        custom, line = build_custom_all_reduce(CHECK_BUFFER_BYTES, dtype, device)
        if custom is None or custom.lamport is None:
            raise RuntimeError(f"no custom all-reduce for {dtype}: {line}")
        lamport = custom.lamport
        fused.append(_check_fused(lamport, dtype, device))
        cases += _check_paths(custom, dtype, device)
        custom.lamport = None  # the one-shot kernel for the sizes the barrier-free path takes
        cases += _check_paths(custom, dtype, device)
        set_custom_all_reduce(None)
    return {"world_size": dist.get_world_size(), "cases": cases, "fused": fused}


def _check_paths(custom: CustomAllReduce, dtype: torch.dtype, device: torch.device) -> list[dict]:
    cases = []
    set_custom_all_reduce(custom)
    for rows in CHECK_ROWS:
        x = _inputs(rows, dtype, device, rows)
        eager = _mismatch(all_reduce(x.clone()), _nccl_sum(x))
        static = torch.zeros_like(x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            all_reduce(static.clone())  # warm-up outside the graph, as CudaGraphDecoder does
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = all_reduce(static * 1)
        graphed = 0.0
        for trial in range(3):  # new input each replay: the graph must not hold old data
            static.copy_(_inputs(rows, dtype, device, 100 + trial + rows))
            graph.replay()
            graphed = max(graphed, _mismatch(out, _nccl_sum(static)))
        cases.append(
            {"dtype": str(dtype), "rows": rows, "bytes": x.numel() * x.element_size(),
             "path": custom.path(x), "eager_max_diff": eager, "graph_max_diff": graphed}
        )  # fmt: skip
    return cases


def _check_fused(lamport, dtype: torch.dtype, device: torch.device) -> dict:
    """The norm kernel that folds the barrier-free all-reduce in, and the all-reduce alone, in
    one CUDA graph of mixed sizes (so the slots, their clearing and the counter are exercised
    across sizes and replays): each output equals NCCL's sum followed by the plain kernel, bit
    for bit on two ranks."""
    from lightllm_grpc_kernels.lamport import lamport_add_rmsnorm, lamport_all_reduce
    from lightllm_grpc_kernels.rmsnorm import fused_add_rmsnorm

    gen = torch.Generator(device=device).manual_seed(7)  # the same weight on every rank
    norm_w = torch.randn(HIDDEN, generator=gen, device=device).to(dtype)
    most = 64 if dtype == torch.bfloat16 else 32
    plan = [("norm", 2), ("norm", 5), ("sum", most), ("norm", 1), ("sum", 3), ("norm", most)]
    static = {i: torch.zeros(rows, HIDDEN, device=device, dtype=dtype) for i, (_, rows) in enumerate(plan)}
    residual = {i: torch.zeros_like(t) for i, t in static.items()}

    def run() -> list[torch.Tensor]:
        outs = []
        for i, (kind, _) in enumerate(plan):
            x, res = static[i].clone(), residual[i].clone()
            if kind == "norm":
                outs += [lamport_add_rmsnorm(x, res, norm_w, 1e-5, lamport), res]
            else:
                outs.append(lamport_all_reduce(x, lamport))
        return outs

    def want() -> list[torch.Tensor]:
        outs = []
        for i, (kind, _) in enumerate(plan):
            total, res = _nccl_sum(static[i]), residual[i].clone()
            outs += [fused_add_rmsnorm(total, res, norm_w, 1e-5), res] if kind == "norm" else [total]
        return outs

    def fill(seed: int) -> None:
        for i, t in static.items():
            t.copy_(_inputs(t.shape[0], dtype, device, seed + i))
            residual[i].copy_(_inputs(t.shape[0], dtype, device, 500 + seed + i))
            dist.broadcast(residual[i], 0)  # the residual stream is the same on every rank

    fill(1)
    eager = max(_mismatch(g, r) for g, r in zip(run(), want(), strict=True))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_outs = run()
    graphed = 0.0
    for trial in range(5):
        fill(100 + 10 * trial)
        graph.replay()
        if trial == 2:
            run()  # eager calls between replays move the counter too
        graphed = max(graphed, max(_mismatch(g, r) for g, r in zip(graphed_outs, want(), strict=True)))
    state = lamport.state.tolist()
    return {"dtype": str(dtype), "eager_max_diff": eager, "graph_max_diff": graphed, "state": state}


def _per_call_us(fn, x: torch.Tensor, replays: int = 20) -> float:
    """Microseconds per call of ``fn(x)`` captured CALLS_PER_GRAPH times in one graph."""
    from lightllm_grpc.shard.cuda_graph import replay_ms

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            fn(x)
    graph.replay()
    dist.barrier()
    torch.cuda.synchronize()
    return replay_ms(graph, replays, warmup=0) * 1e3 / CALLS_PER_GRAPH


def timing(device: torch.device) -> dict:
    custom, line = build_custom_all_reduce(TIME_BYTES[-1], torch.bfloat16, device)
    if custom is None:
        raise RuntimeError(line)
    one_shot = CustomAllReduce(custom.buffer, custom.group_name, one_shot_max=custom.max_bytes)
    two_shot = CustomAllReduce(custom.buffer, custom.group_name, one_shot_max=0)
    lamport = CustomAllReduce(custom.buffer, custom.group_name, lamport=custom.lamport)
    paths = {
        "lamport_us": lamport,
        "one_shot_us": one_shot,
        "two_shot_us": two_shot,
        "nccl_us": dist.all_reduce,
    }
    rows = []
    for nbytes in TIME_BYTES:
        x = torch.randn(nbytes // 2 // HIDDEN, HIDDEN, device=device).to(torch.bfloat16)
        times = {
            name: _per_call_us(fn, x) if name != "lamport_us" or fn.path(x) == "lamport" else None
            for name, fn in paths.items()
        }
        rows.append({"bytes": nbytes, **times, "chosen": custom.path(x)})
    return {"world_size": dist.get_world_size(), "card": torch.cuda.get_device_name(), "sizes": rows}


def render(t: dict) -> str:
    lines = [
        f"All-reduce of bf16 on {t['world_size']}x {t['card']}, us per call (20 per CUDA graph):\n",
        "| bytes | barrier-free | one-shot | two-shot | NCCL | chosen |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    keys = ("lamport_us", "one_shot_us", "two_shot_us", "nccl_us")
    for r in t["sizes"]:
        size = f"{r['bytes'] >> 10} KiB" if r["bytes"] < 1 << 20 else f"{r['bytes'] >> 20} MiB"
        us = " | ".join("-" if r.get(k) is None else f"{r[k]:.1f}" for k in keys)
        lines.append(f"| {size} | {us} | {r['chosen']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true")
    mode.add_argument("--time", action="store_true")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--rank", type=int, default=None, help="(set by the launcher)")
    p.add_argument("--dist-init", default=None, help="(set by the launcher)")
    p.add_argument("--result", type=Path, default=None, help="(set by the launcher)")
    args = p.parse_args(argv)
    flag = "--check" if args.check else "--time"
    if args.rank is None:  # the launcher
        result = run_group(MODULE, args.world_size, [flag], timeout=300)
        print(render(result) if args.time else json.dumps(result, indent=2))
        return
    device = init_rank(args.rank, args.world_size, args.dist_init)
    result = check(device) if args.check else timing(device)
    if args.rank == 0:
        args.result.write_text(json.dumps(result))
    dist.barrier()
    os._exit(0)  # no teardown of NCCL and the symmetric buffers: the process ends


if __name__ == "__main__":
    main()
