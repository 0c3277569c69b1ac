"""Imports point one way: the coordinator core never imports the gRPC frontend, layers never
import models, and the text helpers import nothing else from the project."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "lightllm_grpc"

# package -> packages it must never import
FORBIDDEN = {
    "scheduler": ("lightllm_grpc.server", "lightllm_grpc.cli", "lightllm_grpc.shard", "lightllm_grpc.models"),
    "text": ("lightllm_grpc.",),
    "layers": (
        "lightllm_grpc.models",
        "lightllm_grpc.shard",
        "lightllm_grpc.server",
        "lightllm_grpc.scheduler",
    ),
    "models": ("lightllm_grpc.shard", "lightllm_grpc.server", "lightllm_grpc.scheduler"),
    "shard": ("lightllm_grpc.server", "lightllm_grpc.scheduler"),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    bad = []
    for path in sorted((PKG / package).rglob("*.py")):
        for name in _imports(path):
            if any(name.startswith(f) for f in FORBIDDEN[package]):
                bad.append(f"{path.relative_to(PKG)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_coordinator_spawns_its_shards_before_importing_transformers_and_never_imports_torch() -> None:
    """``serve`` imports ``server.app`` before it spawns the shards; transformers (~1 s to
    import) is imported by the tokenizer, which loads on a thread while the shards start, so
    the app module must not pull it in (a server start was 1.1 s slower with it). Nor torch,
    which the model config pulled in: 2.6 s on this machine before the shards were spawned
    (a start to "ready" ~0.7 s slower with it)."""
    import subprocess
    import sys

    code = (
        "import sys, lightllm_grpc.server.app; print('transformers' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False False"
