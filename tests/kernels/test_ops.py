"""Op selection per model: a native (torch) model and a Triton-ops model side by side in one process.

On CPU the Triton model runs in the interpreter (fp32, tiny shapes); on a GPU it runs compiled.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightllm_grpc_kernels.gemv import GemvConfig

from lightllm_grpc.layers import activation, fp8, matmul_tuning, norm, rotary, triton_ops
from lightllm_grpc.layers.activation import SiluAndMul
from lightllm_grpc.layers.attention.torch_backend import TorchAttentionBackend
from lightllm_grpc.layers.attention.triton_backend import TritonAttentionBackend
from lightllm_grpc.layers.embedding import ParallelLMHead
from lightllm_grpc.layers.forward_batch import ForwardMode
from lightllm_grpc.layers.linear import LinearBase
from lightllm_grpc.layers.norm import RMSNorm
from lightllm_grpc.layers.ops import Ops
from lightllm_grpc.layers.rotary import RotaryEmbedding
from lightllm_grpc.models.config import ModelConfig
from lightllm_grpc.models.llama import LlamaForCausalLM
from lightllm_grpc.models.loader import load_model
from tests.model_factory import build_batch, make_tiny_model

PROMPTS = [[5, 9, 100, 7, 42], [300, 2, 11, 11, 64, 90, 17, 3, 8]]
DECODE = [[31, 400], [77, 12], [5, 250]]  # fixed decode inputs: both models see the same tokens


def _load(
    model_dir: Path,
    ops: Ops,
    device: torch.device,
    kv_cache_dtype: str = "auto",
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
) -> LlamaForCausalLM:
    cfg = ModelConfig.from_pretrained(model_dir)
    backend = ops.attention(len(PROMPTS), cfg.num_heads, cfg.head_dim, device, dtype)
    return load_model(
        model_dir,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        attn_backend=backend,
        ops=ops,
        kv_cache_dtype=kv_cache_dtype,
        quantization=quantization,
    )


def _logits(model: LlamaForCausalLM, prompts: list[list[int]], decode: list[list[int]]) -> torch.Tensor:
    """Packed prefill of ``prompts``, then one decode step per entry of ``decode``; ``[steps+1, B, V]``."""
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    max_len = max(map(len, prompts)) + len(decode)
    kv = model.kv_cache_spec.make_cache(len(prompts) * max_len + 1, dtype, device)
    table = torch.arange(len(prompts) * max_len, dtype=torch.int32).flip(0).view(len(prompts), max_len)
    rows, lens, out = list(range(len(prompts))), [0] * len(prompts), []
    steps = [(ForwardMode.PREFILL, prompts)] + [(ForwardMode.DECODE, [[t] for t in d]) for d in decode]
    with torch.no_grad():
        for mode, tokens in steps:
            ids, batch = build_batch(mode, tokens, lens, rows, table)
            fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
            out.append(model(ids.to(device), type(batch)(**fields), kv).cpu())
            lens = [n + len(t) for n, t in zip(lens, tokens, strict=True)]
    return torch.stack(out)


def _bound_ops(model: LlamaForCausalLM) -> set[object]:
    """Every op callable the model's layers hold."""
    found: set[object] = set()
    for m in model.modules():
        if isinstance(m, RMSNorm):
            found |= {m._rms_norm, m._add_rms_norm}
        elif isinstance(m, SiluAndMul):
            found.add(m._silu_and_mul)
        elif isinstance(m, RotaryEmbedding):
            found.add(m._apply_rotary)
        elif isinstance(m, (LinearBase, ParallelLMHead)):
            found.add(m.matmul)
    return found


NATIVE_OPS = {norm.rms_norm, norm.add_rms_norm, activation.silu_and_mul, rotary.apply_rotary, F.linear}
TRITON_OPS = {
    triton_ops.rms_norm,
    triton_ops.add_rms_norm,
    triton_ops.silu_and_mul,
    triton_ops.apply_rotary,
    F.linear,  # cuBLAS until warm-up tuning picks the GEMV kernel for a layer
}


