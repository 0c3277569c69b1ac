"""TLS (and mutual TLS) credentials, bearer-token authentication and caller identity.

Tokens come from ``--auth-token-file`` (one per line) or ``LIGHTLLM_AUTH_TOKEN``, never
from the command line, which ``ps`` shows to every user of the host. Each is compared in
constant time (``hmac.compare_digest``), and every configured token is compared on every
call, so timing tells nothing about which one nearly matched. Health stays open: probes
and load balancers carry no credentials.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health

OPEN_PREFIXES = (f"/{health.SERVICE_NAME}/",)
BEARER = "bearer "


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: clients must present a certificate it signed

    def credentials(self) -> grpc.ServerCredentials:
        ca = self.client_ca.read_bytes() if self.client_ca else None
        pair = (self.key.read_bytes(), self.cert.read_bytes())
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)

    def ssl_context(self) -> ssl.SSLContext:
        """The same files for the metrics endpoint (HTTPS)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            ctx.load_verify_locations(self.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def shard_channel_credentials(ca: Path, cert: Path | None, key: Path | None) -> grpc.ChannelCredentials:
    """The coordinator's side of TLS to shards: verify them against ``ca``; with ``cert`` and
    ``key``, also present a client certificate (shards started with --tls-client-ca ask for one)."""
    return grpc.ssl_channel_credentials(
        ca.read_bytes(), key.read_bytes() if key else None, cert.read_bytes() if cert else None
    )


def load_tokens(path: Path | None, env_value: str | None) -> tuple[bytes, ...]:
    """Tokens from the file (one per line; blank lines and ``#`` comments skipped) and the env."""
    tokens: list[str] = []
    if path is not None:
        lines = (line.strip() for line in path.read_text().splitlines())
        tokens += [line for line in lines if line and not line.startswith("#")]
        if not tokens:
            raise ValueError(f"--auth-token-file {path} holds no token")
    if env_value and env_value.strip():
        tokens.append(env_value.strip())
    return tuple(t.encode() for t in tokens)


class Authenticator:
    """Decides whether a call may proceed and who made it (for binding request ids)."""

    def __init__(self, tokens: Sequence[bytes], mutual_tls: bool = False) -> None:
        self.tokens = tuple(tokens)
        self.mutual_tls = mutual_tls

    @property
    def binds_callers(self) -> bool:
        """Whether callers are told apart, so Abort may only touch the caller's own requests."""
        return bool(self.tokens) or self.mutual_tls

    def token_index(self, header: str | None) -> int | None:
        """Which configured token ``authorization: Bearer <t>`` carries; None for none."""
        if not header or not header.lower().startswith(BEARER):
            return None
        given = header[len(BEARER) :].strip().encode()
        found = None
        for i, token in enumerate(self.tokens):  # no early exit: same work for every token
            if hmac.compare_digest(given, token):
                found = i
        return found

    def allows(self, header: str | None) -> bool:
        return not self.tokens or self.token_index(header) is not None

    def identity(self, context: grpc.aio.ServicerContext) -> str:
        """The caller: which token it showed and which client certificate (mTLS)."""
        parts = []
        if self.tokens:
            parts.append(f"token#{self.token_index(_authorization(context.invocation_metadata()))}")
        if self.mutual_tls:
            names = context.auth_context().get("x509_common_name") or [b"?"]
            parts.append("cn=" + names[0].decode(errors="replace"))
        return ";".join(parts)


def _authorization(metadata: Sequence[Any] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health needs a configured bearer token; UNAUTHENTICATED otherwise."""

    def __init__(self, auth: Authenticator, on_refused: Callable[[], None] | None = None) -> None:
        self.auth = auth
        self.on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        if self.auth.allows(_authorization(details.invocation_metadata)):
            return handler
        if self.on_refused is not None:
            self.on_refused()
        return _refusal(handler)


_MESSAGE = "a valid 'authorization: Bearer <token>' header is required"


async def _deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)


async def _deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)
    yield  # unreachable: makes this an async generator, as streaming handlers must be


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""
    kw = {"request_deserializer": None, "response_serializer": None}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(_deny, **kw)
