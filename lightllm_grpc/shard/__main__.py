"""Shard process entry point: ``python -m lightllm_grpc.shard --socket PATH --config JSON``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
from pathlib import Path

import grpc

from lightllm_grpc.aio import run
from lightllm_grpc.config import NO_MULTICAST_ENV, ShardConfig
from lightllm_grpc.proto import shard_pb2_grpc
from lightllm_grpc.shard.lifeline import die_with
from lightllm_grpc.shard.service import ShardService
from lightllm_grpc.shard.worker import build_shard
from lightllm_grpc.step_socket import MAX_MESSAGE_BYTES, step_socket_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="lightllm-grpc shard process (one per device)")
    p.add_argument(
        "--address", required=True, help="where to listen, e.g. unix:///tmp/x.sock or 127.0.0.1:6000"
    )
    p.add_argument("--config", required=True, help="ShardConfig as JSON")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--dist-init", default=None, help="torch.distributed init method (world size > 1)")
    p.add_argument("--parent-pid", type=int, default=None, help="exit (SIGKILL) when this parent exits")
    return p.parse_args(argv)


def shard_config_from_json(text: str) -> ShardConfig:
    raw = json.loads(text)
    raw["model"] = Path(raw["model"])
    return ShardConfig(**raw)


# The coordinator of remote shards sends HTTP/2 keepalive pings every second to find a dead
# or unreachable host within ~2 s (scheduler/shard_client.py); gRPC core answers them on
# its own threads, so a shard busy in a forward still answers. The defaults would answer
# such pings with GOAWAY (too_many_pings).
_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


async def serve(args: argparse.Namespace) -> None:
    cfg = shard_config_from_json(args.config)
    await serve_shard(cfg, args.address, args.rank, args.world_size, args.dist_init)


async def serve_shard(
    cfg: ShardConfig,
    address: str,
    rank: int,
    world_size: int,
    dist_init: str | None,
    credentials: grpc.ServerCredentials | None = None,
) -> None:
    """Load rank ``rank`` of ``cfg``'s model and serve it on ``address`` until the step stream ends.

    Spawned by a coordinator (``python -m lightllm_grpc.shard``) or started by hand
    (``lightllm-grpc shard``, docs/multihost.md); the same code either way. With
    ``credentials`` it serves TLS (mutual TLS when they ask for client certificates).
    """
    os.environ.update(NO_MULTICAST_ENV)  # before CUDA and NCCL start, which read them once
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    # Bound before the model loads: a taken port fails at once, not after minutes of loading.
    if credentials is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, credentials)
    shard = build_shard(cfg, rank, world_size, dist_init)
    service = ShardService(shard)
    steps = await _listen_step_socket(service, address)
    shard_pb2_grpc.add_ShardServicer_to_server(service, server)
    await server.start()
    log = logging.getLogger(__name__)
    log.info(
        "shard %d/%d listening on %s%s (pid %d, host %s, device %s)",
        rank,
        world_size,
        address,
        " (TLS)" if credentials is not None else "",
        os.getpid(),
        socket.gethostname(),
        shard.device,
    )
    await service.stream_ended.wait()
    log.info("shard %d: the coordinator's step stream ended; exiting", rank)
    if steps is not None:
        steps.close()
        with contextlib.suppress(OSError):
            os.unlink(service.step_socket)
    await server.stop(1.0)


async def _listen_step_socket(service: ShardService, address: str) -> asyncio.AbstractServer | None:
    """Serve the step stream on a unix socket beside a unix ``address`` too (step_socket.py)."""
    path = step_socket_path(address)
    if path is None:
        return None  # a TCP shard: its coordinator may be on another host
    try:
        server = await asyncio.start_unix_server(service.serve_step_socket, path)
    except OSError as exc:  # e.g. a path one suffix too long for a unix socket: gRPC still works
        logging.getLogger(__name__).warning("no step socket at %s (%s): steps go over gRPC", path, exc)
        return None
    service.step_socket = path
    return server


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=os.environ.get("LIGHTLLM_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s shard %(name)s: %(message)s",
    )
    args = parse_args(argv)
    if args.parent_pid is not None:
        die_with(args.parent_pid)
    run(serve(args))


if __name__ == "__main__":
    main()
