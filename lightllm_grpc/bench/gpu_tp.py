"""``python -m lightllm_grpc.bench.gpu_tp --out DIR``: TP=1 against TP=2 on two GPUs, and what
the all-reduce costs (8B Llama-3 shape, bf16, random weights via ``--load-format dummy``).

  1. all-reduce alone (bench/allreduce.py --time): barrier-free, one-shot, two-shot and NCCL,
     8 KiB..8 MiB
  2. one decode step without the server, in one process per rank: CUDA-graph replay time at
     batch 1 and 64 (context 128), and the all-reduce kernels' share of the replay's kernel
     time (torch.profiler); at TP=2 with the P2P all-reduce folded into the norms, then
     recaptured with it as kernels of their own, then with NCCL
  3. through the gRPC API: W1 (batch-1 decode, in 128 / out 256, best of 3 runs) and W2
     (1,000 x in 256 / out 256, all at once) at TP=1, at TP=2, at TP=2 with
     --disable-fused-all-reduce, and with --disable-custom-all-reduce (W2 there tells whether
     two-shot beats NCCL at big batches)

About 6 minutes on 2x H100. Writes ``bench-gpu-tp.json`` and ``bench-gpu-tp.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import time
from pathlib import Path

import torch

from lightllm_grpc.aio import run
from lightllm_grpc.bench import allreduce
from lightllm_grpc.bench.gpu import prepare_model_dir
from lightllm_grpc.bench.load import Workload, run_load
from lightllm_grpc.bench.server import ROWS_HELP, LocalServer, rows_flags

VOCAB = 128256
BATCHES = (1, 64)
CONTEXT = 128
MODULE = "lightllm_grpc.bench.gpu_tp"


# ---- step 2: one decode step, in each rank's process ----


def _decode_step(batch: int, first_slot: int):
    from lightllm_grpc.proto import shard_pb2

    step = shard_pb2.StepRequest(step_id=1)
    step.decode.rows.extend(range(batch))
    step.decode.slots.extend(first_slot + i for i in range(batch))
    return step


def _measure(runner, world_size: int) -> dict:
    """Replay time and all-reduce kernel share of the decode graph at each of BATCHES."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from lightllm_grpc.bench.profile_decode import kernel_table
    from lightllm_grpc.shard.cuda_graph import replay_ms

    out = {}
    first_slot = max(BATCHES) * CONTEXT  # past every row's prompt: same slots each step
    for batch in BATCHES:
        runner.step(_decode_step(batch, first_slot))  # fills the graph's inputs for this batch
        graphs = runner.decode_graphs
        graph = graphs.graphs[min(s for s in graphs.sizes if s >= batch)]
        if world_size > 1:
            dist.barrier()
        torch.cuda.synchronize()
        graph_ms = replay_ms(graph, 100, warmup=0)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                graph.replay()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.device_time for e in kernels) / 20 / 1e3
        names = ("allreduce", "all_reduce", "lamport")
        ar = sum(e.device_time for e in kernels if any(n in e.name.lower() for n in names)) / 20 / 1e3
        table = kernel_table(prof, 20)
        out[str(batch)] = {
            "graph_replay_ms": graph_ms,
            "kernels_ms": total,
            "all_reduce_ms": ar,
            "all_reduce_share": ar / total if total else None,  # None: the profiler saw no kernels
            "kernel_count": sum(n for _, _, n in table),
            # where a step's kernel time goes: (name, ms per step, launches per step), largest first
            "top_kernels": [(n, round(t, 4), c) for n, t, c in table[:20]],
        }
    return out


