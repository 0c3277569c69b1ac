"""Warm-up's fusion choices on CPU: the decision logic with stubbed timings, and the
micro-benchmark's code path (in the interpreter, on tiny shapes, with a stub timer)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import triton.testing
from lightllm_grpc_kernels.gemv import GEMV_CONFIGS, GemvConfig

from lightllm_grpc.bench import fusions
from lightllm_grpc.layers import matmul_tuning, triton_ops
from lightllm_grpc.layers.linear import LinearBase
from lightllm_grpc.layers.ops import Ops
from lightllm_grpc.models.config import ModelConfig
from lightllm_grpc.models.loader import load_model
from lightllm_grpc.parallel import ParallelState, set_parallel_state
from tests.model_factory import make_tiny_model

CONFIG = GemvConfig(8, 512, 4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama3", tmp_path_factory.mktemp("m") / "llama3", standard_init=True)


def _model(model_dir: Path, world_size: int = 1):
    cfg = ModelConfig.from_pretrained(model_dir)
    backend = Ops.triton().attention(2, cfg.num_heads // world_size, cfg.head_dim, "cpu", torch.float32)
    return load_model(model_dir, device="cpu", dtype="float32", attn_backend=backend, ops=Ops.triton())


def _fuse_everything(model) -> None:
    """Every one-token fusion bound (what warm-up does where each wins), with the default config."""
    layer = model.model.layers[0]
    norm_shapes = {tuple(p.weight.shape) for p in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj)}
    assert matmul_tuning.use_silu_gemv(model, {tuple(layer.mlp.down_proj.weight.shape): GemvConfig()})
    assert matmul_tuning.use_norm_gemv(model, dict.fromkeys(norm_shapes, GemvConfig()))
    assert layer.self_attn.rotary_in_kv_store


def _tp_worker(
    rank: int, world_size: int, init_file: str, model_dir: Path, prompt: list[int], out: str
) -> None:
    from tests.kernels.conftest import _index_scalar_with_numpy_2_4, _round_to_e4m3_as_the_gpu_does
    from tests.kernels.test_ops import _logits

    _index_scalar_with_numpy_2_4()  # the interpreter's patches, as the parent's conftest made them
    _round_to_e4m3_as_the_gpu_does()
    set_parallel_state(ParallelState(rank, world_size))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = _model(model_dir, world_size)
        _fuse_everything(model)
        torch.save(_logits(model, [prompt], [[31], [400]]), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
        set_parallel_state(ParallelState())


def test_fusions_under_tensor_parallelism(tiny: Path, tmp_path: Path) -> None:
    """Two gloo ranks with every fusion bound (interpreter): the norm GEMVs take the all-reduced
    o_proj/down outputs, the fused down GEMV keeps its all-reduce; logits equal one native rank's."""
    prompt = [5, 9, 100, 7, 42]
    out = str(tmp_path / "logits")
    mp.spawn(_tp_worker, (2, str(tmp_path / "init"), tiny, prompt, out), nprocs=2)
    expected = _native_logits(tiny, prompt)
    for rank in range(2):
        torch.testing.assert_close(torch.load(f"{out}.{rank}"), expected, rtol=1e-4, atol=1e-4)


def _native_logits(model_dir: Path, prompt: list[int]) -> torch.Tensor:
    from tests.kernels.test_ops import _logits

    cfg = ModelConfig.from_pretrained(model_dir)
    native = load_model(
        model_dir,
        device="cpu",
        dtype="float32",
        attn_backend=Ops.native().attention(2, cfg.num_heads, cfg.head_dim, "cpu", torch.float32),
        ops=Ops.native(),
    )
    return _logits(native, [prompt], [[31], [400]])


