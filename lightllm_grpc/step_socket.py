"""The step stream's frames on a local unix socket: a 4-byte length, then one serialized message.

A shard the coordinator spawned carries its per-step traffic this way instead of on the gRPC
``Steps`` stream (docs/architecture.md, "Spawned shards take their steps over a step socket"):
every other RPC, and shards attached with ``--shards``, stay on gRPC. Both ends import this
module, so the framing and the message limit are written once.
"""

from __future__ import annotations

import asyncio
import struct

# The shard protocol's largest message, on gRPC channels and step sockets alike (a prefill
# step of many long prompts is the largest).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_HEADER = struct.Struct("<I")
SUFFIX = ".steps"  # the step socket sits beside the shard's gRPC socket: PATH.sock.steps


class FrameError(ConnectionError):
    """The peer closed the socket mid-frame or sent a length no frame can have."""


def step_socket_path(address: str) -> str | None:
    """Where a shard listening on ``address`` puts its step socket; None for a TCP address."""
    for prefix in ("unix://", "unix:"):
        if address.startswith(prefix):
            return address[len(prefix) :] + SUFFIX
    return None


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise FrameError(f"a {len(payload)}-byte step message exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    return _HEADER.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's payload, or None when the peer closed the socket between frames."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FrameError("the step socket closed inside a frame header") from exc
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE_BYTES:
        raise FrameError(f"a frame of {size} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise FrameError(f"the step socket closed {len(exc.partial)} bytes into a {size}-byte frame") from exc
