"""The ``lightllm-grpc`` command: ``serve``, ``shard``, ``generate`` and ``bench``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from lightllm_grpc.config import (
    ADMISSION_RULES,
    DEFAULT_ROWS,
    DEVICES,
    DTYPES,
    KV_CACHE_DTYPES,
    LARGE_DEVICE_GIB,
    LARGE_DEVICE_ROWS,
    LOAD_FORMATS,
    QUANTIZATIONS,
    SCHEDULING_POLICIES,
    SchedulerConfig,
    ServerConfig,
    ShardConfig,
    check_tls_flags,
)

AUTH_TOKEN_ENV = "LIGHTLLM_AUTH_TOKEN"


def _add_engine_flags(p: argparse._ActionsContainer) -> None:
    """What a shard is built with: ``serve`` passes them to the shards it spawns, and a shard
    started by hand (``lightllm-grpc shard``) takes the same flags."""
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda when present")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: the checkpoint's")
    p.add_argument(
        "--load-format",
        choices=LOAD_FORMATS,
        default="auto",
        help="dummy: random weights from config.json alone (benchmarks)",
    )
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="fp8: W8A8 FP8 linear layers, quantized at load (None: the checkpoint's own; "
        "FP8 checkpoints are detected from config.json)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default="auto",
        help="auto: the model dtype; fp8_e4m3: e4m3 K/V with per-layer scales from the checkpoint "
        "(1.0 without), twice the tokens in the same memory (docs/quantization.md)",
    )
    p.add_argument(
        "--max-total-tokens",
        type=int,
        default=None,
        help="KV pool size in tokens (None: sized from free memory)",
    )
    p.add_argument(
        "--max-running-requests",
        type=int,
        default=None,
        help=f"largest batch (the shards' req_to_token rows); default: {LARGE_DEVICE_ROWS} on a GPU "
        f"of {LARGE_DEVICE_GIB} GiB or more, else {DEFAULT_ROWS}",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=8192,
        help="prompt tokens prefilled per step; longer prompts are chunked (shards size memory for it)",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="cap the context length")
    p.add_argument(
        "--gpu-memory-fraction", type=float, default=0.9, help="share of GPU memory for weights and KV"
    )
    p.add_argument(
        "--no-cuda-graphs", action="store_true", help="run decode, prefill and mixed steps eagerly on GPU"
    )
    p.add_argument(
        "--cuda-graph-max-prefill-tokens",
        type=int,
        default=ShardConfig.cuda_graph_max_prefill_tokens,
        help="one-prompt prefills of up to this many new tokens replay CUDA graphs captured per "
        "token-count bucket (shorter time to first token); 0: prefill always runs eagerly",
    )
    p.add_argument(
        "--cuda-graph-max-mixed-tokens",
        type=int,
        default=ShardConfig.cuda_graph_max_mixed_tokens,
        help="other prefill steps and mixed (prefill + decode) steps of up to this many tokens run "
        "as piecewise CUDA graphs, attention eager between them (less host time per step); "
        "0: they run eagerly",
    )
    p.add_argument(
        "--disable-custom-all-reduce",
        action="store_true",
        help="TP on GPU: NCCL for every all-reduce, not the P2P one-/two-shot kernels for small ones",
    )
    p.add_argument(
        "--disable-fused-all-reduce",
        action="store_true",
        help="TP on GPU: keep the P2P all-reduce a kernel of its own, not folded into the norm "
        "kernels that read its sum (the barrier-free path for the smallest messages)",
    )


def _add_tls_flags(p: argparse._ActionsContainer) -> None:
    """A TLS server's flags, the same for ``serve`` (clients) and ``shard`` (its coordinator)."""
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="PEM CA bundle: mutual TLS, clients must present a certificate it signed",
    )


