"""``lightllm-grpc bench``: ``bench load`` (a fixed workload), ``bench serve`` (datasets, arrival
rates and latency percentiles against one or more running servers), ``bench sim`` (admission
rules compared by simulating the scheduler on the CPU) and ``bench trace`` (where first tokens'
time went, from a ``serve --step-trace`` file)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import grpc

from lightllm_grpc.aio import run
from lightllm_grpc.bench import admission_sim as sim
from lightllm_grpc.bench.datasets import (
    Conversation,
    Vocab,
    multi_turn_conversations,
    random_requests,
    shared_prefix_requests,
)
from lightllm_grpc.bench.load import Workload, run_load
from lightllm_grpc.bench.report import format_summary
from lightllm_grpc.bench.serve import Traffic, as_conversations, serve_benchmark
from lightllm_grpc.bench.trace_report import trace_main
from lightllm_grpc.config import SchedulerConfig
from lightllm_grpc.proto import generation_pb2 as pb


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    load = bsub.add_parser("load", help="send a fixed workload to a running server and report speed")
    load.add_argument("--address", default="127.0.0.1:50051")
    load.add_argument("--num-requests", type=int, default=64)
    load.add_argument("--input-len", type=int, default=128)
    load.add_argument("--output-len", type=int, default=128)
    load.add_argument("--concurrency", type=int, default=None, help="default: all at once")
    load.add_argument("--vocab-size", type=int, default=None, help="default: asked from the server")
    load.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_serve_parser(bsub)
    _add_sim_parser(bsub)
    _add_trace_parser(bsub)


def _add_trace_parser(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser(
        "trace",
        help="split each first token's time into its parts, from a serve --step-trace file",
        description="Reads a serve --step-trace file and prints p50/p90/p99/max of each part of "
        "the time to first token as the engine saw it (docs/operations.md, Step trace).",
    )
    p.add_argument("trace", type=Path, help="the --step-trace file (JSON lines)")
    p.add_argument(
        "--ttft-json",
        type=Path,
        default=None,
        help="a bench gpu result with a ttft workload: adds the client's TTFT and what it spent "
        "outside the engine (its requests matched to the trace's last first tokens, in order)",
    )
    p.add_argument("--slow-ms", type=float, default=None, help="also list the first tokens slower than this")


def _add_serve_parser(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser(
        "serve",
        help="drive running servers with a dataset and report throughput and latency percentiles",
        description="Sends synthetic token-id workloads over lightllm.v1.Generation/GenerateStream. "
        "See docs/bench.md for the metric definitions.",
    )
    p.add_argument(
        "--target",
        default="127.0.0.1:50051",
        help="host:port, or a comma-separated list: requests (conversations) go round-robin",
    )
    p.add_argument("--dataset", choices=("random", "shared-prefix", "multi-turn"), default="random")
    p.add_argument("--num-prompts", type=int, default=None, help="random dataset only (default 1000)")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths uniform in [len*(1-r), len*(1+r)], r in [0, 1)",
    )
    p.add_argument("--prefix-groups", type=int, default=50)
    p.add_argument("--prompts-per-group", type=int, default=20)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--num-conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--turn-input-len", type=int, default=128, help="new tokens per turn")
    p.add_argument("--output-len", type=int, default=128, help="shared-prefix and multi-turn")
    p.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests (conversations) per second, Poisson arrivals; inf: all at once",
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--ignore-eos", action="store_true", help="always generate the full output length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", type=Path, default=None, help="write the figures here")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def _add_sim_parser(bsub: argparse._SubParsersAction) -> None:
    w, c = sim.Workload(), sim.StepCost()
    p = bsub.add_parser(
        "sim",
        help="compare admission rules and per-step prefill policies by simulating the real scheduler",
        description="Drives the real Scheduler with a fake shard and a step-time model "
        "(BENCHMARKS.md, 'Admission by simulation'; docs/scheduling.md, 'Per-step time budget'); "
        "prints Markdown tables: KV and throughput, then latencies in simulated time.",
    )
    p.add_argument("--requests", type=int, default=w.requests)
    p.add_argument("--kv-tokens", type=int, default=200_000, help="KV pool size in tokens")
    p.add_argument("--max-running-requests", type=int, default=256)
    p.add_argument("--max-prefill-tokens", type=int, default=8192)
    p.add_argument("--admission", default="conservative,past-future", help="comma-separated rules")
    p.add_argument(
        "--quantiles", default="0.6,0.8,0.9", help="comma-separated admission quantiles for past-future"
    )
    p.add_argument("--prompt-min", type=int, default=w.prompt_min)
    p.add_argument("--prompt-max", type=int, default=w.prompt_max)
    p.add_argument("--output-median", type=float, default=w.output_median)
    p.add_argument("--output-p99", type=float, default=w.output_p99)
    p.add_argument("--max-new-tokens", type=int, default=w.max_new_tokens)
    p.add_argument(
        "--output-min", type=int, default=0, help="with --output-max: output lengths uniform, not lognormal"
    )
    p.add_argument("--output-max", type=int, default=0)
    p.add_argument(
        "--step-time-budgets",
        default=f"{SchedulerConfig.step_time_budget_ms:g}",
        help="comma-separated --step-time-budget-ms values to compare (0: fixed --max-prefill-tokens)",
    )
    p.add_argument("--min-prefill-tokens", type=int, default=SchedulerConfig.min_prefill_tokens)
    p.add_argument("--cost-noise", type=float, default=0.0, help="step times multiplied by exp(N(0, this))")
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="Poisson arrivals per second; inf: all at once"
    )
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument("--step-ms", type=float, default=c.a_ms, help="fixed cost of a step")
    p.add_argument("--row-ms", type=float, default=c.b_ms_per_row, help="per decode row")
    p.add_argument("--prefill-token-ms", type=float, default=c.c_ms_per_prefill_token)
    p.add_argument("--context-token-ms", type=float, default=c.d_ms_per_context_token)
    p.add_argument(
        "--prefill-step-ms", type=float, default=c.e_ms_per_prefill_step, help="extra when a step prefills"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", type=Path, default=None, help="write the figures here")


async def _vocab(address: str) -> int:
    from lightllm_grpc.proto import generation_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        info = await generation_pb2_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest())
        return info.vocab_size


def bench_main(args: argparse.Namespace) -> int:
    if args.bench_command == "serve":
        return serve_main(args)
    if args.bench_command == "sim":
        return sim_main(args)
    if args.bench_command == "trace":
        return trace_main(args.trace, args.ttft_json, args.slow_ms)
    return load_main(args)


def load_main(args: argparse.Namespace) -> int:
    vocab = args.vocab_size or run(_vocab(args.address))
    w = Workload(
        args.num_requests, args.input_len, args.output_len, args.concurrency or args.num_requests, vocab
    )
    result = run(run_load(args.address, w))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(
            f"{w.num_requests} requests (in {w.input_len} / out {w.output_len}, "
            f"concurrency {w.concurrency}): "
            f"{result.output_tokens_per_s:.1f} output tok/s, TTFT p50 {result.ttft_p50_ms:.1f} ms, "
            f"TPOT p50 {result.tpot_p50_ms:.2f} ms over {result.seconds:.2f} s"
        )
    return 0


def serve_workload(args: argparse.Namespace, info: pb.ModelInfo) -> list[Conversation]:
    """The dataset the flags ask for, drawn from the served model's vocabulary."""
    vocab = Vocab.of_model(info.vocab_size, tuple(info.eos_token_ids))
    if args.dataset == "random":
        n = 1000 if args.num_prompts is None else args.num_prompts
        reqs = random_requests(
            n, args.random_input_len, args.random_output_len, args.random_range_ratio, vocab, args.seed
        )
        return as_conversations(reqs)
    if args.dataset == "shared-prefix":
        reqs = shared_prefix_requests(
            args.prefix_groups,
            args.prompts_per_group,
            args.prefix_len,
            args.suffix_len,
            args.output_len,
            vocab,
            args.seed,
        )
        return as_conversations(reqs)
    return multi_turn_conversations(
        args.num_conversations, args.turns, args.turn_input_len, args.output_len, vocab, args.seed
    )