def test_for_device_picks_triton_on_cuda_only() -> None:
    assert Ops.for_device("cpu") == Ops.native()
    assert Ops.for_device(torch.device("cuda", 0)) == Ops.triton()
    assert Ops.native().tune is None and Ops.triton().tune is matmul_tuning.tune_matmuls
    assert isinstance(Ops.native().attention(1, 2, 16, "cpu", torch.float32), TorchAttentionBackend)


def test_native_and_triton_models_agree_in_one_process(tmp_path: Path, device: torch.device) -> None:
    """Same logits from both (fp32), each model holds only its own ops, and building or running
    the Triton model leaves the native one bit-identical. qwen3 has every op: per-head q/k norms too."""
    model_dir = make_tiny_model("qwen3", tmp_path / "qwen3", standard_init=True)
    native = _load(model_dir, Ops.native(), torch.device("cpu"))
    before = _logits(native, PROMPTS, DECODE)

    fast = _load(model_dir, Ops.triton(), device)
    assert isinstance(fast.model.layers[0].self_attn.backend, TritonAttentionBackend)
    fast_logits = _logits(fast, PROMPTS, DECODE)

    assert _bound_ops(native) == NATIVE_OPS
    assert _bound_ops(fast) == TRITON_OPS
    torch.testing.assert_close(fast_logits, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_logits(native, PROMPTS, DECODE), before, rtol=0, atol=0)


def test_native_and_triton_models_agree_with_an_fp8_kv_cache(tmp_path: Path, device: torch.device) -> None:
    """The same with --kv-cache-dtype fp8_e4m3 (prefill, then decode steps reading the e4m3 pool
    the earlier steps stored): the Triton store and attention against the torch backend's, with
    per-layer scales from the checkpoint (not 1.0, so that a path which ignored one would show)."""
    model_dir = _with_scales(make_tiny_model("qwen3", tmp_path / "qwen3", standard_init=True))
    native = _load(model_dir, Ops.native(), torch.device("cpu"), "fp8_e4m3")
    fast = _load(model_dir, Ops.triton(), device, "fp8_e4m3")
    assert native.kv_cache_spec.fp8 and fast.kv_cache_spec.fp8
    expected = _logits(native, PROMPTS, DECODE)
    torch.testing.assert_close(_logits(fast, PROMPTS, DECODE), expected, rtol=1e-4, atol=1e-4)
    full = _logits(_load(model_dir, Ops.native(), torch.device("cpu")), PROMPTS, DECODE)
    assert not torch.allclose(full, expected, rtol=1e-4, atol=1e-4)  # the e4m3 rounding shows


def _with_scales(model_dir: Path) -> Path:
    """Per-layer KV-cache scales (not 1.0) written into the checkpoint, for an FP8 pool."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    for layer in range(2):
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(0.02 + 0.01 * layer)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(0.05 - 0.01 * layer)
    save_file(tensors, model_dir / "model.safetensors")
    return model_dir


def test_rotary_in_the_kv_store_changes_no_logit(tmp_path: Path, device: torch.device) -> None:
    """The Triton ops rotate q/k inside the KV store kernel (one launch); the same ops with the
    rotary kernel then the store kernel give bit-identical logits (prefill, then decode steps
    reading what earlier steps stored), with q/k norms first (qwen3) and an FP8 pool (the model-
    dtype pool: the other tests of this file, and the backend's). Natively the torch backend's
    ``rotate_and_store`` (the base class's: rotary, then store) is bit-identical too."""
    kv_cache_dtype = "fp8_e4m3"
    model_dir = _with_scales(make_tiny_model("qwen3", tmp_path / "qwen3", standard_init=True))
    fused = _load(model_dir, Ops.triton(), device, kv_cache_dtype)
    assert fused.model.layers[0].self_attn.rotary_in_kv_store
    split = _load(
        model_dir, dataclasses.replace(Ops.triton(), rotary_in_kv_store=False), device, kv_cache_dtype
    )
    torch.testing.assert_close(
        _logits(fused, PROMPTS, DECODE), _logits(split, PROMPTS, DECODE), rtol=0, atol=0
    )

    cpu = torch.device("cpu")
    native = _load(model_dir, Ops.native(), cpu, kv_cache_dtype)
    handed = _load(model_dir, dataclasses.replace(Ops.native(), rotary_in_kv_store=True), cpu, kv_cache_dtype)
    torch.testing.assert_close(
        _logits(handed, PROMPTS, DECODE), _logits(native, PROMPTS, DECODE), rtol=0, atol=0
    )


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])
def test_rotary_in_the_kv_store_changes_no_logit_bf16(kv_cache_dtype: str, tmp_path: Path) -> None:
    """The same in bf16 on the GPU (compiled kernels; the interpreter's bf16 is not the GPU's)."""
    model_dir = _with_scales(make_tiny_model("qwen3", tmp_path / "qwen3", standard_init=True))
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    fused = _load(model_dir, Ops.triton(), cuda, kv_cache_dtype, bf16)
    split = _load(
        model_dir, dataclasses.replace(Ops.triton(), rotary_in_kv_store=False), cuda, kv_cache_dtype, bf16
    )
    native = _load(model_dir, Ops.native(), cuda, kv_cache_dtype, bf16)
    expected = _logits(split, PROMPTS, DECODE)
    torch.testing.assert_close(_logits(fused, PROMPTS, DECODE), expected, rtol=0, atol=0)
    torch.testing.assert_close(_logits(native, PROMPTS, DECODE), expected, rtol=2e-2, atol=2e-2)


