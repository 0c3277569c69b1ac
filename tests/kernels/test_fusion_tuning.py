"""Warm-up's fusion choices on CPU: the decision logic with stubbed timings, and the
micro-benchmark's code path (in the interpreter, on tiny shapes, with a stub timer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton.testing
from lightllm_grpc_kernels.gemv import GemvConfig

from lightllm_grpc.bench import fusions
from lightllm_grpc.layers import triton_ops
from lightllm_grpc.layers.ops import Ops
from lightllm_grpc.models.loader import load_model
from tests.model_factory import make_tiny_model

CONFIG = GemvConfig(8, 512, 4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama3", tmp_path_factory.mktemp("m") / "llama3", standard_init=True)


def _model(model_dir: Path):
    from lightllm_grpc.models.config import ModelConfig

    cfg = ModelConfig.from_pretrained(model_dir)
    backend = Ops.triton().attention(1, cfg.num_heads, cfg.head_dim, "cpu", torch.float32)
    return load_model(model_dir, device="cpu", dtype="float32", attn_backend=backend, ops=Ops.triton())


@pytest.mark.parametrize(("split_ms", "fused_ms", "binds"), [(1.0, 0.5, True), (1.0, 0.995, False)])
def test_tune_silu_gemv_binds_only_a_clear_win(
    tiny: Path, split_ms: float, fused_ms: float, binds: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tiny)
    calls = []

    def timed(w, matmuls, configs=triton_ops.GEMV_CONFIGS):
        calls.append((tuple(w.shape), list(matmuls)))
        return [split_ms], [(fused_ms + 0.1, GemvConfig()), (fused_ms, CONFIG)]

    monkeypatch.setattr(triton_ops, "time_silu_gemv", timed)
    chosen = triton_ops.tune_silu_gemv(model)

    down = model.model.layers[0].mlp.down_proj
    assert calls == [(tuple(down.weight.shape), [F.linear])]  # one timing per shape, vs the bound matmul
    assert chosen == ({tuple(down.weight.shape): CONFIG} if binds else {})
    for layer in model.model.layers:
        assert (layer.mlp.down_proj.matmul is triton_ops.silu_gemv_matmul(CONFIG)) == binds


def test_fusions_bench_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's code path on tiny shapes in the interpreter, each timed call run once."""
    monkeypatch.setattr(fusions, "DEVICE", "cpu")
    monkeypatch.setattr(fusions, "HIDDEN", 32)
    monkeypatch.setattr(fusions, "INTER", 48)
    monkeypatch.setattr(fusions, "GEMV_CONFIGS", (GemvConfig(), CONFIG))
    ticks = iter(range(1, 1000))
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn: (fn(), next(ticks) * 1e-3)[1])

    monkeypatch.setattr(fusions, "HEADS", 2)
    monkeypatch.setattr(fusions, "KV_HEADS", 1)
    monkeypatch.setattr(fusions, "HEAD_DIM", 8)

    silu, norm = fusions.bench_silu(1), fusions.bench_norm(1)

    assert silu[0].startswith("down (32, 48) (TP=1)")
    assert norm[0].startswith("qkv (32, 32) (TP=1)")
    assert any(line.startswith("gate_up (96, 32) (TP=1)") for line in norm)
    for lines in (silu, norm):
        assert any("best fused" in line for line in lines) and lines[-1].startswith("  -> ")
