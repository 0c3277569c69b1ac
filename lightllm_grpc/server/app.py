"""Assembles the coordinator: shards, tokenizer, scheduler, engine and the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc

from lightllm_grpc.config import ServerConfig
from lightllm_grpc.gc_freeze import freeze_startup_objects
from lightllm_grpc.models.config import ModelConfig
from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler import sampling
from lightllm_grpc.scheduler.engine import Engine
from lightllm_grpc.scheduler.output_processor import OutputProcessor
from lightllm_grpc.scheduler.remote_shards import (
    LivenessProbe,
    RemoteShards,
    ShardMismatch,
    check_agreement,
    describe,
    warn_uneven_capacity,
)
from lightllm_grpc.scheduler.sampling import SamplingOptions
from lightllm_grpc.scheduler.scheduler import Scheduler
from lightllm_grpc.scheduler.shard_client import ShardClient, ShardError, ShardProcesses, ShardRefused
from lightllm_grpc.scheduler.step_trace import StepTrace
from lightllm_grpc.server.health import Health, enable_reflection
from lightllm_grpc.server.metrics import MetricsCollector, MetricsServer, RequestMetrics, metrics_registry
from lightllm_grpc.server.request_builder import Limits, RequestBuilder
from lightllm_grpc.server.security import Authenticator, AuthInterceptor, TlsFiles, shard_channel_credentials
from lightllm_grpc.server.servicer import GenerationService, StaticInfo
from lightllm_grpc.server.tokenizer import PromptTokenizer
from lightllm_grpc.server.tracing import FanOut, Tracing
from lightllm_grpc.server.wire import LateService, add_generation_service
from lightllm_grpc.text.detokenizer import Detokenizer

log = logging.getLogger(__name__)
SHARD_START_TIMEOUT_S = 1800.0
SHARD_WATCH_INTERVAL_S = 0.5
UNREQUESTED_CALL_TIMEOUT_S = 3600
DRAIN_POLL_S = 0.05
STOP_TIMEOUT_S = 8.0  # the longest the final stop (after any drain) may take
# How long shards get to exit after SIGTERM before SIGKILL: healthy ones (a normal stop), and
# those of a dead engine, which may be stuck in a device call (a step timeout) and would only
# hold the supervisor's restart back.
SHARD_EXIT_S, DEAD_SHARD_EXIT_S = 5.0, 1.0


async def _wait(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


class Shutdown:
    """What the signals asked for. SIGTERM (Kubernetes, systemd) drains; a second SIGTERM or
    SIGINT (Ctrl-C) ends live streams at once, as gunicorn treats TERM and INT."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.hurry = asyncio.Event()
        self.drain = False

    def terminate(self) -> None:
        if self.requested.is_set():
            self.hurry.set()
        self.drain = True
        self.requested.set()

    def interrupt(self) -> None:
        self.hurry.set()
        self.requested.set()


@dataclass
class Coordinator:
    server: grpc.aio.Server
    engine: Engine
    shards: ShardClient
    procs: ShardProcesses | RemoteShards
    port: int
    health: Health
    frontend: Frontend

    async def drain(self, timeout: float, hurry: asyncio.Event) -> None:
        """Stop taking requests (readiness NOT_SERVING, new calls UNAVAILABLE) and let live ones
        finish for up to ``timeout`` seconds, or until ``hurry`` is set or the engine dies;
        ``stop`` then ends what is left with FINISH_REASON_ABORT."""
        self.frontend.api.target.draining = True
        await self.health.drain()
        live = self.engine.scheduler.live
        log.info("draining: %d live completion(s), waiting up to %gs", len(live()), timeout)
        deadline = asyncio.get_running_loop().time() + timeout
        while live() and not hurry.is_set() and not self.engine.dead:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                log.warning("drain timeout: ending %d completion(s) with FINISH_REASON_ABORT", len(live()))
                return
            await _wait(hurry, min(left, DRAIN_POLL_S))
        if live():
            log.warning("drain cut short: ending %d completion(s) with FINISH_REASON_ABORT", len(live()))

    async def stop(self, grace: float = 2.0) -> None:
        # Live streams get their last message (FINISH_REASON_ABORT) before the server stops;
        # the grace period lets the handlers write it.
        self.engine.drain()
        await self.health.stop()  # NOT_SERVING everywhere; Watch callers see it before the end
        await self.server.stop(grace)
        await self.frontend.stop_metrics()
        await self.engine.stop()
        await self.shards.close()
        # On a thread: a blocking wait here would also block the stop's own timeout.
        await asyncio.to_thread(self.procs.stop, DEAD_SHARD_EXIT_S if self.engine.dead else SHARD_EXIT_S)


