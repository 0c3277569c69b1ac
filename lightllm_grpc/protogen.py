"""Generates the Python gRPC stubs from protos/ into lightllm_grpc/_proto (never edited by hand).

Run at install time (``make proto``); ``lightllm_grpc.proto`` also runs it on first import
when the stubs are missing and grpcio-tools is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parent / "protos"
# Generated modules live under this import path, so they cannot collide with another
# package that also ships "lightllm/..." stubs.
VIRTUAL_ROOT = "lightllm_grpc/_proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_root: Path | None = None) -> None:
    from grpc_tools import protoc  # build-time dependency only

    out = out_root or PACKAGE_DIR.parent
    files = [f"{VIRTUAL_ROOT}/{p.relative_to(PROTO_ROOT).as_posix()}" for p in proto_files()]
    args = [
        "protoc",
        f"-I{VIRTUAL_ROOT}={PROTO_ROOT}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    for folder in (out / VIRTUAL_ROOT).rglob("*"):
        if folder.is_dir():
            (folder / "__init__.py").touch()
    (out / VIRTUAL_ROOT / "__init__.py").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