@pytest.mark.parametrize(("split_ms", "fused_ms", "binds"), [(1.0, 0.5, True), (1.0, 0.995, False)])
def test_tune_silu_gemv_binds_only_a_clear_win(
    tiny: Path, split_ms: float, fused_ms: float, binds: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tiny)
    calls = []

    def timed(w, matmuls, configs=GEMV_CONFIGS):
        calls.append((tuple(w.shape), list(matmuls)))
        return [split_ms], [(fused_ms + 0.1, GemvConfig()), (fused_ms, CONFIG)]

    monkeypatch.setattr(matmul_tuning, "time_silu_gemv", timed)
    chosen = matmul_tuning.tune_silu_gemv(model)

    down = model.model.layers[0].mlp.down_proj
    assert calls == [(tuple(down.weight.shape), [F.linear])]  # one timing per shape, vs the bound matmul
    assert chosen == ({tuple(down.weight.shape): CONFIG} if binds else {})
    for layer in model.model.layers:
        assert (layer.mlp.down_proj.matmul is triton_ops.silu_gemv_matmul(CONFIG)) == binds


@pytest.mark.parametrize(("split_ms", "fused_ms", "binds"), [(1.0, 0.5, True), (1.0, 0.995, False)])
def test_tune_norm_gemv_binds_only_a_clear_win(
    tiny: Path, split_ms: float, fused_ms: float, binds: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qkv and gate_up are timed once per shape against the matmul each is bound to (here qkv on
    the GEMV kernel, gate_up on cuBLAS); an FP8-like (not unquantized) layer is left alone."""
    model = _model(tiny)
    layer = model.model.layers[0]
    qkv, gate_up = layer.self_attn.qkv_proj, layer.mlp.gate_up_proj
    matmul_tuning.use_gemv(model, {tuple(qkv.weight.shape): GemvConfig()})
    other = model.model.layers[1].mlp.gate_up_proj
    other.matmul = lambda x, w, b: F.linear(x, w, b)  # some other method's matmul (FP8's, say)
    calls = []

    def timed(w, matmuls, configs=GEMV_CONFIGS):
        calls.append((tuple(w.shape), list(matmuls)))
        return [split_ms], [(fused_ms, CONFIG), (fused_ms + 0.1, GemvConfig())]

    monkeypatch.setattr(matmul_tuning, "time_norm_gemv", timed)
    chosen = matmul_tuning.tune_norm_gemv(model)

    expected_calls = [
        (tuple(qkv.weight.shape), [triton_ops.gemv_matmul(GemvConfig())]),
        (tuple(gate_up.weight.shape), [F.linear]),
    ]
    assert sorted(calls, key=lambda c: c[0]) == sorted(expected_calls, key=lambda c: c[0])
    shapes = {tuple(qkv.weight.shape), tuple(gate_up.weight.shape)}
    assert chosen == (dict.fromkeys(shapes, CONFIG) if binds else {})
    for layer in model.model.layers:
        for step in (layer.attn_in, layer.mlp_in):
            fusable = step.pair[1] is not other
            assert (step.step is triton_ops.norm_gemv_step(CONFIG)) == (binds and fusable)


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


def test_profile_decode_compares_by_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    """The before/after table of ``profile_decode --compare`` (on made-up profiles)."""
    from lightllm_grpc.bench.profile_decode import print_comparison

    off = {
        "graph_ms": 4.65,
        "kernels_ms": 0.3,
        "rows": [["_gemv_kernel", 0.2, 96], ["_rotary_kernel", 0.07, 32]],
    }
    on = {
        "graph_ms": 4.5,
        "kernels_ms": 0.25,
        "rows": [["_gemv_kernel", 0.1, 32], ["_add_rmsnorm_gemv_kernel", 0.15, 64]],
    }

    print_comparison(off, on, 1, 128)

    out = capsys.readouterr().out
    assert "graph replay 4.650 -> 4.500 ms (-150.0 us)" in out
    assert "   0.070    32    0.000     0  _rotary_kernel" in out
    assert "launches per step: 128 -> 96" in out


def test_profile_decode_unfuses_before_warmup(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--fusions off``: rotary back to its own kernel, and warm-up tunes no fused GEMV."""
    from types import SimpleNamespace

    from lightllm_grpc.bench.profile_decode import unfuse

    model = _model(tiny)
    shard = SimpleNamespace(model=model, ops=Ops.triton())
    tuned = []
    monkeypatch.setattr(matmul_tuning, "tune_gemv", lambda m: tuned.append("gemv"))
    monkeypatch.setattr(matmul_tuning, "tune_gemv_rows", lambda m: tuned.append("rows"))
    monkeypatch.setattr(matmul_tuning, "tune_fp8_gemv", lambda m: tuned.append("fp8"))
    monkeypatch.setattr(matmul_tuning, "tune_silu_gemv", lambda m, fp8: tuned.append(f"silu fp8={fp8}"))
    monkeypatch.setattr(matmul_tuning, "tune_norm_gemv", lambda m, fp8: tuned.append(f"norm fp8={fp8}"))

    unfuse(shard)
    shard.ops.tune(model)

    assert tuned == ["gemv", "rows", "fp8"]
    assert not any(layer.self_attn.rotary_in_kv_store for layer in model.model.layers)
    Ops.triton().tune(model)
    fusions = ["silu fp8=False", "norm fp8=False", "silu fp8=True", "norm fp8=True"]
    assert tuned[3:] == ["gemv", "rows", "fp8", *fusions]  # the fusions time against the tuned matmuls


def test_fp8_fusions_are_timed_with_the_w8a16_tiles_and_the_layers_scales(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fp8=True``: each FP8 shape is timed once against its bound FP8 matmul, with the W8A16
    kernel's one-token tiles, the layer's weight scale and the model dtype's activations; the
    winners are bound with those scales. The unquantized pass finds nothing to fuse in an FP8
    model, and a reference-path FP8 layer is left alone."""
    from lightllm_grpc_kernels.fp8_gemv import FP8_GEMV_CONFIGS_ONE_TOKEN, Fp8GemvConfig

    from lightllm_grpc.layers import fp8

    cfg = ModelConfig.from_pretrained(tiny)
    backend = Ops.triton().attention(2, cfg.num_heads, cfg.head_dim, "cpu", torch.float32)
    model = load_model(
        tiny, device="cpu", dtype="float32", attn_backend=backend, ops=Ops.triton(), quantization="fp8"
    )
    reference = model.model.layers[1].mlp.down_proj  # stays on fp8_linear_ref
    for m in model.modules():
        if fp8.is_fp8(m) and m is not reference:
            m.matmul = dataclasses.replace(m.matmul, gemm=fp8.fp8_linear_cuda)
    best = Fp8GemvConfig(8, 1024, 4, 3)
    calls = []

    def timed(w, matmuls, configs=GEMV_CONFIGS, scale=None, dtype=None):
        calls.append((tuple(w.shape), matmuls, configs, scale, dtype))
        return [1.0], [(0.9, Fp8GemvConfig()), (0.5, best)]

    monkeypatch.setattr(matmul_tuning, "time_silu_gemv", timed)
    monkeypatch.setattr(matmul_tuning, "time_norm_gemv", timed)
    assert matmul_tuning.tune_silu_gemv(model) == {} and matmul_tuning.tune_norm_gemv(model) == {}
    assert calls == []

    down = matmul_tuning.tune_silu_gemv(model, fp8=True)
    norm = matmul_tuning.tune_norm_gemv(model, fp8=True)

    layer = model.model.layers[0]
    assert down == {tuple(layer.mlp.down_proj.weight.shape): best} and len(norm) == 2
    for shape, matmuls, configs, scale, dtype in calls:
        same_shape = [m for m in model.modules() if fp8.is_fp8(m) and tuple(m.weight.shape) == shape]
        assert configs is FP8_GEMV_CONFIGS_ONE_TOKEN and dtype == torch.float32
        assert any(scale is matmuls[0].weight_scale is m.weight_scale for m in same_shape)
    assert len(calls) == 3  # down, qkv, gate_up: one timing per shape
    assert layer.mlp.down_proj.matmul.scale is layer.mlp.down_proj.weight_scale
    assert reference.matmul.gemm is fp8.fp8_linear_ref  # never fused
    assert layer.attn_in.step is triton_ops.norm_gemv_step(best, fp8=True)


def test_tune_gemv_rows_binds_per_count_beside_the_one_token_choice(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each unquantized weight shape is timed once, against cuBLAS; a shape's layers get the
    counts where the GEMV won by the margin, keeping their one-token GEMV; a layer of another
    method (FP8's, say) and a shape that never won keep their matmul."""
    model = _model(tiny)
    layer = model.model.layers[0]
    qkv, o, down = layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.down_proj
    matmul_tuning.use_gemv(model, {tuple(qkv.weight.shape): GemvConfig()})
    other = model.model.layers[1].self_attn.o_proj
    other.matmul = lambda x, w, b: F.linear(x, w, b)  # some other method's matmul
    wins = {tuple(qkv.weight.shape): (0.5, 1.0, 0.99), tuple(o.weight.shape): (0.99, 0.5, 2.0)}
    timed_shapes = []

    def timings(w, alternative):
        assert alternative is F.linear
        timed_shapes.append(tuple(w.shape))
        gemv_ms = wins.get(tuple(w.shape), (2.0, 2.0, 2.0))
        return {m: (1.0, [(ms, CONFIG)]) for m, ms in zip((2, 3, 4), gemv_ms, strict=True)}

    monkeypatch.setattr(matmul_tuning, "rows_timings", timings)
    chosen = matmul_tuning.tune_gemv_rows(model)

    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, LinearBase)}
    assert sorted(timed_shapes) == sorted(shapes | {tuple(model.lm_head.weight.shape)})  # once each
    assert chosen == {tuple(qkv.weight.shape): (CONFIG,), tuple(o.weight.shape): (None, CONFIG)}
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        assert attn.qkv_proj.matmul is triton_ops.gemv_matmul(GemvConfig(), (CONFIG,))
        if i != 1:
            assert attn.o_proj.matmul is triton_ops.gemv_matmul(None, (None, CONFIG))
        assert layer.mlp.down_proj.matmul is F.linear and down.matmul is F.linear
    assert other.matmul is not F.linear and not isinstance(other.matmul, triton_ops.GemvMatmul)