def _model_info(
    cfg: ServerConfig, info: shard_pb2.InfoResponse, tok: PromptTokenizer, defaults: SamplingOptions
) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=cfg.served_model_name or info.model_name,
        architecture=info.architecture,
        context_length=info.max_context,
        vocab_size=info.vocab_size,
        eos_token_ids=list(info.eos_token_ids),
        dtype=info.dtype,
        kv_cache_dtype=info.kv_cache_dtype,
        tp_size=info.world_size,
        has_chat_template=tok.has_chat_template,
        default_sampling=sampling.to_params(defaults),
    )


async def _start_shards(
    cfg: ServerConfig,
) -> tuple[ShardProcesses | RemoteShards, ShardClient, list[shard_pb2.InfoResponse]]:
    """Spawn the shards here, or attach to those --shards lists; either way check, log and warm them."""
    remote = bool(cfg.shard_addresses)
    procs = RemoteShards(list(cfg.shard_addresses)) if remote else ShardProcesses(cfg.shard)
    procs.start()
    tls = None
    if cfg.shard_tls_ca is not None:
        tls = shard_channel_credentials(cfg.shard_tls_ca, cfg.shard_tls_cert, cfg.shard_tls_key)
    client = ShardClient(procs.addresses, remote=remote, tls=tls)
    try:
        if remote:
            how = ("mutual TLS" if cfg.shard_tls_cert else "TLS") if tls else "plaintext"
            log.info(
                "attaching to %d shard(s) (%s): %s", len(procs.addresses), how, ", ".join(procs.addresses)
            )
        try:
            await client.wait_ready(
                procs if isinstance(procs, ShardProcesses) else None, SHARD_START_TIMEOUT_S
            )
        except ShardRefused as exc:
            raise StartupError(str(exc)) from exc
        infos = await client.info()
        if remote:
            _check_remote(cfg, procs.addresses, infos)
        for line in describe(procs.addresses, infos):
            log.info("%s", line)
        warn_uneven_capacity(infos)
        sched = cfg.scheduler
        rows = sched.running_rows(min(i.max_rows for i in infos))
        seconds = await client.warmup(sched.max_prefill_tokens, rows)
        log.info("shards warmed up in %.1fs", seconds)
    except BaseException:
        await client.close()
        procs.stop()
        raise
    return procs, client, infos


def _check_remote(cfg: ServerConfig, addresses: list[str], infos: list[shard_pb2.InfoResponse]) -> None:
    model = ModelConfig.from_pretrained(cfg.shard.model)
    try:
        check_agreement(addresses, infos, model.architecture, model.vocab_size)
    except ShardMismatch as exc:
        raise StartupError(str(exc)) from exc
    rows, asked = min(i.max_rows for i in infos), cfg.scheduler.max_running_requests
    if asked is not None and asked > rows:
        raise StartupError(
            f"--max-running-requests {asked} exceeds the shards' "
            f"{rows} rows; start the shards with --max-running-requests of at least it"
        )


def _engine(
    cfg: ServerConfig, infos: list[shard_pb2.InfoResponse], tok: PromptTokenizer, client: ShardClient
):
    info = infos[0]
    # The smallest pool and row table: slot and row ids the coordinator hands out must be
    # valid on every shard (shards on other hosts may have sized theirs differently).
    capacity = min(i.kv_capacity for i in infos)
    rows = min(i.max_rows for i in infos)
    eos = tuple(info.eos_token_ids)
    scheduler = Scheduler(cfg.scheduler, capacity, rows, eos)
    outputs = OutputProcessor(
        Detokenizer(tok.backend), eos, info.max_context, scheduler.finish, cfg.scheduler.max_messages_per_step
    )
    sched = cfg.scheduler
    limits = Limits(
        info.vocab_size,
        info.max_context,
        capacity,
        sched.default_max_new_tokens,
        sched.max_n,
        sampling.model_defaults(cfg.shard.model),
    )
    engine = Engine(scheduler, outputs, client, step_timeout=cfg.step_timeout_s, trace=_step_trace(cfg))
    return engine, RequestBuilder(tok, limits, compact_json=cfg.json_whitespace == "compact")


