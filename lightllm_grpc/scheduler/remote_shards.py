"""Shards started by hand, possibly on other hosts (``serve --shards``): check them, watch them.

The coordinator attaches to such shards but does not own them. Their processes belong to
their own supervisor (systemd, a Kubernetes LeaderWorkerSet): the coordinator never starts,
signals or stops them. A shard exits once a coordinator's step stream ends
(shard/service.py), so that its supervisor restarts the whole group: a new coordinator
cannot safely reuse a group whose KV rows and torch.distributed group the last one left in
an unknown state. A coordinator refused at start-up never opened the stream, so the shards
it checked stay up for a corrected one. docs/multihost.md tells operators the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler.shard_client import ShardClient

log = logging.getLogger(__name__)
# Fields every shard of one group must report alike: they are one model split N ways, and
# store its K/V alike (--kv-cache-dtype is a setting of the whole group).
SAME_ON_EVERY_SHARD = (
    "model_name",
    "architecture",
    "dtype",
    "kv_cache_dtype",
    "vocab_size",
    "max_context",
    "eos_token_ids",
)


class ShardMismatch(ValueError):
    """The listed shards are not one consistent tensor-parallel group; the message is one line."""


class RemoteShards:
    """The process side of shards this coordinator does not own: nothing to start or stop.

    It stands where ``ShardProcesses`` stands for spawned shards. Without process handles,
    a lost shard shows as a failed step stream (keepalive pings find a silent host within
    ~2 s while steps run) or, on an idle engine, as a failed Health probe (``LivenessProbe``).
    """

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = list(addresses)

    def start(self) -> None:
        """They are already running: started by hand or by their supervisor."""

    def check_alive(self) -> None:
        """No process handles to poll; ``LivenessProbe`` does this job for remote shards."""

    def stop(self, timeout: float = 10.0) -> None:
        """The shards' own supervisor stops them; they exit when the step stream ends."""


def parse_addresses(text: str) -> list[str]:
    """``--shards A,B,...`` in rank order; raises ValueError on an empty entry."""
    addresses = [a.strip() for a in text.split(",")]
    if not all(addresses):
        raise ValueError(
            f"--shards {text!r}: an empty address; list HOST:PORT or unix:///path, comma-separated"
        )
    return addresses


def check_agreement(
    addresses: list[str], infos: list[shard_pb2.InfoResponse], architecture: str, vocab_size: int
) -> None:
    """Refuse shards that are not ranks 0..N-1 of one group serving the coordinator's model
    (``architecture`` and ``vocab_size`` of its --model folder, whose tokenizer it uses)."""
    n = len(addresses)
    for addr, info in zip(addresses, infos):
        if info.world_size != n:
            raise ShardMismatch(
                f"shard {addr} is rank {info.rank} of a world of {info.world_size} but --shards lists "
                f"{n} address(es); list every shard of the group, in rank order"
            )
    ranks = [info.rank for info in infos]
    if sorted(ranks) != list(range(n)):
        raise ShardMismatch(f"--shards report ranks {ranks}; each of 0..{n - 1} must appear once")
    if ranks != list(range(n)):
        raise ShardMismatch(f"--shards report ranks {ranks}; list them in rank order")
    for field in SAME_ON_EVERY_SHARD:
        values = [_value(info, field) for info in infos]
        if any(v != values[0] for v in values):
            raise ShardMismatch(f"--shards disagree on {field}: {dict(zip(addresses, values))}")
    # The coordinator tokenizes with its own --model folder: it must be the shards' model.
    first = infos[0]
    if first.architecture != architecture or first.vocab_size != vocab_size:
        raise ShardMismatch(
            f"--model is {architecture} with a vocabulary of {vocab_size} but the shards "
            f"serve {first.architecture} with {first.vocab_size}; give the coordinator the shards' model"
        )


def _value(info: shard_pb2.InfoResponse, field: str) -> object:
    value = getattr(info, field)
    return tuple(value) if field == "eos_token_ids" else value


def describe(addresses: list[str], infos: list[shard_pb2.InfoResponse]) -> list[str]:
    """One line per shard for the start-up log: where it runs and what it holds."""
    return [
        f"shard {i.rank}/{i.world_size} at {addr}: host={i.host or '?'} device={i.device} "
        f"dtype={i.dtype} kv_cache_dtype={i.kv_cache_dtype} kv_capacity_tokens={i.kv_capacity} "
        f"max_rows={i.max_rows}"
        for addr, i in zip(addresses, infos)
    ]


def warn_uneven_capacity(infos: list[shard_pb2.InfoResponse]) -> None:
    """Shards with different KV pools (different free memory) work at the smallest one: the
    coordinator allocates slots below every shard's capacity. Said aloud, since the rest
    of a larger pool is memory nobody uses."""
    capacities = [i.kv_capacity for i in infos]
    if len(set(capacities)) > 1:
        log.warning(
            "shards have different KV capacities %s: using the smallest, %d tokens",
            capacities,
            min(capacities),
        )


class LivenessProbe:
    """Health-checks remote shards while the engine is idle; a lost shard fails it within ~2 s.

    While steps run, a dead or silent shard fails the step stream itself (its connection
    resets, or keepalive pings go unanswered). On an idle engine no call is open to fail,
    so this probe asks. A probe that fails while the engine turned busy is not counted: a
    CPU shard's event loop blocks in a forward and may miss a short deadline while healthy.
    """

    def __init__(self, client: ShardClient, timeout: float = 1.0, misses_allowed: int = 1) -> None:
        self.client = client
        self.timeout = timeout
        self.misses_allowed = misses_allowed
        self.misses = 0

    async def check(self, busy: Callable[[], bool]) -> str | None:
        """Why the shards count as lost, or None; ``busy()`` says whether steps are running."""
        if busy():
            self.misses = 0
            return None
        reason = await self.client.health(self.timeout)
        if reason is None:
            self.misses = 0
            return None
        if busy():
            return None  # work arrived meanwhile: a slow answer proves nothing
        self.misses += 1
        return reason if self.misses > self.misses_allowed else None