def _engine_config(args: argparse.Namespace, model: Path, tp_size: int) -> ShardConfig:
    return ShardConfig(
        model=model,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        tp_size=tp_size,
        max_total_tokens=args.max_total_tokens,
        max_rows=args.max_running_requests,
        max_context=args.max_model_len,
        gpu_memory_fraction=args.gpu_memory_fraction,
        cuda_graphs=not args.no_cuda_graphs,
        cuda_graph_max_prefill_tokens=args.cuda_graph_max_prefill_tokens,
        cuda_graph_max_mixed_tokens=args.cuda_graph_max_mixed_tokens,
        custom_all_reduce=not args.disable_custom_all_reduce,
        fused_all_reduce=not args.disable_fused_all_reduce,
        max_prefill_tokens=args.max_prefill_tokens,
    )


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    # Every flag's --help shows its default.
    p = sub.add_parser(
        "serve", help="serve a model over gRPC", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="Hugging Face model folder (config.json, *.safetensors, tokenizer); "
        "None: the embedded tiny random-weight Llama",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (API, health, reflection)")
    _add_engine_flags(p.add_argument_group("engine (the same flags as `shard`)"))
    _add_sharding_flags(p.add_argument_group("tensor parallelism"))
    _add_scheduling_flags(p.add_argument_group("scheduling"))
    _add_request_flags(p.add_argument_group("requests"))
    _add_security_flags(p.add_argument_group("security"))
    _add_failure_flags(p.add_argument_group("stuck steps and shutdown"))
    _add_observability_flags(p.add_argument_group("observability"))
    _add_connection_flags(p.add_argument_group("connections"))


def _add_sharding_flags(g: argparse._ActionsContainer) -> None:
    """Where the shards are: spawned here, or already running (``--shards``) and how to reach them."""
    g.add_argument("--tp-size", type=int, default=1, help="tensor-parallel shards (one per device)")
    g.add_argument(
        "--shards",
        default=None,
        help="attach to shards already running (lightllm-grpc shard), HOST:PORT or unix:///path, "
        "comma-separated in rank order, instead of spawning --tp-size of them here; --model must "
        "still name the model (for its tokenizer). docs/multihost.md",
    )
    g.add_argument(
        "--shard-tls-ca",
        type=Path,
        default=None,
        help="with --shards: reach TCP shards over TLS, verifying their certificates against this "
        "PEM CA bundle (shards started with --tls-cert)",
    )
    g.add_argument(
        "--shard-tls-cert",
        type=Path,
        default=None,
        help="PEM client certificate shown to shards that ask for one (--tls-client-ca): mutual TLS",
    )
    g.add_argument("--shard-tls-key", type=Path, default=None, help="PEM private key of --shard-tls-cert")


def _add_scheduling_flags(g: argparse._ActionsContainer) -> None:
    """Admission, batching and the per-step prefill budget (docs/scheduling.md)."""
    g.add_argument(
        "--max-waiting-requests", type=int, default=4096, help="queue bound; past it RESOURCE_EXHAUSTED"
    )
    g.add_argument(
        "--step-time-budget-ms",
        type=float,
        default=SchedulerConfig.step_time_budget_ms,
        help="a step with running requests takes only the prefill tokens a step-time model, learned "
        "from measured steps, says fit in this many ms (bounds TPOT; docs/scheduling.md); "
        "0: off, every step prefills up to --max-prefill-tokens",
    )
    g.add_argument(
        "--min-prefill-tokens",
        type=int,
        default=SchedulerConfig.min_prefill_tokens,
        help="with --step-time-budget-ms: prompt tokens a step prefills at least while prompts wait",
    )
    g.add_argument(
        "--default-max-new-tokens", type=int, default=256, help="when a request sets no max_new_tokens"
    )
    g.add_argument(
        "--max-stream-messages-per-step",
        type=int,
        default=128,
        help="past this many running streams, tokens are coalesced into fewer messages",
    )
    g.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="do not reuse cached prefixes (every prompt is prefilled in full)",
    )
    g.add_argument(
        "--admission",
        choices=ADMISSION_RULES,
        default="past-future",
        help="past-future: admit while the batch's predicted KV peak fits (preempting on a miss); "
        "conservative: reserve every request's max_new_tokens",
    )
    g.add_argument(
        "--admission-quantile",
        type=float,
        default=0.6,
        help="past-future: quantile of past output lengths taken as a request's length "
        "(higher = fewer preemptions, smaller batches)",
    )
    g.add_argument(
        "--scheduling-policy",
        choices=SCHEDULING_POLICIES,
        default="fcfs",
        help="fcfs, or priority (GenerateRequest.priority, lower first)",
    )
    g.add_argument("--max-n", type=int, default=16, help="most completions per request")
    g.add_argument(
        "--cascade-min-shared-tokens",
        type=int,
        default=32768,
        help="decode steps whose rows share cached prefixes of at least this many tokens in all "
        "read each shared prefix once per group of rows (cascade attention); a huge value turns "
        "it off",
    )


def _add_request_flags(g: argparse._ActionsContainer) -> None:
    """How requests' text and constraints are read, and the model's name."""
    g.add_argument(
        "--served-model-name", default=None, help="name in GetModelInfo and metrics (None: the checkpoint's)"
    )
    g.add_argument(
        "--chat-content-special-tokens",
        choices=("plain", "parse"),
        default="plain",
        help="special-token text (e.g. </s>) inside chat message content: plain = tokenized as the "
        "characters it is, so users cannot forge turns (default); parse = as control tokens, like "
        "Hugging Face. Text prompts always parse them",
    )
    g.add_argument(
        "--json-whitespace",
        choices=("any", "compact"),
        default="any",
        help="whitespace JSON constraints allow between elements: any (at most 32 characters "
        "between two elements; default) or compact (only the separators ', ' and ': '), for "
        "models that would otherwise pad their JSON with whitespace",
    )