def breakdown_rank(rank: int, world_size: int, init: str, model_dir: Path) -> dict:
    from lightllm_grpc.config import ShardConfig
    from lightllm_grpc.parallel import custom_all_reduce, set_custom_all_reduce
    from lightllm_grpc.shard.warmup import capture_decode_graphs, warmup
    from lightllm_grpc.shard.worker import build_shard, prefill_step

    rows = max(BATCHES)
    kv = rows * (CONTEXT + 2) + 64
    cfg = ShardConfig(model=model_dir, device="cuda", dtype="bfloat16", load_format="dummy",
                      tp_size=world_size, max_total_tokens=kv, max_rows=rows)  # fmt: skip
    shard = build_shard(cfg, rank, world_size, init if world_size > 1 else None)
    warmup(shard, 256, rows)
    runner = shard.runner
    for row in range(rows):
        step = prefill_step(row, CONTEXT, runner.kv_capacity)
        step.prefill.slots[:] = [row * CONTEXT + i for i in range(CONTEXT)]
        runner.step(step)
    if world_size == 1:
        return {"tp1": _measure(runner, 1)}
    custom = custom_all_reduce()
    result = {"p2p" if custom else "nccl": _measure(runner, world_size)}

    def recapture() -> None:
        capture_decode_graphs(runner, rows)

    if custom is not None and custom.lamport is not None:
        # The same step with the P2P all-reduce as kernels of their own (not in the norms).
        custom.lamport = None
        recapture()
        result["p2p-unfused"] = _measure(runner, world_size)
    if custom is not None:  # the same step with NCCL: recapture the graphs without the P2P path
        set_custom_all_reduce(None)
        recapture()
        result["nccl"] = _measure(runner, world_size)
    return result


# ---- step 3: through the gRPC API ----


def _serve(model_dir: Path, out: Path, name: str, tp: int, extra: tuple[str, ...], args) -> dict:
    log = out / f"server-{name}.log"
    server = LocalServer(
        model_dir, log,
        "--load-format", "dummy", "--dtype", "bfloat16", "--device", "cuda",
        *rows_flags(args.max_running), "--tp-size", str(tp), *extra,
        start_timeout=300,
    )  # fmt: skip
    try:
        w1 = [run(run_load(server.address, Workload(1, 128, 256, 1, VOCAB, seed=s))) for s in range(3)]
        res: dict = {"w1": min((r.as_dict() for r in w1), key=lambda d: d["tpot_p50_ms"])}
        res["w1_runs_tpot_ms"] = [r.tpot_p50_ms for r in w1]
        n = args.w2_requests
        res["w2"] = run(run_load(server.address, Workload(n, 256, 256, n, VOCAB))).as_dict()
    finally:
        server.stop()
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "all-reduce:" in ln]
    res["all_reduce_log"] = lines[0].split("all-reduce:", 1)[1].strip() if lines else "(one shard: none)"
    return res


# ---- the report ----


def _per_step_estimate(micro: dict, batch: int, key: str, layers: int, hidden: int) -> float:
    """ms of all-reduce per decode step from the microbenchmark: 2 per layer + the embedding's."""
    nbytes = batch * hidden * 2
    row = next((r for r in micro["sizes"] if r["bytes"] >= nbytes), micro["sizes"][-1])
    return (2 * layers + 1) * row[key] / 1e3 if row.get(key) is not None else float("nan")


