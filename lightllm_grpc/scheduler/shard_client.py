"""The coordinator's handle on its shards: start them, connect, and run steps on all at once."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import grpc

from lightllm_grpc.config import NO_MULTICAST_ENV, ShardConfig
from lightllm_grpc.proto import shard_pb2, shard_pb2_grpc
from lightllm_grpc.step_socket import MAX_MESSAGE_BYTES, frame, read_frame

log = logging.getLogger(__name__)
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# Spawned shards: start-up polls one that is still loading, and gRPC's default backoff after
# a refused connection (1 s, growing) would notice it up to a second after it listens. Shards on
# other hosts keep the default: a refused TLS handshake must not be retried ten times a second.
LOCAL_RETRY = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# Shards on other hosts: an HTTP/2 ping every second, and a transport whose ping is not
# answered within a second counts as dead, failing the step stream with UNAVAILABLE. This
# finds a crashed host, a partition or a frozen shard process while a step is in flight
# (gRPC core answers pings on its own threads, so a long forward does not trip it). Local
# shards need none: their death is seen on the process handle, a stuck one by the step timeout.
REMOTE_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    # gRPC core also times out the ping itself, after a minute by default, whichever is later.
    ("grpc.http2.ping_timeout_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class ShardError(RuntimeError):
    """A shard failed a step (``fatal`` False) or went away (``fatal`` True)."""

    def __init__(self, message: str, fatal: bool = True) -> None:
        super().__init__(message)
        self.fatal = fatal


class ShardRefused(ShardError):
    """A shard is up but its TLS and the coordinator's do not match; the message is one line."""


# A TLS shard closes at once ("Socket closed") a plaintext connection, or a TLS one without
# the client certificate it asks for; every attempt closed for this long is not a shard
# that is merely restarting.
CLOSED_FOR_S = 2.0


def tls_refusal(details: str, tls: bool, closed_for: float) -> str | None:
    """Why a failed connection means the TLS settings disagree (gRPC's error text), or None."""
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (
            "its TLS certificate does not verify against --shard-tls-ca (another CA, or it does not "
            "name the host as --shards lists it)"
        )
    if "WRONG_VERSION_NUMBER" in details:
        return "it does not serve TLS (started without --tls-cert); drop --shard-tls-ca or give it one"
    at = details.lower().find("handshake failed")
    if at >= 0:
        return f"TLS {details[at:][:200]}"
    if "Socket closed" not in details or closed_for < CLOSED_FOR_S:
        return None
    if tls:
        return "it closes TLS connections at once: it asks for a client certificate (--shard-tls-cert/-key)"
    return "it closes plaintext connections at once: it serves TLS; give --shard-tls-ca"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ShardProcesses:
    """Shard processes on this host, one per rank, each listening on a unix socket."""

    def __init__(self, cfg: ShardConfig) -> None:
        self.cfg = cfg
        # mkdtemp makes the folder 0700: the shard protocol has no authentication, so only
        # this user may reach its sockets (tests/test_security.py checks the mode).
        self._dir = tempfile.mkdtemp(prefix="lightllm-grpc-")
        self.addresses = [f"unix://{self._dir}/shard-{r}.sock" for r in range(cfg.tp_size)]
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        raw = asdict(self.cfg)
        raw["model"] = str(self.cfg.model)
        dist_init = f"tcp://127.0.0.1:{_free_port()}" if self.cfg.tp_size > 1 else None
        for rank, address in enumerate(self.addresses):
            cmd = [
                sys.executable,
                "-m",
                "lightllm_grpc.shard",
                "--address",
                address,
                "--config",
                json.dumps(raw),
                "--rank",
                str(rank),
                "--world-size",
                str(self.cfg.tp_size),
                # The shard asks the kernel to kill it when this process dies (see
                # shard/lifeline.py): no preexec_fn, since forking a process with live gRPC
                # threads and running Python before exec can abort the child.
                "--parent-pid",
                str(os.getpid()),
            ]
            if dist_init:
                cmd += ["--dist-init", dist_init]
            # A session of its own: Ctrl-C in a terminal (SIGINT to the foreground process
            # group) reaches only the coordinator, which then stops its shards in order.
            proc = subprocess.Popen(cmd, env={**os.environ, **NO_MULTICAST_ENV}, start_new_session=True)
            self.procs.append(proc)

    def check_alive(self) -> None:
        for rank, proc in enumerate(self.procs):
            if proc.poll() is not None:
                raise ShardError(f"shard {rank} exited with code {proc.returncode} (see its log above)")

    def stop(self, timeout: float = 10.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self._dir, ignore_errors=True)  # the shards' unix sockets