def test_a_few_tokens_take_the_few_token_gemv_where_bound(
    monkeypatch: pytest.MonkeyPatch, device: torch.device
) -> None:
    """``GemvMatmul(config, rows)``: one token through the GEMV (cuBLAS without a config), the
    token counts ``rows`` binds (here 2 and 4) through ``gemv_rows``, others through cuBLAS; the
    bias added once on every path."""
    gen = torch.Generator().manual_seed(3)
    x_all, w, bias = (torch.randn(*s, generator=gen).to(device) for s in ((5, 48), (24, 48), (24,)))
    rows = (GemvConfig(8, 32), None, GemvConfig(4, 16))
    seen: list[int] = []
    real = triton_ops.gemv_rows
    monkeypatch.setattr(triton_ops, "gemv_rows", lambda x, *a: seen.append(len(x)) or real(x, *a))
    for config in (GemvConfig(8, 32), None):
        matmul = triton_ops.gemv_matmul(config, rows)
        assert matmul is triton_ops.gemv_matmul(config, rows)  # one per choice, shared by its layers
        for m in range(1, 6):
            x = x_all[:m]
            torch.testing.assert_close(matmul(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
        assert seen == [2, 4]
        seen.clear()


def test_the_fused_down_projection_keeps_the_few_token_gemv(tmp_path: Path, device: torch.device) -> None:
    """SiLU folded into a down projection at one token leaves its two-token steps to the matmul
    the layer had (the few-token GEMV where ``tune_gemv_rows`` bound it), not cuBLAS; the
    logits of both models match at every step."""
    model_dir = make_tiny_model("llama3", tmp_path / "llama3", standard_init=True)
    split, fused = _load(model_dir, Ops.triton(), device), _load(model_dir, Ops.triton(), device)
    down = tuple(split.model.layers[0].mlp.down_proj.weight.shape)
    config, rows = GemvConfig(), (GemvConfig(8, 32),)
    for model in (split, fused):
        for layer in model.model.layers:
            layer.mlp.down_proj.matmul = triton_ops.gemv_matmul(None, rows)

    assert matmul_tuning.use_silu_gemv(fused, {down: config}) == len(fused.model.layers)

    rows_matmul = triton_ops.gemv_matmul(None, rows)
    for layer in fused.model.layers:
        assert layer.mlp.down_proj.matmul is triton_ops.silu_gemv_matmul(config, rows_matmul)
        assert layer.mlp.down_proj.matmul.fallback is rows_matmul
    torch.testing.assert_close(
        _logits(fused, PROMPTS, DECODE), _logits(split, PROMPTS, DECODE), rtol=1e-5, atol=1e-5
    )


def test_gemv_is_bound_per_layer(tmp_path: Path, device: torch.device) -> None:
    """What warm-up tuning does when the GEMV kernel wins: only that model's layers of the chosen
    shapes change, and one-token decode still matches the native model."""
    model_dir = make_tiny_model("llama3", tmp_path / "llama3", standard_init=True)
    native = _load(model_dir, Ops.native(), torch.device("cpu"))
    fast = _load(model_dir, Ops.triton(), device)
    qkv_shape = tuple(fast.model.layers[0].self_attn.qkv_proj.weight.shape)
    head_shape = tuple(fast.lm_head.weight.shape)
    config = GemvConfig()

    changed = matmul_tuning.use_gemv(fast, {qkv_shape: config, head_shape: config})

    assert changed == len(fast.model.layers) + 1  # every qkv_proj and the (untied) head
    gemv = triton_ops.gemv_matmul(config)
    assert fast.lm_head.matmul is gemv and fast.model.layers[1].self_attn.qkv_proj.matmul is gemv
    assert fast.model.layers[0].self_attn.o_proj.matmul is F.linear
    assert _bound_ops(native) == NATIVE_OPS
    one, steps = [PROMPTS[1]], [[d[0]] for d in DECODE]
    torch.testing.assert_close(_logits(fast, one, steps), _logits(native, one, steps), rtol=1e-4, atol=1e-4)


def test_norms_folded_into_the_next_gemv_change_no_logit(tmp_path: Path, device: torch.device) -> None:
    """What warm-up does when every fused GEMV wins: each decoder layer's two norm steps run
    ``add_rmsnorm_gemv`` at one token and each MLP's down projection ``silu_gemv`` (its separate
    activation gone); the logits are bit-identical to the norm and SiLU kernels then the plain
    GEMV of the same config (one token; the first layer has no residual yet), and to those
    kernels then cuBLAS (the prefill and two-row decode steps). qwen2 has a qkv bias."""
    model_dir = make_tiny_model("qwen2", tmp_path / "qwen2", standard_init=True)
    split, fused = _load(model_dir, Ops.triton(), device), _load(model_dir, Ops.triton(), device)
    for a, b in zip(split.model.layers, fused.model.layers, strict=True):  # transformers' init is 0
        b.self_attn.qkv_proj.bias.copy_(a.self_attn.qkv_proj.bias.normal_(0, 0.5))
    layer = split.model.layers[0]
    shapes = [tuple(p.weight.shape) for p in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj)]
    down = tuple(layer.mlp.down_proj.weight.shape)
    config = GemvConfig()
    matmul_tuning.use_gemv(split, {s: config for s in [*shapes, down]})

    assert matmul_tuning.use_silu_gemv(fused, {down: config}) == len(fused.model.layers)
    assert matmul_tuning.use_norm_gemv(fused, {s: config for s in shapes}) == 2 * len(fused.model.layers)

    step = triton_ops.norm_gemv_step(config)
    for layer in fused.model.layers:
        assert layer.attn_in.step is step and layer.mlp_in.step is step
        assert layer.attn_in.pair == (layer.input_layernorm, layer.self_attn.qkv_proj)
        assert layer.mlp.down_proj.matmul is triton_ops.silu_gemv_matmul(config)
        assert isinstance(layer.mlp.act_fn, torch.nn.Identity)
        assert layer.mlp.gate_up_proj.matmul is F.linear  # the norm step multiplies, not the layer
    assert layer.self_attn.qkv_proj.bias is not None
    assert matmul_tuning.use_norm_gemv(fused, {s: config for s in shapes}) == 0  # already fused
    assert matmul_tuning.use_silu_gemv(fused, {down: config}) == 0
    one, steps = [PROMPTS[1]], [[d[0]] for d in DECODE]
    assert torch.equal(_logits(fused, one, steps), _logits(split, one, steps))
    assert torch.equal(_logits(fused, PROMPTS, DECODE[:1]), _logits(split, PROMPTS, DECODE[:1]))


def _on_w8a16(model: LlamaForCausalLM) -> None:
    """Every FP8 layer on the Hopper matmul (``fp8_linear_cuda``; its W8A16 GEMV runs in the
    interpreter on CPU), as a GPU build binds it; the CPU build binds the reference."""
    for m in model.modules():
        if fp8.is_fp8(m):
            m.matmul = dataclasses.replace(m.matmul, gemm=fp8.fp8_linear_cuda)


def test_fp8_norms_and_silu_folded_into_the_gemv_change_no_logit(
    tmp_path: Path, device: torch.device
) -> None:
    """FP8 layers (quantized at load, weight-only at one token): warm-up's FP8 fusions bind the
    same GEMV kernels with the layers' scales and biases, and the one-token logits are
    bit-identical to the norm and SiLU kernels then the W8A16 GEMV. A reference-path FP8 layer
    (CPU's) and an unquantized one are not FP8-fusable."""
    model_dir = make_tiny_model("qwen2", tmp_path / "qwen2", standard_init=True)
    split, fused = (_load(model_dir, Ops.triton(), device, quantization="fp8") for _ in range(2))
    layer = split.model.layers[0]
    shapes = [tuple(p.weight.shape) for p in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj)]
    down = tuple(layer.mlp.down_proj.weight.shape)
    config = GemvConfig(16, 64, 4)
    assert matmul_tuning.use_silu_gemv(fused, {down: config}, fp8=True) == 0  # reference matmuls
    for model in (split, fused):
        _on_w8a16(model)
        for a in model.model.layers:  # transformers' init is 0: give the kernel's bias a value
            torch.manual_seed(a.self_attn.layer_id)
            a.self_attn.qkv_proj.bias.normal_(0, 0.5)
    assert matmul_tuning.use_silu_gemv(fused, {down: config}) == 0  # not unquantized

    assert matmul_tuning.use_silu_gemv(fused, {down: config}, fp8=True) == len(fused.model.layers)
    assert matmul_tuning.use_norm_gemv(fused, {s: config for s in shapes}, fp8=True) == 2 * len(
        fused.model.layers
    )

    for a in fused.model.layers:
        assert a.attn_in.step is triton_ops.norm_gemv_step(config, fp8=True) is a.mlp_in.step
        silu = a.mlp.down_proj.matmul
        assert isinstance(silu, triton_ops.SiluGemvMatmul) and silu.scale is a.mlp.down_proj.weight_scale
        assert isinstance(silu.fallback, fp8.Fp8Matmul)  # more tokens: SiLU, then the FP8 matmul
    one, steps = [PROMPTS[1]], [[d[0]] for d in DECODE]
    assert torch.equal(_logits(fused, one, steps), _logits(split, one, steps))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_every_fusion_keeps_the_logits_bf16(arch: str, tmp_path: Path) -> None:
    """bf16 on the GPU, compiled: rotary in the store, the down GEMV with SiLU and the qkv and
    gate_up GEMVs with the norms, all bound with the config ``tune_gemv`` gave each shape: one-
    token logits bit-identical to the same model with no fusion but the same GEMV configs."""
    model_dir = make_tiny_model(arch, tmp_path / arch, standard_init=True)
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    fused = _load(model_dir, Ops.triton(), cuda, dtype=bf16)
    split = _load(model_dir, dataclasses.replace(Ops.triton(), rotary_in_kv_store=False), cuda, dtype=bf16)
    layer = split.model.layers[0]
    shapes = {tuple(p.weight.shape) for p in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj)}
    down = tuple(layer.mlp.down_proj.weight.shape)
    configs = {s: GemvConfig(8, 512, 4) for s in [*shapes, down]}
    matmul_tuning.use_gemv(split, configs)
    matmul_tuning.use_silu_gemv(fused, {down: configs[down]})
    matmul_tuning.use_norm_gemv(fused, {s: configs[s] for s in shapes})
    one, steps = [PROMPTS[1]], [[d[0]] for d in DECODE]
    assert torch.equal(_logits(fused, one, steps), _logits(split, one, steps))


