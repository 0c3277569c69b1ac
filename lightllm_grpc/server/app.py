"""Assembles the coordinator: shards, tokenizer, scheduler, engine and the gRPC server."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc

from lightllm_grpc.config import ServerConfig
from lightllm_grpc.models.config import ModelConfig
from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler import sampling
from lightllm_grpc.scheduler.engine import Engine
from lightllm_grpc.scheduler.output_processor import OutputProcessor
from lightllm_grpc.scheduler.sampling import SamplingOptions
from lightllm_grpc.scheduler.scheduler import Scheduler
from lightllm_grpc.scheduler.shard_client import ShardClient, ShardError, ShardProcesses
from lightllm_grpc.server.request_builder import Limits, RequestBuilder
from lightllm_grpc.server.servicer import GenerationService, StaticInfo
from lightllm_grpc.server.tokenizer import PromptTokenizer
from lightllm_grpc.server.wire import add_generation_service
from lightllm_grpc.text.detokenizer import Detokenizer

log = logging.getLogger(__name__)
SHARD_START_TIMEOUT_S = 1800.0
SHARD_WATCH_INTERVAL_S = 0.5
UNREQUESTED_CALL_TIMEOUT_S = 3600


@dataclass
class Coordinator:
    server: grpc.aio.Server
    engine: Engine
    shards: ShardClient
    procs: ShardProcesses
    port: int

    async def stop(self, grace: float = 2.0) -> None:
        # Live streams get their last message (FINISH_REASON_ABORT) before the server stops;
        # the grace period lets the handlers write it.
        self.engine.drain()
        await self.server.stop(grace)
        await self.engine.stop()
        await self.shards.close()
        self.procs.stop()


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
        tp_size=info.world_size,
        has_chat_template=tok.has_chat_template,
        default_sampling=sampling.to_params(defaults),
    )


async def _start_shards(
    cfg: ServerConfig,
) -> tuple[ShardProcesses, ShardClient, list[shard_pb2.InfoResponse]]:
    procs = ShardProcesses(cfg.shard)
    procs.start()
    client = ShardClient(procs.addresses)
    try:
        await client.wait_ready(procs, SHARD_START_TIMEOUT_S)
        infos = await client.info()
        sched = cfg.scheduler
        seconds = await client.warmup(sched.max_prefill_tokens, sched.max_running_requests)
        log.info("shards warmed up in %.1fs", seconds)
    except BaseException:
        await client.close()
        procs.stop()
        raise
    return procs, client, infos


def _engine(
    cfg: ServerConfig, infos: list[shard_pb2.InfoResponse], tok: PromptTokenizer, client: ShardClient
):
    info = infos[0]
    capacity = min(i.kv_capacity for i in infos)
    eos = tuple(info.eos_token_ids)
    scheduler = Scheduler(cfg.scheduler, capacity, info.max_rows, eos)
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
    engine = Engine(scheduler, outputs, client, step_timeout=cfg.step_timeout_s)
    return engine, RequestBuilder(tok, limits)


class StartupError(RuntimeError):
    """The server cannot start as configured; the message is the one line a person needs."""


def _bound_server(cfg: ServerConfig) -> tuple[grpc.aio.Server, int]:
    """A gRPC server already bound to its port: a bad address fails before any model work."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            # Without this a second server on the same port starts too and silently takes
            # part of the new connections; with it, the second one fails to bind.
            ("grpc.so_reuseport", 0),
            # gRPC core cancels a call that waits more than 30 s (its default) between arriving
            # and being picked up by the Python server, which picks calls up one per event-loop
            # turn: a burst of 1,500 streams on a busy loop got a few unasked CANCELLEDs. The
            # waiting queue's limit and each client's deadline bound the wait instead.
            ("grpc.server_max_unrequested_time_in_server", UNREQUESTED_CALL_TIMEOUT_S),
        ]
    )
    try:
        port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    except RuntimeError as exc:
        raise StartupError(
            f"cannot listen on {cfg.host}:{cfg.port}: the port is in use or the address is not on "
            "this machine"
        ) from exc
    return server, port


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


def _tokenizer(folder: Path, chat_content_special_tokens: str) -> PromptTokenizer:
    try:
        return PromptTokenizer(folder, chat_content_special_tokens)
    except Exception as exc:  # transformers raises many types, with pages of text
        first = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise StartupError(f"--model {folder}: cannot load its tokenizer: {first}") from exc


async def start_coordinator(cfg: ServerConfig) -> Coordinator:
    server, port = _bound_server(cfg)
    _check_model(cfg.shard.model)
    tokenizer = _tokenizer(cfg.shard.model, cfg.chat_content_special_tokens)
    procs, client, infos = await _start_shards(cfg)
    try:
        engine, builder = _engine(cfg, infos, tokenizer, client)
        static = StaticInfo(
            model=_model_info(cfg, infos[0], tokenizer, builder.limits.default_sampling),
            max_waiting_requests=cfg.scheduler.max_waiting_requests,
            max_running_requests=engine.scheduler.rows.capacity,
            device=infos[0].device,
        )
        service = GenerationService(engine, builder, static)
        add_generation_service(service, server)
        engine.start()
        await server.start()
    except BaseException:
        await client.close()
        procs.stop()
        raise
    sched = cfg.scheduler
    log.info(
        "serving %s on %s:%d (KV pool %d tokens, %d shard(s) on %s; prefix cache %s, admission %s, %s)",
        static.model.name,
        cfg.host,
        port,
        engine.scheduler.kv_capacity,
        len(infos),
        static.device,
        "on" if sched.prefix_cache else "off",
        sched.admission,
        sched.scheduling_policy,
    )
    return Coordinator(server, engine, client, procs, port)


async def serve(cfg: ServerConfig) -> int:
    """Serve until SIGINT/SIGTERM (exit code 0) or until the engine dies (exit code 1).

    The engine dies when the shards are lost, a step exceeds ``--step-timeout`` or its
    loop fails unexpectedly. A coordinator that cannot run steps cannot serve anything;
    exiting lets the supervisor (systemd, Kubernetes) restart the whole server instead of
    leaving it up and useless.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    coord = await _start_unless_stopped(cfg, stop)
    if coord is None:
        log.info("stopped during start-up")
        return 0
    watchdog = asyncio.create_task(_watch_shards(coord, stop))
    await stop.wait()
    watchdog.cancel()
    log.info("shutting down")
    code = 1 if coord.engine.dead else 0
    await coord.stop()
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
    while not stop.is_set():
        try:
            coord.procs.check_alive()
        except ShardError as exc:
            coord.engine.lose_shards(str(exc))
        if coord.engine.dead:
            log.error("stopping: the engine can no longer serve (%s)", coord.engine.dead)
            stop.set()
            return
        await asyncio.sleep(SHARD_WATCH_INTERVAL_S)
