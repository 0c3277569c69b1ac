"""`make serve`'s path: the embedded default model, and `lightllm-grpc generate` streaming from it."""

from __future__ import annotations

import subprocess
import sys

from lightllm_grpc.models.default_model import NAME, ensure_default_model
from tests.server_harness import ServerProcess


def test_default_model_is_built_deterministically(tmp_path) -> None:
    a = ensure_default_model(tmp_path / "a")
    b = ensure_default_model(tmp_path / "b")
    assert a.name == b.name == NAME
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert ensure_default_model(tmp_path / "a") == a  # reused, not rebuilt


def _generate(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lightllm_grpc.cli", "generate", "--address", address, "--prompt", "Hello"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def test_serve_default_model_and_generate_cli(tmp_path) -> None:
    env = {"LIGHTLLM_GRPC_CACHE": str(tmp_path / "cache")}
    server = ServerProcess(None, tmp_path / "server.log", env=env)
    try:
        assert "embedded default" in server.log()
        out = _generate(server.address, "--max-new-tokens", "12", "--temperature", "0")
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.strip()) > 0
        assert "FINISH_REASON_LENGTH" in out.stderr and "completion 12 tokens" in out.stderr
        bad = _generate(server.address, "--temperature", "-1")
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "temperature" in bad.stderr
    finally:
        server.stop()


def test_serve_help_groups_its_flags_by_what_they_control() -> None:
    from lightllm_grpc.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    sections = ["engine", "tensor parallelism:", "scheduling:", "requests:", "security:"]
    sections += ["stuck steps and shutdown:", "observability:", "connections:"]
    starts = [text.index(f"\n{title}") for title in sections]
    assert starts == sorted(starts)

    def section_of(flag: str) -> str:
        at = text.index(f"\n  {flag}")  # the flag's own entry, not a mention in another's help
        return sections[max(i for i, start in enumerate(starts) if start < at)]

    assert section_of("--kv-cache-dtype") == "engine"
    assert section_of("--shards") == "tensor parallelism:"
    assert section_of("--admission") == "scheduling:"
    assert section_of("--auth-token-file") == section_of("--tls-cert") == "security:"
    assert section_of("--drain-timeout") == "stuck steps and shutdown:"
    assert section_of("--step-trace") == "observability:"
    assert section_of("--keepalive-time") == "connections:"