@pytest.mark.gpu
def test_tune_norm_gemv_keeps_the_logits_bf16(tmp_path: Path) -> None:
    """Warm-up's whole hook in bf16 on the GPU (``tune_matmuls``: GEMV or cuBLAS, then the two
    fusions where they time faster): one-token logits within bf16 rounding of the untuned model,
    and every norm step either fused with a chosen config or as built."""
    model_dir = make_tiny_model("llama3", tmp_path / "llama3", standard_init=True)
    fast = _load(model_dir, Ops.triton(), torch.device("cuda"), dtype=torch.bfloat16)
    one, steps = [PROMPTS[1]], [[d[0]] for d in DECODE]
    before = _logits(fast, one, steps)

    matmul_tuning.tune_matmuls(fast)

    for layer in fast.model.layers:
        for step in (layer.attn_in, layer.mlp_in):
            assert step.step is norm.norm_then_linear or isinstance(step.step, triton_ops.NormGemvStep)
    torch.testing.assert_close(_logits(fast, one, steps), before, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_tune_silu_gemv_keeps_the_logits_bf16(tmp_path: Path) -> None:
    """Warm-up's choice on the GPU in bf16: after ``tune_gemv`` and ``tune_silu_gemv`` each down
    projection is fused exactly where it was chosen, and one-token logits hold (within bf16
    rounding: the fused config may differ from the one ``tune_gemv`` bound, or from cuBLAS)."""
    model_dir = make_tiny_model("llama3", tmp_path / "llama3", standard_init=True)
    cuda = torch.device("cuda")
    fast = _load(model_dir, Ops.triton(), cuda, dtype=torch.bfloat16)
    one, steps = [PROMPTS[1]], [[d[0]] for d in DECODE]
    matmul_tuning.tune_gemv(fast)
    before = _logits(fast, one, steps)
    unfused = [layer.mlp.down_proj.matmul for layer in fast.model.layers]

    chosen = matmul_tuning.tune_silu_gemv(fast)

    for layer, was in zip(fast.model.layers, unfused, strict=True):
        config = chosen.get(tuple(layer.mlp.down_proj.weight.shape))
        fused = config is not None and layer.mlp.down_proj.matmul is triton_ops.silu_gemv_matmul(config, was)
        assert fused == (config is not None) == isinstance(layer.mlp.act_fn, torch.nn.Identity)
    torch.testing.assert_close(_logits(fast, one, steps), before, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_tune_gemv_binds_the_winners_in_its_own_model_only(tmp_path: Path) -> None:
    """Warm-up tuning on the GPU: each layer ends with the GEMV kernel of its shape's winning config
    or cuBLAS, a native model in the same process keeps cuBLAS, and one-token logits hold."""
    model_dir = make_tiny_model("llama3", tmp_path / "llama3", standard_init=True)
    cuda = torch.device("cuda")
    native = _load(model_dir, Ops.native(), cuda)
    fast = _load(model_dir, Ops.triton(), cuda)
    one, steps = [PROMPTS[1]], [[d[0]] for d in DECODE]
    before = _logits(fast, one, steps)

    chosen = matmul_tuning.tune_gemv(fast)

    for m in fast.modules():
        if isinstance(m, (LinearBase, ParallelLMHead)):
            config = chosen.get(tuple(m.weight.shape))
            assert m.matmul is (F.linear if config is None else triton_ops.gemv_matmul(config))
    assert _bound_ops(native) == NATIVE_OPS
    torch.testing.assert_close(_logits(fast, one, steps), before, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_tune_gemv_rows_binds_per_token_count_beside_the_one_token_choice(tmp_path: Path) -> None:
    """After ``tune_gemv``, ``tune_gemv_rows`` gives each unquantized layer its shape's few-token
    choices and keeps its one-token one; logits of two- and one-row decode steps hold (bf16)."""
    model_dir = make_tiny_model("llama3", tmp_path / "llama3", standard_init=True)
    fast = _load(model_dir, Ops.triton(), torch.device("cuda"), dtype=torch.bfloat16)
    one_token = matmul_tuning.tune_gemv(fast)
    before = _logits(fast, PROMPTS, DECODE), _logits(fast, [PROMPTS[1]], [[d[0]] for d in DECODE])

    chosen = matmul_tuning.tune_gemv_rows(fast)

    for m in fast.modules():
        if isinstance(m, (LinearBase, ParallelLMHead)):
            shape = tuple(m.weight.shape)
            config, rows = one_token.get(shape), chosen.get(shape, ())
            assert m.matmul is (triton_ops.gemv_matmul(config, rows) if config or rows else F.linear)
            assert all(len(r) <= 3 and r[-1] is not None for r in chosen.values())
    after = _logits(fast, PROMPTS, DECODE), _logits(fast, [PROMPTS[1]], [[d[0]] for d in DECODE])
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
