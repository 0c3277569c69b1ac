"""TLS, mutual TLS and bearer tokens on a real server: accepted and refused exactly as they
should be; health stays open; reflection and metrics follow the API's rule; Abort is bound
to the caller; the shards' socket folder is private."""

from __future__ import annotations

import ssl
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from lightllm_grpc.bench.server import free_port
from lightllm_grpc.cli import build_parser, server_config
from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import generation_pb2_grpc
from tests.server_harness import ServerProcess, greedy_request, make_served_model
from tests.test_faults import _socket_dir

TOKENS = ("alpha-0123456789", "beta-9876543210")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=keyCertSign,cRLSign")  # fmt: skip
    return key, cert


def _signed(d: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    key, csr, cert, extfile = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    extfile.write_text(ext + "\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")  # fmt: skip
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]), "-CAcreateserial",
             "-out", str(cert), "-days", "2", "-extfile", str(extfile))  # fmt: skip
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = _ca(d, "test-ca"), _ca(d, "rogue-ca")
    return {
        "ca": ca,
        "server": _signed(d, "server", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        "client": _signed(d, "client", ca, "extendedKeyUsage=clientAuth"),
        "rogue_client": _signed(d, "rogue", rogue, "extendedKeyUsage=clientAuth"),
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_served_model("llama", tmp_path_factory.mktemp("model") / "llama")


class TlsServer(ServerProcess):
    """A server whose harness channel speaks TLS and carries ``token``; tests that vary the
    credentials open channels of their own (``plain_stub``)."""

    def __init__(self, *args, creds: grpc.ChannelCredentials, token: str | None, **kw) -> None:
        self.creds = creds
        if token is not None:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        self.harness_creds = creds
        super().__init__(*args, **kw)

    def _wait_ready(self, timeout: float) -> None:
        self.channel.close()
        self.channel = grpc.secure_channel(self.address, self.harness_creds)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.plain = grpc.secure_channel(self.address, self.creds)  # TLS, no token
        self.plain_stub = generation_pb2_grpc.GenerationStub(self.plain)
        super()._wait_ready(timeout)

    def stop(self) -> None:
        self.plain.close()
        super().stop()


def _creds(pki, client: str | None = None) -> grpc.ChannelCredentials:
    ca = pki["ca"][1].read_bytes()
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    key, cert = pki[client]
    return grpc.ssl_channel_credentials(ca, key.read_bytes(), cert.read_bytes())


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture(scope="module")
def token_server(model_dir, pki, tmp_path_factory):
    d = tmp_path_factory.mktemp("token")
    token_file = d / "tokens"
    token_file.write_text(f"# two callers\n{TOKENS[0]}\n\n{TOKENS[1]}\n")
    key, cert = pki["server"]
    port = free_port()
    args = ("--tls-cert", str(cert), "--tls-key", str(key), "--auth-token-file", str(token_file))
    srv = TlsServer(model_dir, d / "server.log", *args, "--metrics-port", str(port),
                    creds=_creds(pki), token=TOKENS[0])  # fmt: skip
    srv.metrics_url = f"https://localhost:{port}/metrics"
    yield srv
    srv.stop()


def test_token_accepted_and_refused(token_server) -> None:
    stub = token_server.plain_stub
    for token in TOKENS:
        assert stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=_bearer(token)).kv_total_tokens > 0
    for meta in (None, _bearer("wrong"), _bearer(TOKENS[0] + "x"), [("authorization", TOKENS[0])]):
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(greedy_request([1, 2], 2), metadata=meta)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, meta
    msgs = list(stub.GenerateStream(greedy_request([1, 2], 3), metadata=_bearer(TOKENS[1])))
    assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_health_is_open_and_reflection_needs_the_token(token_server) -> None:
    health = health_pb2_grpc.HealthStub(token_server.plain)
    req = health_pb2.HealthCheckRequest(service="lightllm.v1.Generation")
    assert health.Check(req).status == health_pb2.HealthCheckResponse.SERVING  # no token
    with pytest.raises(grpc.RpcError) as err:
        ProtoReflectionDescriptorDatabase(token_server.plain).get_services()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "lightllm.v1.Generation" in ProtoReflectionDescriptorDatabase(token_server.channel).get_services()


def test_plaintext_client_cannot_talk_to_a_tls_server(token_server) -> None:
    with grpc.insecure_channel(token_server.address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            generation_pb2_grpc.GenerationStub(ch).GetServerInfo(
                pb.GetServerInfoRequest(), metadata=_bearer(TOKENS[0]), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_metrics_need_the_token_over_https(token_server, pki) -> None:
    ctx = ssl.create_default_context(cafile=str(pki["ca"][1]))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(token_server.metrics_url, context=ctx, timeout=10)
    assert err.value.code == 401
    req = urllib.request.Request(token_server.metrics_url, headers={"Authorization": f"Bearer {TOKENS[1]}"})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        assert b"lightllm:request_errors_total" in resp.read()


def test_abort_touches_only_the_callers_own_requests(token_server) -> None:
    stub = token_server.plain_stub
    req = greedy_request([3, 4, 5], 300)
    req.request_id = "owned-by-alpha"
    call = stub.GenerateStream(req, metadata=_bearer(TOKENS[0]))
    next(iter(call))
    other = stub.Abort(pb.AbortRequest(request_id=req.request_id), metadata=_bearer(TOKENS[1]))
    assert not other.aborted
    own = stub.Abort(pb.AbortRequest(request_id=req.request_id), metadata=_bearer(TOKENS[0]))
    assert own.aborted
    assert list(call)[-1].finish_reason == pb.FINISH_REASON_ABORT


def test_shard_socket_folder_is_private(token_server) -> None:
    mode = stat.S_IMODE(_socket_dir(token_server.log()).stat().st_mode)
    assert mode == 0o700, oct(mode)


def test_mutual_tls_needs_a_client_certificate_from_the_ca(model_dir, pki, tmp_path) -> None:
    key, cert = pki["server"]
    args = ("--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(pki["ca"][1]))
    srv = TlsServer(model_dir, tmp_path / "server.log", *args, creds=_creds(pki, "client"), token=None)
    try:
        msgs = list(srv.stub.GenerateStream(greedy_request([1, 2], 2)))
        assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
        for creds in (_creds(pki), _creds(pki, "rogue_client")):  # no client cert; wrong CA
            with grpc.secure_channel(srv.address, creds) as ch:
                with pytest.raises(grpc.RpcError) as err:
                    generation_pb2_grpc.GenerationStub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_token_comes_from_a_file_or_the_environment_never_the_command_line(tmp_path, monkeypatch) -> None:
    model = make_served_model("llama", tmp_path / "m")
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "--auth-token-file" in help_text and "--auth-token " not in help_text
    monkeypatch.setenv("LIGHTLLM_AUTH_TOKEN", "from-env")
    cfg = server_config(build_parser().parse_args(["serve", "--model", str(model)]))
    assert cfg.auth_tokens == (b"from-env",)
    assert "from-env" not in repr(cfg)
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no token"):
        server_config(
            build_parser().parse_args(["serve", "--model", str(model), "--auth-token-file", str(empty)])
        )
