"""The ``generate`` command: a streaming client that prints text as it arrives."""

from __future__ import annotations

import argparse
import sys

import grpc

from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import generation_pb2_grpc


def build_request(args: argparse.Namespace) -> pb.GenerateRequest:
    req = pb.GenerateRequest()
    if args.chat is not None:
        req.chat.messages.add(role="user", content=args.chat)
    else:
        req.text = args.prompt
    for name in ("temperature", "top_p", "top_k", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(req.sampling, name, value)
    req.stopping.max_new_tokens = args.max_new_tokens
    req.stopping.stop.extend(args.stop)
    return req


async def generate_cli(args: argparse.Namespace) -> int:
    async with grpc.aio.insecure_channel(args.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        last = None
        try:
            async for msg in stub.GenerateStream(build_request(args), timeout=args.timeout):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                last = msg
        except grpc.aio.AioRpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if last is not None:
        reason = pb.FinishReason.Name(last.finish_reason)
        u = last.usage
        print(
            f"\n[{reason}; prompt {u.prompt_tokens} tokens, completion {u.completion_tokens} tokens]",
            file=sys.stderr,
        )
    return 0
