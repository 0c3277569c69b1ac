"""Shard process entry point: ``python -m lightllm_grpc.shard --socket PATH --config JSON``."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import grpc

from lightllm_grpc.aio import run
from lightllm_grpc.config import ShardConfig
from lightllm_grpc.proto import shard_pb2_grpc
from lightllm_grpc.shard.lifeline import die_with
from lightllm_grpc.shard.service import ShardService
from lightllm_grpc.shard.worker import build_shard

MAX_MESSAGE_BYTES = 256 * 1024 * 1024


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


async def serve(args: argparse.Namespace) -> None:
    shard = build_shard(shard_config_from_json(args.config), args.rank, args.world_size, args.dist_init)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    service = ShardService(shard)
    shard_pb2_grpc.add_ShardServicer_to_server(service, server)
    server.add_insecure_port(args.address)
    await server.start()
    log = logging.getLogger(__name__)
    log.info("shard %d listening on %s (pid %d)", args.rank, args.address, os.getpid())
    await service.stream_ended.wait()
    log.info("shard %d: the coordinator's step stream ended; exiting", args.rank)
    await server.stop(1.0)


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