def _jsonable(value: object) -> object:
    # JSON has no infinity; an unbounded rate is written as the string the flag accepts.
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return str(value) if isinstance(value, Path) else value


def serve_main(args: argparse.Namespace) -> int:
    if args.num_prompts is not None and args.dataset != "random":
        print("bench serve: --num-prompts applies to the random dataset only", file=sys.stderr)
        return 2
    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    if not targets:
        print("bench serve: --target names no server", file=sys.stderr)
        return 2
    try:
        traffic = Traffic(
            args.request_rate, args.max_concurrency, args.ignore_eos, args.seed, not args.disable_tqdm
        )
        summary, info = run(serve_benchmark(targets, lambda model: serve_workload(args, model), traffic))
    except ValueError as exc:
        print(f"bench serve: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:  # GetModelInfo failed: no server there
        print(f"bench serve: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    if args.json_path is not None:
        flags = {k: _jsonable(v) for k, v in vars(args).items() if k not in ("command", "bench_command")}
        record = {"model": info.name, "targets": targets, "args": flags, **summary.as_dict()}
        args.json_path.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if summary.completed else 1


def _sim_configs(args: argparse.Namespace, cost: sim.StepCost) -> list[sim.SimConfig]:
    rules = [r.strip() for r in args.admission.split(",") if r.strip()]
    quantiles = [float(q) for q in args.quantiles.split(",") if q.strip()]
    budgets = [float(b) for b in args.step_time_budgets.split(",") if b.strip()]
    configs = []
    for rule in rules:
        # The quantile only matters to past-future: conservative runs once.
        for q in quantiles if rule == "past-future" else [SchedulerConfig.admission_quantile]:
            for budget in budgets:
                configs.append(
                    sim.SimConfig(
                        kv_tokens=args.kv_tokens,
                        max_running_requests=args.max_running_requests,
                        max_prefill_tokens=args.max_prefill_tokens,
                        admission=rule,
                        admission_quantile=q,
                        prefix_cache=not args.no_prefix_cache,
                        cost=cost,
                        step_time_budget_ms=budget,
                        min_prefill_tokens=args.min_prefill_tokens,
                        cost_noise=args.cost_noise,
                    )
                )
    return configs


def sim_main(args: argparse.Namespace) -> int:
    try:
        workload = sim.Workload(
            args.requests,
            args.prompt_min,
            args.prompt_max,
            args.output_median,
            args.output_p99,
            args.max_new_tokens,
            args.request_rate,
            args.seed,
            args.output_min,
            args.output_max,
        )
        cost = sim.StepCost(
            args.step_ms, args.row_ms, args.prefill_token_ms, args.context_token_ms, args.prefill_step_ms
        )
        configs = _sim_configs(args, cost)
        for cfg in configs:
            cfg.scheduler_config()  # validates the rule and quantile before any run
    except ValueError as exc:
        print(f"bench sim: {exc}", file=sys.stderr)
        return 2
    reqs = sim.sample_workload(workload)
    results = []
    for cfg in configs:
        results.append(sim.simulate(reqs, cfg, workload.max_new_tokens))
        print(f"{cfg.label}, {cfg.prefill_policy}: done ({results[-1].steps} steps)", file=sys.stderr)
    print(sim.format_table(results))
    print()
    print(sim.format_latency_table(results))
    if args.json_path is not None:
        flags = {k: _jsonable(v) for k, v in vars(args).items() if k not in ("command", "bench_command")}
        record = {"args": flags, "results": [r.as_dict() for r in results]}
        args.json_path.write_text(json.dumps(record, indent=2) + "\n")
    return 0
