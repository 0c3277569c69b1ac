"""End to end: the Node.js client in clients/node against a real server on the default model."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lightllm_grpc.proto import generation_pb2 as pb
from tests.server_harness import ServerProcess

REPO = Path(__file__).resolve().parent.parent
NODE_CLIENT = REPO / "clients" / "node"
NPM_TIMEOUT_S = 90
NODE_TIMEOUT_S = 30


def _installed(client_dir: Path) -> bool:
    modules = client_dir / "node_modules" / "@grpc"
    return (modules / "grpc-js").is_dir() and (modules / "proto-loader").is_dir()


@pytest.fixture(scope="module")
def node_client(tmp_path_factory) -> Path:
    """clients/node when its dependencies are installed; else a copy with `npm ci` run in it."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not found on PATH")
    if _installed(NODE_CLIENT):
        return NODE_CLIENT
    # The copy keeps the repository layout, since the client loads ../../protos at runtime.
    root = tmp_path_factory.mktemp("node-client")
    (root / "protos").symlink_to(REPO / "protos", target_is_directory=True)
    client_dir = root / "clients" / "node"
    shutil.copytree(NODE_CLIENT, client_dir, ignore=shutil.ignore_patterns("node_modules"))
    cmd = ["npm", "ci", "--no-audit", "--no-fund", "--fetch-retries=1", "--fetch-timeout=20000"]
    try:
        proc = subprocess.run(cmd, cwd=client_dir, capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"`npm ci` did not finish in {NPM_TIMEOUT_S}s (no network?)")
    if proc.returncode != 0 or not _installed(client_dir):
        pytest.skip(f"`npm ci` failed (no network?): {proc.stderr.strip()[-500:]}")
    return client_dir


@pytest.fixture(scope="module")
def server(node_client, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    srv = ServerProcess(None, tmp / "server.log", env={"LIGHTLLM_GRPC_CACHE": str(tmp / "cache")})
    yield srv
    srv.stop()


def _node(client_dir: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["node", script, *args],
        cwd=client_dir,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=NODE_TIMEOUT_S,
    )


def test_node_generate_streams_greedy_text(node_client, server) -> None:
    args = ["--address", server.address, "--prompt", "Hello", "--max-new-tokens", "8", "--temperature", "0"]
    proc = _node(node_client, "generate.js", *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout
    assert "finish_reason=FINISH_REASON_LENGTH" in proc.stderr
    assert "completion_tokens=8" in proc.stderr
    assert "prompt_tokens=" in proc.stderr

    # Greedy, so the streamed text equals the unary result of the same request.
    req = pb.GenerateRequest(text="Hello")
    req.sampling.temperature = 0.0
    req.stopping.max_new_tokens = 8
    assert proc.stdout == server.stub.Generate(req, timeout=NODE_TIMEOUT_S).text


def test_node_generate_invalid_argument(node_client, server) -> None:
    args = ["--address", server.address, "--prompt", "Hi", "--temperature", "-1"]
    proc = _node(node_client, "generate.js", *args)
    assert proc.returncode != 0
    assert "INVALID_ARGUMENT" in proc.stderr
    assert "temperature" in proc.stderr


def test_node_info(node_client, server) -> None:
    proc = _node(node_client, "info.js", "--address", server.address)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["model"]["name"] == server.stub.GetModelInfo(pb.GetModelInfoRequest()).name
    assert info["model"]["vocab_size"] > 0
    assert info["server"]["device"] == "cpu"