def _add_failure_flags(g: argparse._ActionsContainer) -> None:
    """When the server calls itself stuck, and how it drains (docs/reliability.md)."""
    g.add_argument(
        "--step-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for one step's result before the shards count as stuck: every call "
        "then fails UNAVAILABLE and the server exits 1 (the first step and warm-up are exempt; "
        "0 = wait forever)",
    )
    g.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="readiness (grpc.health.v1, service lightllm.v1.Generation) turns NOT_SERVING when "
        "requests are pending and no step completed for this many seconds (0 = never)",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM: readiness NOT_SERVING and new calls UNAVAILABLE at once; live requests "
        "run on for up to this many seconds, then end with FINISH_REASON_ABORT (a second SIGTERM "
        "or SIGINT ends them at once)",
    )


def _add_observability_flags(g: argparse._ActionsContainer) -> None:
    """Metrics, traces and the step trace (docs/operations.md)."""
    g.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics (GET /metrics) on this port of --host; off when unset",
    )
    g.add_argument(
        "--otlp-traces-endpoint",
        default=None,
        help="export a span per request (queue, prefill, decode) over OTLP/gRPC to this host:port, "
        "under the caller's W3C trace context; needs the tracing extra",
    )
    g.add_argument(
        "--step-trace",
        type=Path,
        default=None,
        metavar="PATH",
        help="write one JSON line per completed step to PATH (truncated at start): its send and "
        "result times, shard time, delivery time, batch and the requests that got their first "
        "token, to tell where a latency tail went (docs/operations.md); off when unset",
    )


def _add_connection_flags(g: argparse._ActionsContainer) -> None:
    """HTTP/2 keepalive and connection age, for meshes and L4 balancers."""
    g.add_argument(
        "--keepalive-time",
        type=float,
        default=60.0,
        help="seconds between the server's HTTP/2 pings on an idle connection (finds dead peers "
        "behind NATs and L4 balancers)",
    )
    g.add_argument(
        "--keepalive-timeout", type=float, default=20.0, help="seconds to wait for a ping's answer"
    )
    g.add_argument(
        "--max-connection-age",
        type=float,
        default=1800.0,
        help="seconds after which a connection gets GOAWAY so clients reconnect and L4 balancers "
        "rebalance (0 = never); calls open then run on (see --max-connection-age-grace)",
    )
    g.add_argument(
        "--max-connection-age-grace",
        type=float,
        default=0.0,
        help="seconds calls open at GOAWAY may run on before they are cut (0 = to their end: a "
        "long prefill or stream is never cut for age)",
    )


def _add_security_flags(g: argparse._ActionsContainer) -> None:
    """TLS for clients and the bearer tokens every call but health needs."""
    _add_tls_flags(g)
    g.add_argument(
        "--auth-token-file",
        type=Path,
        default=None,
        help=f"file of bearer tokens (one per line); every call but health then needs "
        f"'authorization: Bearer <token>'. Also ${AUTH_TOKEN_ENV}. No command-line token: ps shows it",
    )


def _shard_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shard",
        help="run one tensor-parallel shard by hand (multi-host; see docs/multihost.md)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="Hugging Face model folder on this host")
    p.add_argument("--rank", type=int, required=True, help="this shard's rank, 0..world-size-1")
    p.add_argument("--world-size", type=int, required=True, help="number of shards (the TP size)")
    p.add_argument(
        "--dist-init",
        default=None,
        help="torch.distributed rendezvous every shard of the group names, tcp://HOST:PORT on "
        "rank 0's host (needed when --world-size > 1)",
    )
    p.add_argument(
        "--listen",
        required=True,
        help="where the coordinator reaches this shard: HOST:PORT or unix:///path. Without "
        "--tls-cert the shard protocol is plaintext and unauthenticated: listen on a private "
        "network only; with --tls-client-ca only coordinators holding a certificate it signed get in",
    )
    _add_tls_flags(p)  # TCP only: a unix socket is guarded by its file's permissions
    _add_engine_flags(p)  # a shard started by hand takes the coordinator's values for these


def shard_config(args: argparse.Namespace) -> ShardConfig:
    if not 0 <= args.rank < args.world_size:
        raise ValueError(f"--rank {args.rank} must be in [0, --world-size {args.world_size})")
    if args.world_size > 1 and not args.dist_init:
        raise ValueError("--world-size > 1 needs --dist-init tcp://HOST:PORT (rank 0's host)")
    check_tls_flags(args.tls_cert, args.tls_key, args.tls_client_ca)
    if args.tls_cert is not None and args.listen.startswith("unix:"):
        raise ValueError(
            "--tls-cert is for a TCP --listen; a unix socket is guarded by its file's permissions"
        )
    return _engine_config(args, args.model, args.world_size)