def render(r: dict) -> str:
    env, serve, dec = r["environment"], r["serve"], r.get("decode", {})
    cols = [
        ("tp1", "TP=1"),
        ("tp2", "TP=2, P2P all-reduce in the norms"),
        ("tp2-unfused", "TP=2, P2P all-reduce kernels"),
        ("tp2-nccl", "TP=2, NCCL only"),
    ]
    dec_key = {"tp1": "tp1", "tp2": "p2p", "tp2-unfused": "p2p-unfused", "tp2-nccl": "nccl"}

    def w1(name: str) -> str:
        if name not in serve:
            return "-"
        ms = serve[name]["w1"]["tpot_p50_ms"]
        return f"{ms:.2f} ms ({1e3 / ms:.0f} tok/s)"

    def w2(name: str) -> str:
        return f"{serve[name]['w2']['output_tokens_per_s']:.0f}" if "w2" in serve.get(name, {}) else "-"

    def decode(name: str, field: str, fmt: str) -> str:
        d = dec.get(dec_key[name])
        if not d:
            return "-"
        vals = [d[str(b)][field] for b in BATCHES]
        return " / ".join("n/a" if v is None else fmt.format(v) for v in vals)

    rows = [
        ("W1 batch-1 decode, in 128 / out 256 (ms/token, best of 3)", w1),
        (f"W2 {r['w2_requests']} x in 256 / out 256 at once (out tok/s)", w2),
        ("decode CUDA graph replay, batch 1 / 64 (ms)", lambda n: decode(n, "graph_replay_ms", "{:.3f}")),
        (
            "all-reduce kernels in the replay, batch 1 / 64 (ms)",
            lambda n: decode(n, "all_reduce_ms", "{:.3f}"),
        ),
        ("their share of the replay's kernel time", lambda n: decode(n, "all_reduce_share", "{:.1%}")),
    ]
    micro = r.get("allreduce")

    def estimate(name: str) -> str:
        key = {"tp2-unfused": "lamport_us", "tp2-nccl": "nccl_us"}.get(name)
        if micro is None or key is None:
            return "-"
        return " / ".join(f"{_per_step_estimate(micro, b, key, 32, 4096):.3f}" for b in BATCHES)

    rows.append(("65 all-reduces per step from the microbenchmark, batch 1 / 64 (ms)", estimate))
    head = (
        f"{env['gpus']}x {env['card']} | {env['date']} | torch {env['torch']} | triton {env['triton']} | "
        f"grpcio {env['grpcio']} | 8B Llama-3 shape, bf16, dummy weights\n\n"
    )
    table = "| | " + " | ".join(c for _, c in cols) + " |\n| --- |" + " --- |" * len(cols) + "\n"
    table += "".join(f"| {label} | " + " | ".join(f(n) for n, _ in cols) + " |\n" for label, f in rows)
    paths = "".join(f"- {c}: {serve[n]['all_reduce_log']}\n" for n, c in cols[1:] if n in serve)
    return (
        head
        + table
        + "\nAll-reduce path each server logged:\n"
        + paths
        + "\n"
        + (allreduce.render(micro) if micro else "")
    )


def environment() -> dict:
    import grpc
    import triton

    return {
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "grpcio": grpc.__version__,
        "gpus": torch.cuda.device_count(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--w2-requests", type=int, default=1000)
    p.add_argument("--max-running", type=int, default=None, help=ROWS_HELP)
    p.add_argument("--skip-decode", action="store_true", help="skip steps 1 and 2 (server runs only)")
    p.add_argument("--skip-serve", action="store_true", help="skip step 3 (no server runs)")
    # One rank of step 2 (set by the launcher).
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--world-size", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--dist-init", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank is not None:
        logging.basicConfig(level=logging.INFO, format=f"rank {args.rank} %(name)s: %(message)s")
        res = breakdown_rank(args.rank, args.world_size, args.dist_init, args.model_dir)
        if args.rank == 0:
            args.result.write_text(json.dumps(res))
        if args.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        os._exit(0)  # no teardown of graphs, NCCL and the symmetric buffer: the process ends
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model_dir(args.out)
    result: dict = {"environment": environment(), "w2_requests": args.w2_requests}
    started = time.monotonic()

    def progress(what: str) -> None:
        print(f"[gpu_tp {time.monotonic() - started:5.0f}s] {what}", flush=True)

    if not args.skip_decode:
        progress("all-reduce microbenchmark (2 ranks)")
        result["allreduce"] = allreduce.run_group(allreduce.MODULE, 2, ["--time"], timeout=240)
        result["environment"]["card"] = result["allreduce"]["card"]
        decode: dict = {}
        for tp in (1, 2):
            progress(f"decode step without the server, TP={tp}")
            decode.update(allreduce.run_group(MODULE, tp, ["--model-dir", str(model_dir)], timeout=300))
        result["decode"] = decode
    servers = [
        ("tp1", 1, ()),
        ("tp2", 2, ()),
        ("tp2-unfused", 2, ("--disable-fused-all-reduce",)),
        ("tp2-nccl", 2, ("--disable-custom-all-reduce",)),
    ]
    if args.skip_serve:
        servers = []
    result["serve"] = {}
    for name, tp, extra in servers:
        progress(f"server {name}: W1 and W2")
        result["serve"][name] = _serve(model_dir, args.out, name, tp, extra, args)
    progress("done")
    result["environment"].setdefault("card", "GPU")
    (args.out / "bench-gpu-tp.json").write_text(json.dumps(result, indent=2))
    md = render(result)
    (args.out / "bench-gpu-tp.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
