"""The new kernels compile for an H100 (sm_90) on this CPU machine (``compile_for_hopper.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "tests.kernels.compile_for_hopper"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "case",
    [
        "gemv",
        "silu_gemv",
        "add_rmsnorm_gemv",
        "add_rmsnorm_gemv no residual",
        "gemv fp8",
        "silu_gemv fp8",
        "add_rmsnorm_gemv fp8",
        "lamport all-reduce",
        "lamport add_rmsnorm",
        "rotary_store_kv fp8",
        "rotary_store_kv bf16",
        "fused_add_rmsnorm",
        "decode_attention merged in one launch",
        "decode_attention e4m3 pool, large batch",
        "cascade shared prefix",
        "add_rmsnorm_quant_fp8",
        "silu_and_mul_quant_fp8",
        "prefill_attention pool",
        "prefill_attention chunk by pointers",
        "prefill_attention chunk by TMA 128x128",
    ],
)
def test_kernel_compiles_for_sm90(compiled: dict[str, str], case: str) -> None:
    assert compiled[case] == "ok", compiled[case]