def shard_credentials(args: argparse.Namespace):
    """The shard's TLS server credentials (None: plaintext); flags already checked."""
    if args.tls_cert is None:
        return None
    from lightllm_grpc.server.security import TlsFiles

    return TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca).credentials()


def _shard(args: argparse.Namespace) -> int:
    """Exit codes: 0 the coordinator's step stream ended, 2 bad flags."""
    from lightllm_grpc.aio import run
    from lightllm_grpc.shard.__main__ import serve_shard

    try:
        cfg = shard_config(args)
        credentials = shard_credentials(args)
    except (ValueError, OSError) as exc:
        print(f"lightllm-grpc shard: {exc}", file=sys.stderr)
        return 2
    run(serve_shard(cfg, args.listen, args.rank, args.world_size, args.dist_init, credentials))
    return 0


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream a completion from a running server")
    p.add_argument("--address", default="127.0.0.1:50051")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--chat", help="a user message, rendered with the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--timeout", type=float, default=600.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightllm-grpc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _shard_parser(sub)
    _generate_parser(sub)
    from lightllm_grpc.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def server_config(args: argparse.Namespace) -> ServerConfig:
    from lightllm_grpc.scheduler.remote_shards import parse_addresses

    model = args.model
    if model is None:
        from lightllm_grpc.models.default_model import ensure_default_model

        model = ensure_default_model()
        logging.getLogger("lightllm_grpc").info(
            "no --model given: serving the embedded default, a 4-layer Llama with RANDOM weights "
            "and a locally trained 2048-token BPE tokenizer (its output is gibberish) from %s",
            model,
        )
    shard = _engine_config(args, model, args.tp_size)
    sched = SchedulerConfig(
        max_running_requests=args.max_running_requests,
        max_waiting_requests=args.max_waiting_requests,
        max_prefill_tokens=args.max_prefill_tokens,
        step_time_budget_ms=args.step_time_budget_ms,
        min_prefill_tokens=args.min_prefill_tokens,
        default_max_new_tokens=args.default_max_new_tokens,
        max_messages_per_step=args.max_stream_messages_per_step,
        prefix_cache=not args.no_prefix_cache,
        admission=args.admission,
        admission_quantile=args.admission_quantile,
        scheduling_policy=args.scheduling_policy,
        max_n=args.max_n,
        cascade_min_shared_tokens=args.cascade_min_shared_tokens,
    )
    return ServerConfig(
        shard=shard,
        scheduler=sched,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        step_timeout_s=args.step_timeout or None,
        chat_content_special_tokens=args.chat_content_special_tokens,
        json_whitespace=args.json_whitespace,
        stall_timeout_s=args.stall_timeout or None,
        metrics_port=args.metrics_port,
        otlp_traces_endpoint=args.otlp_traces_endpoint,
        step_trace=args.step_trace,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_tokens=_auth_tokens(args.auth_token_file),
        drain_timeout_s=args.drain_timeout,
        keepalive_time_s=args.keepalive_time,
        keepalive_timeout_s=args.keepalive_timeout,
        max_connection_age_s=args.max_connection_age or None,
        max_connection_age_grace_s=args.max_connection_age_grace or None,
        shard_addresses=tuple(parse_addresses(args.shards)) if args.shards else (),
        shard_tls_ca=args.shard_tls_ca,
        shard_tls_cert=args.shard_tls_cert,
        shard_tls_key=args.shard_tls_key,
    )


def _auth_tokens(path: Path | None) -> tuple[bytes, ...]:
    from lightllm_grpc.server.security import load_tokens

    try:
        return load_tokens(path, os.environ.get(AUTH_TOKEN_ENV))
    except OSError as exc:
        raise ValueError(f"--auth-token-file {path}: {exc.strerror}") from exc


def _serve(args: argparse.Namespace) -> int:
    """Exit codes: 0 stopped by a signal, 1 the engine died while serving, 2 cannot start."""
    from lightllm_grpc.aio import run
    from lightllm_grpc.server.app import StartupError, serve

    try:
        cfg = server_config(args)
    except ValueError as exc:
        print(f"lightllm-grpc serve: {exc}", file=sys.stderr)
        return 2
    try:
        code = run(serve(cfg))
    except StartupError as exc:
        print(f"lightllm-grpc serve: {exc}", file=sys.stderr)
        return 2
    # Everything is stopped and flushed by now; exit without joining stray non-daemon threads
    # (a gRPC or executor thread must not keep a stopped server's process alive).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("LIGHTLLM_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args = build_parser().parse_args(argv)
    from lightllm_grpc.aio import run

    if args.command == "serve":
        return _serve(args)
    if args.command == "shard":
        return _shard(args)
    if args.command == "generate":
        from lightllm_grpc.client.generate import generate_cli

        return run(generate_cli(args))
    from lightllm_grpc.bench.cli import bench_main

    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