def _step_trace(cfg: ServerConfig) -> StepTrace | None:
    if cfg.step_trace is None:
        return None
    try:
        trace = StepTrace.open(cfg.step_trace)
    except OSError as exc:
        raise StartupError(f"--step-trace {cfg.step_trace}: {exc.strerror or exc}") from exc
    log.info("step trace: a JSON line per completed step to %s", cfg.step_trace)
    return trace


class StartupError(RuntimeError):
    """The server cannot start as configured; the message is the one line a person needs."""


def _connection_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    """Keepalive and connection age (why each default: docs/operations.md)."""
    opts = [
        ("grpc.keepalive_time_ms", int(cfg.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout_s * 1000)),
        # Clients may ping this often, also with no call open, without a GOAWAY (too_many_pings).
        ("grpc.http2.min_ping_interval_without_data_ms", int(cfg.keepalive_min_client_interval_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if cfg.max_connection_age_s:
        opts.append(("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)))
    if cfg.max_connection_age_grace_s:
        opts.append(("grpc.max_connection_age_grace_ms", int(cfg.max_connection_age_grace_s * 1000)))
    return opts


def _tls(cfg: ServerConfig) -> TlsFiles | None:
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    return TlsFiles(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)


def _bound_server(
    cfg: ServerConfig, interceptors: list[grpc.aio.ServerInterceptor]
) -> tuple[grpc.aio.Server, int]:
    """A gRPC server already bound to its port: a bad address fails before any model work."""
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            *_connection_options(cfg),
            # Without this a second server on the same port starts too and silently takes
            # part of the new connections; with it, the second one fails to bind.
            ("grpc.so_reuseport", 0),
            # gRPC core cancels a call that waits more than 30 s (its default) between arriving
            # and being picked up by the Python server, which picks calls up one per event-loop
            # turn: a burst of 1,500 streams on a busy loop got a few unasked CANCELLEDs. The
            # waiting queue's limit and each client's deadline bound the wait instead.
            ("grpc.server_max_unrequested_time_in_server", UNREQUESTED_CALL_TIMEOUT_S),
        ],
    )
    tls = _tls(cfg)
    address = f"{cfg.host}:{cfg.port}"
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, tls.credentials())
    except RuntimeError as exc:
        raise StartupError(
            f"cannot listen on {cfg.host}:{cfg.port}: the port is in use or the address is not on "
            "this machine"
        ) from exc
    return server, port


# A Hugging Face tokenizer needs at least one of these (fast, SentencePiece, BPE vocabulary, or
# the config that names the others).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _check_model(folder: Path) -> None:
    """Refuse a model folder we cannot serve in one line, before any shard starts."""
    if not folder.is_dir():
        raise StartupError(f"--model {folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise StartupError(
            f"--model {folder} has no config.json; it must be a Hugging Face model folder "
            "(config.json, *.safetensors, tokenizer files)"
        )
    try:
        ModelConfig.from_pretrained(folder)
    except KeyError as exc:
        raise StartupError(f"--model {folder}: config.json has no {exc}") from exc
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise StartupError(f"--model {folder}: config.json cannot be served: {exc}") from exc
    # The tokenizer loads while the shards start; a folder with no tokenizer at all is refused first.
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise StartupError(
            f"--model {folder}: cannot load its tokenizer: it has none of {', '.join(TOKENIZER_FILES)}"
        )


def _tokenizer(folder: Path, chat_content_special_tokens: str) -> PromptTokenizer:
    try:
        return PromptTokenizer(folder, chat_content_special_tokens)
    except Exception as exc:  # transformers raises many types, with pages of text
        first = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise StartupError(f"--model {folder}: cannot load its tokenizer: {first}") from exc


@dataclass
class Frontend:
    """What serves before the model loads: health, reflection, the late-bound API, metrics."""

    server: grpc.aio.Server
    port: int
    health: Health
    api: LateService
    recorder: RequestMetrics
    collector: MetricsCollector
    auth: Authenticator
    metrics: MetricsServer | None = None
    metrics_port: int | None = None
    tracing: Tracing | None = None

    async def stop_metrics(self) -> None:
        if self.metrics is not None:
            await self.metrics.stop()
        if self.tracing is not None:
            self.tracing.shutdown()  # exports the spans still queued

    async def stop(self) -> None:
        await self.health.stop()
        await self.server.stop(0)
        await self.stop_metrics()

    def serve_engine(self, engine: Engine, service: GenerationService, model_name: str) -> None:
        if self.tracing is not None:
            engine.observe(FanOut(self.recorder, self.tracing.observer()))
            service.on_submit = self.tracing.on_submit
        else:
            engine.observe(self.recorder)
        self.collector.engine, self.collector.model_name = engine, model_name
        self.collector.kv_cache_dtype = service.info.model.kv_cache_dtype
        self.api.target = service
        self.health.engine = engine


async def _start_frontend(cfg: ServerConfig) -> Frontend:
    """Bind and start the gRPC server (and metrics) before any model work, so health answers
    from the start (liveness SERVING, readiness NOT_SERVING), ``Generation`` calls are
    UNAVAILABLE and a taken port fails at once."""
    recorder = RequestMetrics()
    tls = _tls(cfg)
    auth = Authenticator(cfg.auth_tokens, mutual_tls=tls is not None and tls.client_ca is not None)
    refused = functools.partial(recorder.on_error, grpc.StatusCode.UNAUTHENTICATED)
    interceptors: list[grpc.aio.ServerInterceptor] = [AuthInterceptor(auth, refused)] if auth.tokens else []
    tracing = None
    if cfg.otlp_traces_endpoint:
        tracing = Tracing(cfg.otlp_traces_endpoint, cfg.served_model_name or "lightllm-grpc")
        interceptors.insert(0, tracing.interceptor())  # RPC spans from the callers' trace context
    server, port = _bound_server(cfg, interceptors)
    health = Health(cfg.stall_timeout_s)
    health.add_to(server)
    enable_reflection(server)
    api = add_generation_service(LateService(), server)
    api.on_error = recorder.on_error
    collector = MetricsCollector(cfg.served_model_name or cfg.shard.model.name, recorder)
    front = Frontend(server, port, health, api, recorder, collector, auth, tracing=tracing)
    if cfg.metrics_port is not None:
        check = auth.allows if auth.tokens else None  # the API's rule: the token when auth is on
        ssl_context = tls.ssl_context() if tls is not None else None
        front.metrics = MetricsServer(metrics_registry(collector), check, ssl_context)
        try:
            front.metrics_port = await front.metrics.start(cfg.host, cfg.metrics_port)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {cfg.host}:{cfg.metrics_port}: {exc}") from exc
    await server.start()
    await health.start()
    return front


async def start_coordinator(cfg: ServerConfig) -> Coordinator:
    front = await _start_frontend(cfg)
    server, port, health = front.server, front.port, front.health
    try:
        _check_model(cfg.shard.model)
        # The tokenizer loads on a thread while the shards start (they take longer).
        loading = asyncio.ensure_future(
            asyncio.to_thread(_tokenizer, cfg.shard.model, cfg.chat_content_special_tokens)
        )
        try:
            procs, client, infos = await _start_shards(cfg)
        except BaseException:
            await asyncio.gather(loading, return_exceptions=True)  # never left unretrieved
            raise
        try:
            tokenizer = await loading
        except BaseException:
            await client.close()
            procs.stop()
            raise
    except BaseException:
        await front.stop()
        raise
    try:
        engine, builder = _engine(cfg, infos, tokenizer, client)
        static = StaticInfo(
            model=_model_info(cfg, infos[0], tokenizer, builder.limits.default_sampling),
            max_waiting_requests=cfg.scheduler.max_waiting_requests,
            max_running_requests=engine.scheduler.rows.capacity,
            device=infos[0].device,
        )
        identity = front.auth.identity if front.auth.binds_callers else None
        service = GenerationService(engine, builder, static, identity)
        front.serve_engine(engine, service, static.model.name)
        engine.start()
        await health.update()
    except BaseException:
        await front.stop()
        await client.close()
        procs.stop()
        raise
    freeze_startup_objects("coordinator")  # torch, transformers and the tokenizer stay for good
    log.info("%s", _summary(cfg, infos, static.model.name, engine.scheduler.kv_capacity, front))
    return Coordinator(server, engine, client, procs, port, health, front)


def _summary(
    cfg: ServerConfig, infos: list[shard_pb2.InfoResponse], name: str, kv_tokens: int, front: Frontend
) -> str:
    """The one start-up line an operator needs: what is served, where, and how to probe it."""
    sched, info = cfg.scheduler, infos[0]
    security = ("mTLS" if cfg.tls_client_ca else "TLS") if cfg.tls_cert else "plaintext"
    metrics = f"{cfg.host}:{front.metrics_port}/metrics" if front.metrics_port is not None else "off"
    return (
        f"ready: model={name} dtype={info.dtype} tp={info.world_size} device={info.device} "
        f"kv_capacity_tokens={kv_tokens} kv_cache_dtype={info.kv_cache_dtype} "
        f"listen={cfg.host}:{front.port} ({security}, "
        f"token auth {'on' if cfg.auth_tokens else 'off'}) health=grpc.health.v1 on the same port "
        f"metrics={metrics} prefix_cache={'on' if sched.prefix_cache else 'off'} "
        f"admission={sched.admission} policy={sched.scheduling_policy}"
    )


async def serve(cfg: ServerConfig) -> int:
    """Serve until a signal (exit code 0) or until the engine dies (exit code 1).

    SIGTERM drains (``Coordinator.drain``, up to ``--drain-timeout``); SIGINT or a second
    SIGTERM ends live streams at once with FINISH_REASON_ABORT.

    The engine dies when the shards are lost, a step exceeds ``--step-timeout`` or its
    loop fails unexpectedly. A coordinator that cannot run steps cannot serve anything;
    exiting lets the supervisor (systemd, Kubernetes) restart the whole server instead of
    leaving it up and useless.
    """
    shutdown = Shutdown()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, shutdown.terminate)
    loop.add_signal_handler(signal.SIGINT, shutdown.interrupt)
    stop = shutdown.requested
    coord = await _start_unless_stopped(cfg, stop)
    if coord is None:
        log.info("stopped during start-up")
        return 0
    watchdog = asyncio.create_task(_watch_shards(coord, stop))
    await stop.wait()
    if shutdown.drain and not coord.engine.dead:
        await coord.drain(cfg.drain_timeout_s, shutdown.hurry)
    watchdog.cancel()
    await coord.health.update()  # a dead engine shows in readiness before the server goes
    log.info("shutting down")
    code = 1 if coord.engine.dead else 0
    try:
        await asyncio.wait_for(coord.stop(), STOP_TIMEOUT_S)
    except asyncio.TimeoutError:
        # Never hang on the way out: a supervisor waits for this exit to restart us.
        log.error("shutdown took over %gs; killing the shards and exiting", STOP_TIMEOUT_S)
        coord.procs.stop(timeout=1.0)
    return code


async def _start_unless_stopped(cfg: ServerConfig, stop: asyncio.Event) -> Coordinator | None:
    """Start the coordinator; a signal during start-up cancels it, which stops the shards."""
    start = asyncio.create_task(start_coordinator(cfg))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if start.done():
        return start.result()
    start.cancel()
    await asyncio.gather(start, return_exceptions=True)
    return None


async def _watch_shards(coord: Coordinator, stop: asyncio.Event) -> None:
    """Stop the server once the engine is dead: spawned shards are watched by their process
    handles, shards on other hosts by Health probes while the engine is idle (see
    ``LivenessProbe``; a busy engine sees a lost shard on its step stream)."""
    probe = LivenessProbe(coord.shards) if isinstance(coord.procs, RemoteShards) else None
    while not stop.is_set():
        try:
            coord.procs.check_alive()
            if probe is not None and not coord.engine.dead:  # dead already: stop without a probe
                lost = await probe.check(coord.engine.scheduler.has_work)
                if lost is not None:
                    raise ShardError(lost)
        except ShardError as exc:
            coord.engine.lose_shards(str(exc))
        if coord.engine.dead:
            log.error("stopping: the engine can no longer serve (%s)", coord.engine.dead)
            stop.set()
            return
        await asyncio.sleep(SHARD_WATCH_INTERVAL_S)