class ShardClient:
    """Sends every step to all shards at once and returns rank 0's result."""

    def __init__(
        self, addresses: list[str], remote: bool = False, tls: grpc.ChannelCredentials | None = None
    ) -> None:
        """``tls``: reach the TCP addresses over TLS with these credentials (unix sockets stay
        plaintext: their file permissions guard them)."""
        options = _OPTIONS + (REMOTE_KEEPALIVE if remote else LOCAL_RETRY)
        self.addresses = list(addresses)
        self.remote = remote
        self.tls = tls
        self.channels = [
            grpc.aio.insecure_channel(a, options=options)
            if tls is None or a.startswith("unix:")
            else grpc.aio.secure_channel(a, tls, options=options)
            for a in addresses
        ]
        self.stubs = [shard_pb2_grpc.ShardStub(c) for c in self.channels]
        # Per rank, the step socket to use instead of Steps ("": none), learned from Info.
        self._step_sockets = [""] * len(addresses)
        self._streams: list[_GrpcSteps | _SocketSteps] = []
        self._frames = False  # whether any open stream is a step socket (it takes framed bytes)

    async def wait_ready(self, procs: ShardProcesses | None, timeout: float) -> None:
        """Wait until every shard answers Health; one still loading is waited for, one that
        refuses this coordinator's TLS (or its lack of it) fails at once (``ShardRefused``)."""
        deadline = time.monotonic() + timeout
        for rank, stub in enumerate(self.stubs):
            closed_since = None
            while True:
                if procs is not None:
                    procs.check_alive()
                try:
                    # Not wait_for_ready: a failed handshake must surface, not be retried.
                    await stub.Health(shard_pb2.HealthRequest(), timeout=2.0)
                    break
                except grpc.aio.AioRpcError as exc:
                    details = exc.details() or ""
                    now = time.monotonic()
                    closed_since = (closed_since or now) if "Socket closed" in details else None
                    refusal = tls_refusal(details, self.tls is not None, now - (closed_since or now))
                    if refusal is not None:
                        raise ShardRefused(f"shard {rank} at {self.addresses[rank]}: {refusal}") from exc
                    if time.monotonic() > deadline:
                        raise ShardError(
                            f"shard {rank} not ready after {timeout:.0f}s: {exc.details()}"
                        ) from exc
                    await asyncio.sleep(0.05)

    async def health(self, timeout: float) -> str | None:
        """None when every shard answers Health within ``timeout`` seconds, else why not."""
        calls = (s.Health(shard_pb2.HealthRequest(), timeout=timeout) for s in self.stubs)
        results = await asyncio.gather(*calls, return_exceptions=True)
        for rank, res in enumerate(results):
            if isinstance(res, grpc.aio.AioRpcError):
                return (
                    f"shard {rank} ({self.addresses[rank]}) failed Health: {res.code().name}: {res.details()}"
                )
            if isinstance(res, BaseException):
                raise res
        return None

    async def info(self) -> list[shard_pb2.InfoResponse]:
        infos = list(await asyncio.gather(*(s.Info(shard_pb2.InfoRequest()) for s in self.stubs)))
        # Only shards this process spawned: one attached with --shards keeps the gRPC stream
        # even on a unix address, for its keepalive pings find a frozen shard in ~2 s.
        if not self.remote:
            self._step_sockets = [i.step_socket for i in infos]
        return infos

    async def warmup(self, max_prefill_tokens: int, max_batch_size: int) -> float:
        req = shard_pb2.WarmupRequest(max_prefill_tokens=max_prefill_tokens, max_batch_size=max_batch_size)
        results = await asyncio.gather(*(s.Warmup(req) for s in self.stubs))
        return max(r.seconds for r in results)

    async def compile_constraint(self, constraint: shard_pb2.Constraint, timeout: float) -> None:
        """Compile ``constraint`` on every shard; ValueError with the shard's message when invalid."""
        calls = (s.CompileConstraint(constraint, timeout=timeout) for s in self.stubs)
        results = await asyncio.gather(*calls, return_exceptions=True)
        for rank, res in enumerate(results):
            if isinstance(res, grpc.aio.AioRpcError):
                if res.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ValueError(res.details())
                why = f"{res.code().name}: {res.details()}"
                raise ShardError(f"shard {rank} could not compile a constraint: {why}")
            if isinstance(res, BaseException):
                raise res

    async def send(self, msg: shard_pb2.StepRequest) -> None:
        """Send a step to every shard; its result comes from ``receive``, in order."""
        if not self._streams:
            self._streams = [await self._open(rank) for rank in range(len(self.stubs))]
            self._frames = any(isinstance(s, _SocketSteps) for s in self._streams)
        # Serialized once for every step socket (TP ranks get the same bytes).
        framed = frame(msg.SerializeToString()) if self._frames else b""
        try:
            if len(self._streams) == 1:  # no gather: it would add a task and a loop turn per step
                await self._streams[0].write(msg, framed)
            else:
                await asyncio.gather(*(s.write(msg, framed) for s in self._streams))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, ConnectionError) as exc:
            raise ShardError(f"shard stream failed: {exc}") from exc

    async def receive(self, step_id: int) -> shard_pb2.StepResult:
        """The result of the oldest step sent and not yet received (rank 0's)."""
        try:
            if len(self._streams) == 1:
                results = [await self._streams[0].read()]
            else:
                results = await asyncio.gather(*(s.read() for s in self._streams))
        except grpc.aio.AioRpcError as exc:
            raise ShardError(f"shard stream failed: {exc.code().name}: {exc.details()}") from exc
        except ConnectionError as exc:
            raise ShardError(f"shard step socket failed: {exc}") from exc
        for rank, result in enumerate(results):
            if result is None:
                raise ShardError(f"shard {rank} closed its step stream")
            if result.step_id != step_id:
                raise ShardError(f"shard {rank} answered step {result.step_id}, expected {step_id}")
            if result.error:
                raise ShardError(f"shard {rank} failed step {step_id}: {result.error}", fatal=False)
        return results[0]

    async def _open(self, rank: int) -> _GrpcSteps | _SocketSteps:
        path = self._step_sockets[rank]
        if not path:
            log.info("shard %d: steps over the gRPC Steps stream", rank)
            return _GrpcSteps(self.stubs[rank].Steps())
        try:
            steps = _SocketSteps(*await asyncio.open_unix_connection(path))
        except OSError as exc:
            raise ShardError(f"shard {rank}'s step socket {path}: {exc}") from exc
        log.info("shard %d: steps over its step socket %s", rank, path)
        return steps

    async def close(self) -> None:
        for s in self._streams:
            s.close()
        for c in self.channels:
            await c.close()


class _GrpcSteps:
    """The step stream as the ``Steps`` RPC: shards on other hosts, or without a step socket."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call

    async def write(self, msg: shard_pb2.StepRequest, framed: bytes) -> None:
        await self.call.write(msg)  # gRPC serializes it itself

    async def read(self) -> shard_pb2.StepResult | None:
        result = await self.call.read()
        return None if result is grpc.aio.EOF else result

    def close(self) -> None:
        self.call.cancel()


class _SocketSteps:
    """The step stream on a local shard's step socket: frames, no HTTP/2, no poller thread.

    A ``grpc.aio`` stream message wakes gRPC's poller thread, then the event loop; here the
    socket wakes the loop itself: ~0.4 ms less per step round trip on the CPU machine
    (BENCHMARKS.md, "steps over a unix socket")."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def write(self, msg: shard_pb2.StepRequest, framed: bytes) -> None:
        """``framed``: ``msg`` already serialized and framed by the caller."""
        self.writer.write(framed)
        await self.writer.drain()

    async def read(self) -> shard_pb2.StepResult | None:
        payload = await read_frame(self.reader)
        return None if payload is None else shard_pb2.StepResult.FromString(payload)

    def close(self) -> None:
        self.writer.close()