def _fp8_model(model_dir: Path):
    cfg = ModelConfig.from_pretrained(model_dir)
    backend = Ops.triton().attention(2, cfg.num_heads, cfg.head_dim, "cpu", torch.float32)
    return load_model(
        model_dir, device="cpu", dtype="float32", attn_backend=backend, ops=Ops.triton(), quantization="fp8"
    )


def _counted(monkeypatch: pytest.MonkeyPatch, module: object, names: tuple[str, ...]) -> dict[str, int]:
    """Counts the calls of ``module``'s functions ``names`` from now on."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        fn = getattr(module, name)

        def call(*args, _name=name, _fn=fn, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, name, call)
    return calls


@pytest.mark.parametrize("silu_from", [17, 64])
def test_fp8_activations_are_quantized_by_the_norm_and_silu_kernels_above_16_tokens(
    tiny: Path, monkeypatch: pytest.MonkeyPatch, silu_from: int
) -> None:
    """``use_fp8_act_quant`` (interpreter; ``_scaled_mm`` replaced by its reference): past
    ``W8A16_MAX_M`` tokens qkv and gate_up take their input from the norm kernel that quantizes,
    and from ``min_rows`` tokens down from the SiLU kernel that does; the logits are those of
    the separate kernels bit for bit; a one-token decode step keeps the path bound before; a
    second call binds nothing."""
    from lightllm_grpc.layers import fp8, fp8_act_quant
    from tests.kernels.test_ops import _logits

    model = _fp8_model(tiny)
    layers, inter = len(model.model.layers), model.model.layers[0].mlp.down_proj.weight.shape[1]
    prompts, decode = [list(range(3, 3 + fp8.W8A16_MAX_M + 4))], [[31]]  # a 20-token prompt
    before = _logits(model, prompts, decode)

    monkeypatch.setattr(fp8_act_quant, "scaled_mm_applies", lambda *_: True)
    bind = {inter: silu_from}
    assert fp8_act_quant.use_fp8_act_quant(model, bind, mm=fp8.fp8_scaled_mm_ref) == 3 * layers
    assert fp8_act_quant.use_fp8_act_quant(model, bind, mm=fp8.fp8_scaled_mm_ref) == 0
    calls = _counted(monkeypatch, fp8_act_quant, ("add_rmsnorm_quant_fp8", "silu_and_mul_quant_fp8"))
    after = _logits(model, prompts, decode)
    silu = layers if silu_from <= 20 else 0  # the prompt's step only
    assert calls == {"add_rmsnorm_quant_fp8": 2 * layers, "silu_and_mul_quant_fp8": silu}
    assert torch.equal(after, before)


def test_fp8_silu_quantization_is_bound_from_where_it_won_at_every_larger_probe(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``silu_quant_min_rows``: the fused SiLU kernel from the smallest probe past which it always
    won, never at 16 tokens or fewer, not at all if it lost at the largest; ``tune_fp8_act_quant``
    times each FP8 down width once and binds what it picked (no width: the norms alone)."""
    from lightllm_grpc.layers import fp8_act_quant

    pick = fp8_act_quant.silu_quant_min_rows
    assert pick({32: (1.0, 2.0), 256: (1.0, 0.9), 512: (2.0, 1.5), 8192: (9.0, 7.0)}) == 256
    assert pick({32: (1.0, 0.9), 256: (1.0, 1.1), 8192: (9.0, 7.0)}) == 8192  # lost in between
    assert pick({8: (1.0, 0.5), 64: (1.0, 0.9)}) == 17  # never within the W8A16 counts
    assert pick({32: (1.0, 0.9), 8192: (9.0, 9.5)}) is None

    # A probe is timed only where its buffers fit in half of the spare memory.
    assert fp8_act_quant.affordable_probes(1000, 2 * 8 * 1000 * 512) == (32, 64, 128, 256, 512)
    assert fp8_act_quant.affordable_probes(1000, 0) == ()

    model = _fp8_model(tiny)
    monkeypatch.setattr(fp8_act_quant, "scaled_mm_applies", lambda *_: True)
    monkeypatch.setattr(fp8_act_quant, "_spare_bytes", lambda _: 1 << 40)
    timed = []

    def stub(inter, device, dtype, probes):
        timed.append((inter, dtype, probes))
        return {32: (1.0, 2.0), 64: (1.0, 0.5)}

    monkeypatch.setattr(fp8_act_quant, "time_silu_quant", stub)
    layers, mlp = len(model.model.layers), model.model.layers[0].mlp
    assert fp8_act_quant.tune_fp8_act_quant(model) == 3 * layers
    assert timed == [(mlp.down_proj.weight.shape[1], torch.float32, fp8_act_quant.SILU_QUANT_PROBES)]
    assert mlp.down_proj.matmul.min_rows == 64
    assert mlp.act_in_down and isinstance(mlp.down_proj.matmul.small, fp8_act_quant.SiluThenMatmul)

    model = _fp8_model(tiny)
    monkeypatch.setattr(fp8_act_quant, "time_silu_quant", lambda *_, **__: {64: (1.0, 2.0)})
    assert fp8_act_quant.tune_fp8_act_quant(model) == 2 * layers
    assert not model.model.layers[0].mlp.act_in_down
