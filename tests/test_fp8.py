"""FP8 linear layers: quantization at load, compressed-tensors / ModelOpt / fp8 checkpoints, TP
sharding of weights and scales, and the numerics of the reference path against the unquantized model."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from lightllm_grpc.config import ShardConfig
from lightllm_grpc.layers.attention.torch_backend import TorchAttentionBackend
from lightllm_grpc.layers.fp8 import (
    FP8,
    FP8_MAX,
    Fp8LinearMethod,
    Fp8Matmul,
    fp8_linear_ref,
    is_fp8,
    quantize_activation,
    quantize_weight,
)
from lightllm_grpc.layers.linear import (
    UNQUANTIZED,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from lightllm_grpc.layers.ops import Ops
from lightllm_grpc.layers.quant_config import QuantConfig
from lightllm_grpc.models.config import ModelConfig
from lightllm_grpc.models.llama import LlamaForCausalLM
from lightllm_grpc.models.loader import load_model
from lightllm_grpc.models.quantization import parse_quantization
from lightllm_grpc.parallel import ParallelState, set_parallel_state
from tests.model_factory import (
    greedy_logits,
    logits_at_every_position,
    make_tiny_model,
    tp_worker,
)

VOCAB = 512
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The model's linear layers and the checkpoint modules each is loaded from.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def _load(model_dir: Path, **kwargs: Any) -> LlamaForCausalLM:
    return load_model(
        model_dir, device="cpu", dtype="float32", attn_backend=TorchAttentionBackend(), **kwargs
    )


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEAR_NAMES


def _quantize_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.float().abs().max() / FP8_MAX
    return (w.float() / scale).to(FP8), scale


def _input_amax(model_dir: Path, prompts: list[list[int]]) -> dict[str, float]:
    """Calibration: the largest |input| each checkpoint linear module sees on ``prompts``."""
    model = _load(model_dir)
    amax: dict[str, float] = {}

    def hook(name: str):
        def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            for part in FUSED[name.split(".", 3)[-1]]:
                key = f"{name.rsplit('.', 2)[0]}.{part}"
                amax[key] = max(amax.get(key, 0.0), args[0].abs().max().item())

        return record

    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and not name.startswith("lm_head"):
            module.register_forward_hook(hook(name))
    logits_at_every_position(model, prompts)
    return amax


def write_fp8_checkpoint(
    src: Path,
    dst: Path,
    *,
    fmt: str,
    strategy: str = "tensor",
    static: bool = False,
    prompts: list[list[int]] | None = None,
    ignore: tuple[str, ...] = (),
    scalar_shape: tuple[int, ...] = (),
) -> Path:
    """Rewrite the fp32 checkpoint ``src`` as an FP8 one in format ``fmt``
    ("compressed-tensors", "modelopt" or "fp8"): e4m3 ``weight`` plus ``weight_scale`` (per
    tensor, or per channel ``[N, 1]``), and per-tensor ``input_scale`` when ``static``."""
    shutil.copytree(src, dst)
    amax = _input_amax(src, prompts or []) if static else {}
    tensors = load_file(src / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if not _is_linear(name) or any(module.endswith(i.removeprefix("re:.*")) for i in ignore):
            out[name] = t.to(torch.bfloat16)
            continue
        if strategy == "channel":
            q, scale = quantize_weight(t)
            scale = scale.view(-1, 1)
        else:
            q, scale = _quantize_tensor(t)
            scale = scale.reshape(scalar_shape)
        out[name] = q
        out[f"{module}.weight_scale_inv" if fmt == "fp8" else f"{module}.weight_scale"] = scale
        if static:
            out[f"{module}.input_scale"] = torch.tensor(amax[module] / FP8_MAX).reshape(scalar_shape)
    save_file(out, dst / "model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    config["dtype"] = "bfloat16"
    if fmt == "compressed-tensors":
        activations = (
            {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
            if static
            else {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
        )
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8,
                        "type": "float",
                        "strategy": strategy,
                        "dynamic": False,
                        "symmetric": True,
                    },
                    "input_activations": activations,
                    "output_activations": None,
                }
            },
            "ignore": ["lm_head", *ignore],
            "kv_cache_scheme": None,
        }
    elif fmt == "modelopt":  # the nested hf_quant_config.json, config.json untouched
        assert static, "ModelOpt FP8 stores static input scales"
        quant = {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head", *ignore]}
        (dst / "hf_quant_config.json").write_text(
            json.dumps({"producer": {"name": "modelopt", "version": "0.17.0"}, "quantization": quant})
        )
    else:
        config["quantization_config"] = {
            "quant_method": "fp8",
            "activation_scheme": "static" if static else "dynamic",
            "ignored_layers": list(ignore),
        }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _compare(reference: torch.Tensor, quantized: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error of the logits, top-1 agreement) over all positions."""
    rel = ((quantized - reference).norm() / reference.norm()).item()
    agree = (quantized.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return rel, agree


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # transformers' own init: the enlarged test weights make this 2-layer model chaotic, so
    # that even bf16 rounding moves its logits by 2% (FP8 then by 20%).
    return make_tiny_model("llama3", tmp_path_factory.mktemp("fp8") / "llama3", standard_init=True)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return _prompts([48, 17, 33, 30], seed=5)


@pytest.fixture(scope="module")
def reference_logits(tiny: Path, prompts: list[list[int]]) -> torch.Tensor:
    return logits_at_every_position(_load(tiny), prompts)


# --- the numerics -------------------------------------------------------------------------


def test_weight_quantization_error_is_bounded() -> None:
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64).view(-1, 1)  # rows of very different size
    q, scale = quantize_weight(w)
    assert q.dtype == FP8 and scale.shape == (64,)
    assert torch.equal(scale, w.abs().amax(1) / FP8_MAX)
    error = (q.float() * scale.view(-1, 1) - w).abs()
    # e4m3 keeps 3 mantissa bits: half a step is 1/16 relative, or half the smallest subnormal.
    assert (error <= w.abs() / 16 + scale.view(-1, 1) * 2.0**-10).all()


def test_activation_quantization_per_token_and_static() -> None:
    x = torch.randn(5, 32) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 5.0]).view(-1, 1)
    q, scale = quantize_activation(x)
    assert scale.shape == (5, 1) and torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(q.float().abs().amax(1)[[0, 1, 2, 4]], torch.full((4,), FP8_MAX))
    assert torch.equal(q[3].float(), torch.zeros(32))  # an all-zero row stays zero
    q, scale = quantize_activation(x, torch.tensor([0.01]))  # static: clips at 448 * 0.01
    assert torch.equal(scale, torch.full((5, 1), 0.01)) and q.float().abs().max() == FP8_MAX


def test_reference_matmul_is_the_fp8_product() -> None:
    x, w, bias = torch.randn(3, 7, 64), torch.randn(48, 64), torch.randn(48)
    wq, w_scale = quantize_weight(w)
    y = fp8_linear_ref(x, wq, w_scale, None, bias)
    xq, x_scale = quantize_activation(x.reshape(-1, 64))
    expected = (xq.float() * x_scale) @ (wq.float() * w_scale.view(-1, 1)).t() + bias
    assert y.shape == (3, 7, 48)
    torch.testing.assert_close(y.reshape(-1, 48), expected, rtol=1e-5, atol=1e-5)
    # and it is close to the exact product: a few percent of error, not more
    assert ((y - torch.nn.functional.linear(x, w, bias)).norm() / y.norm()).item() < 0.05


# --- the linear method and its selection --------------------------------------------------


def _fp8(quant: QuantConfig) -> Fp8LinearMethod:
    return Fp8LinearMethod(serialized=quant.serialized, static_activations=quant.static_activations)


def test_ops_pick_fp8_per_layer_and_honour_ignore() -> None:
    """``Ops.linear`` by layer name; a fused layer is judged by its checkpoint modules."""
    quant = QuantConfig(source="compressed-tensors", ignore=("re:.*down_proj", "model.layers.1.self_attn"))
    packed = LlamaForCausalLM.packed_modules_mapping
    native = Ops.native()
    assert native.with_quantization(None, packed) is native
    linear = native.with_quantization(quant, packed).linear
    assert linear("model.layers.0.mlp.down_proj") is UNQUANTIZED
    assert linear("model.layers.1.self_attn.o_proj") is UNQUANTIZED
    assert linear("model.layers.1.self_attn.qkv_proj") is UNQUANTIZED  # q/k/v_proj all ignored
    method = linear("model.layers.0.self_attn.o_proj")
    assert method == Fp8LinearMethod(serialized=True) and linear("model.layers.0.mlp.gate_up_proj") is method
    o = RowParallelLinear(32, 16, method=method)
    assert is_fp8(o) and o.weight.dtype == FP8 and isinstance(o.matmul, Fp8Matmul)
    assert isinstance(o.weight_scale, torch.nn.Parameter) and o.input_scale is None  # stored, dynamic
    assert not is_fp8(RowParallelLinear(32, 16, method=UNQUANTIZED))
    # Unquantized layers keep the method the ops had before.
    custom = Fp8LinearMethod(serialized=True, static_activations=True)
    fallback = dataclasses.replace(native, linear=lambda prefix: custom).with_quantization(quant, packed)
    assert fallback.linear("model.layers.0.mlp.down_proj") is custom
    partly = native.with_quantization(
        QuantConfig(source="modelopt", static_activations=True, ignore=("*.up_proj",)), packed
    )
    with pytest.raises(ValueError, match=r"some but not all of .*gate_proj, .*up_proj"):
        partly.linear("model.layers.0.mlp.gate_up_proj")


def _put(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
    """Load a checkpoint tensor as the loader does: through the parameter's ``weight_loader``."""
    param.weight_loader(param, loaded, shard_id)


def test_fp8_weight_loaders_cut_rank_slices_and_scales() -> None:
    """Rank 1 of 2: FP8 rows/columns and per-channel or per-tensor scales land where bf16 ones would."""
    quant = QuantConfig(source="compressed-tensors", static_activations=True)
    gen = torch.Generator().manual_seed(0)
    try:
        set_parallel_state(ParallelState(rank=1, world_size=2))
        qkv = QKVParallelLinear(16, 4, 4, 2, False, method=_fp8(quant))
        parts = {
            s: quantize_weight(torch.randn(n, 16, generator=gen)) for s, n in [("q", 16), ("k", 8), ("v", 8)]
        }
        for shard, (q, scale) in parts.items():
            _put(qkv.weight, q, shard)
            _put(qkv.weight_scale, scale.view(-1, 1), shard)  # per channel [N, 1]
            _put(qkv.input_scale, torch.tensor({"q": 0.5, "k": 2.0, "v": 1.0}[shard]), shard)
        expected = torch.cat([parts["q"][0][8:], parts["k"][0][4:], parts["v"][0][4:]])
        assert torch.equal(qkv.weight.view(torch.uint8), expected.view(torch.uint8))
        assert torch.equal(
            qkv.weight_scale, torch.cat([parts["q"][1][8:], parts["k"][1][4:], parts["v"][1][4:]])
        )
        assert qkv.input_scale.item() == 2.0  # the fused parts' maximum
        row = RowParallelLinear(16, 8, method=_fp8(quant))
        wq, _ = _quantize_tensor(torch.randn(8, 16, generator=gen))
        _put(row.weight, wq)
        _put(row.weight_scale, torch.tensor(0.25))  # per tensor, shape []
        assert torch.equal(row.weight.view(torch.uint8), wq[:, 8:].view(torch.uint8))
        assert torch.equal(row.weight_scale, torch.full((8,), 0.25))
        gate_up = MergedColumnParallelLinear(16, [8, 8], method=_fp8(QuantConfig()))
        dense = torch.randn(8, 16, generator=gen)
        _put(gate_up.weight, dense, 0)  # quantized at load
        _put(gate_up.weight, -dense, 1)
        q, scale = quantize_weight(dense)
        assert torch.equal(gate_up.weight[:4].view(torch.uint8), q[4:].view(torch.uint8))
        assert torch.equal(gate_up.weight_scale, torch.cat([scale[4:], scale[4:]]))
    finally:
        set_parallel_state(ParallelState())


def test_gemv_tuning_skips_fp8_layers(tiny: Path) -> None:
    """Warm-up's GEMV kernel binds into cuBLAS layers only: FP8 layers keep their FP8 matmul,
    an ignored (high-precision) layer of a quantized model is tuned like any other."""
    from lightllm_grpc_kernels.gemv import GEMV_CONFIGS

    from lightllm_grpc.layers import matmul_tuning, triton_ops
    from lightllm_grpc.models.loader import build_model

    quant = QuantConfig(source="compressed-tensors", ignore=("re:.*down_proj",))
    config = dataclasses.replace(ModelConfig.from_pretrained(tiny), quantization=quant)
    model = build_model(config, device="cpu", dtype=torch.float32, attn_backend=TorchAttentionBackend())
    gemv = GEMV_CONFIGS[0]
    shapes = {tuple(p.shape): gemv for p in model.parameters() if p.dim() == 2}
    before = {name: layer.matmul for name, layer in _fp8_layers(model).items()}
    assert len(before) == 3 * config.num_layers
    changed = matmul_tuning.use_gemv(model, shapes)
    assert changed == config.num_layers + 1  # every down_proj and the LM head
    assert all(layer.mlp.down_proj.matmul is triton_ops.gemv_matmul(gemv) for layer in model.model.layers)
    assert all(layer.matmul is before[name] for name, layer in _fp8_layers(model).items())


# --- checkpoints --------------------------------------------------------------------------


def _fp8_layers(model: LlamaForCausalLM) -> dict[str, LinearBase]:
    return {n: m for n, m in model.named_modules() if is_fp8(m)}


def _dequantized(layer: torch.nn.Module) -> torch.Tensor:
    assert isinstance(layer, LinearBase)
    return Fp8LinearMethod.dequantized_weight(layer)


def _check_high_precision_rest(model: LlamaForCausalLM) -> None:
    """Embeddings, LM head and norms keep the model dtype."""
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32
    assert len(_fp8_layers(model)) == 4 * model.config.num_layers


def test_bf16_checkpoint_quantized_at_load(
    tiny: Path, tmp_path: Path, prompts: list[list[int]], reference_logits: torch.Tensor
) -> None:
    bf16 = tmp_path / "bf16"
    shutil.copytree(tiny, bf16)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(bf16 / "model.safetensors").items()}
    save_file(tensors, bf16 / "model.safetensors")
    model = _load(bf16, quantization="fp8")
    _check_high_precision_rest(model)
    assert model.config.quantization == QuantConfig()
    assert not any("weight_scale" in n for n, _ in model.named_parameters())  # buffers, not loaded
    down = model.model.layers[1].mlp.down_proj
    saved = tensors["model.layers.1.mlp.down_proj.weight"].float()
    assert torch.equal(
        _dequantized(down), quantize_weight(saved)[0].float() * quantize_weight(saved)[1].view(-1, 1)
    )
    reference = logits_at_every_position(_load(bf16), prompts)
    rel, agree = _compare(reference, logits_at_every_position(model, prompts))
    assert rel < 0.06 and agree > 0.9, (rel, agree)
    assert _load(bf16).model.layers[0].mlp.down_proj.weight.dtype == torch.float32  # no flag: unquantized


@pytest.mark.parametrize(
    ("fmt", "strategy", "static", "scalar_shape"),
    [
        ("compressed-tensors", "tensor", False, ()),
        ("compressed-tensors", "channel", False, ()),
        ("compressed-tensors", "tensor", True, (1,)),
        ("modelopt", "tensor", True, ()),
        ("fp8", "tensor", False, (1,)),
    ],
)
def test_fp8_checkpoints_load_and_match(
    fmt: str,
    strategy: str,
    static: bool,
    scalar_shape: tuple[int, ...],
    tiny: Path,
    tmp_path: Path,
    prompts: list[list[int]],
    reference_logits: torch.Tensor,
) -> None:
    model_dir = write_fp8_checkpoint(
        tiny,
        tmp_path / fmt,
        fmt=fmt,
        strategy=strategy,
        static=static,
        prompts=prompts,
        scalar_shape=scalar_shape,
    )
    model = _load(model_dir)  # recognized from the checkpoint: no flag needed
    assert model.config.quantization is not None and model.config.quantization.source == fmt
    assert _load(model_dir, quantization="fp8").config.quantization == model.config.quantization
    _check_high_precision_rest(model)
    saved = load_file(model_dir / "model.safetensors")
    scale_name = "weight_scale_inv" if fmt == "fp8" else "weight_scale"
    for name, layer in _fp8_layers(model).items():
        prefix = name.split(".self_attn.")[0].split(".mlp.")[0]
        parts = FUSED[name.removeprefix(prefix + ".")]
        expected = torch.cat(
            [
                saved[f"{prefix}.{p}.weight"].float() * saved[f"{prefix}.{p}.{scale_name}"].reshape(-1, 1)
                for p in parts
            ]
        )
        assert torch.equal(_dequantized(layer), expected), name
        assert layer.weight.dtype == FP8 and layer.weight_scale.dtype == torch.float32
        if static:
            amax = max(saved[f"{prefix}.{p}.input_scale"].item() for p in parts)
            assert layer.input_scale.item() == amax
        else:
            assert layer.input_scale is None
    rel, agree = _compare(reference_logits, logits_at_every_position(model, prompts))
    assert rel < 0.08 and agree > 0.9, (rel, agree)


def test_greedy_decoding_mostly_agrees(tiny: Path, tmp_path: Path) -> None:
    """Greedy decoding from the same prompts. A random-init model's logits are nearly tied (the
    median top-2 gap here is ~0.04), so one flipped near-tie ends the common prefix; the
    teacher-forced comparisons above are the precise check."""
    model_dir = write_fp8_checkpoint(tiny, tmp_path / "ct", fmt="compressed-tensors", strategy="channel")
    prompts, steps = _prompts([9, 4, 13, 6], seed=11), 12
    reference, quantized = greedy_logits(tiny, prompts, steps), greedy_logits(model_dir, prompts, steps)
    tokens_ref, tokens_fp8 = reference.argmax(-1).T, quantized.argmax(-1).T  # [B, steps + 1]
    assert (tokens_ref[:, 0] == tokens_fp8[:, 0]).sum() >= 3  # the prompts' first tokens
    # Each sequence's tokens up to its first divergence (after it the inputs differ).
    common = (tokens_ref == tokens_fp8).int().cumprod(1).sum().item()
    assert common >= 0.4 * tokens_ref.numel(), (tokens_ref, tokens_fp8)


def test_ignored_modules_stay_high_precision(tiny: Path, tmp_path: Path, prompts: list[list[int]]) -> None:
    model_dir = write_fp8_checkpoint(
        tiny, tmp_path / "ct", fmt="compressed-tensors", ignore=("re:.*down_proj",)
    )
    model = _load(model_dir)
    assert all(layer.mlp.down_proj.method is UNQUANTIZED for layer in model.model.layers)
    assert is_fp8(model.model.layers[0].mlp.gate_up_proj)
    saved = load_file(model_dir / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, saved.float())


def test_dummy_weights_with_fp8(tiny: Path, tmp_path: Path) -> None:
    shutil.copy(tiny / "config.json", tmp_path / "config.json")
    model = _load(tmp_path, load_format="dummy", quantization="fp8")
    _check_high_precision_rest(model)
    layer = model.model.layers[0].self_attn.qkv_proj
    assert (layer.weight_scale > 0).all() and layer.weight.float().abs().max() == FP8_MAX
    assert torch.isfinite(logits_at_every_position(model, _prompts([5, 3]))).all()
    # The same seed without quantization: the FP8 dummy model is exactly its quantized version.
    dense = _load(tmp_path, load_format="dummy")
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
    for name, layer in _fp8_layers(model).items():
        q, scale = quantize_weight(dense.get_submodule(name).weight)
        assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(layer.weight_scale, scale), name


def test_kv_cache_scales_are_skipped(tiny: Path, tmp_path: Path) -> None:
    model_dir = write_fp8_checkpoint(tiny, tmp_path / "ct", fmt="compressed-tensors")
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(1.0)
    tensors["model.layers.0.self_attn.v_scale"] = torch.tensor(1.0)
    save_file(tensors, model_dir / "model.safetensors")
    _load(model_dir)


def test_missing_scale_is_named(tiny: Path, tmp_path: Path) -> None:
    model_dir = write_fp8_checkpoint(tiny, tmp_path / "ct", fmt="compressed-tensors")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight_scale"]
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.weight_scale"
    ):
        _load(model_dir)


def test_fp8_weights_without_a_quantization_config_fail(tiny: Path, tmp_path: Path) -> None:
    model_dir = write_fp8_checkpoint(tiny, tmp_path / "ct", fmt="compressed-tensors")
    config = json.loads((model_dir / "config.json").read_text())
    del config["quantization_config"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no quantization_config"):
        _load(model_dir, quantization="fp8")


# --- bad configs --------------------------------------------------------------------------


def _ct(weights: dict[str, Any] | None = None, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "quant_method": "compressed-tensors",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", **(weights or {})},
                "input_activations": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": "token",
                    "dynamic": True,
                    **(inputs or {}),
                },
            }
        },
    }


@pytest.mark.parametrize(
    ("config", "key"),
    [
        (_ct({"num_bits": 4, "type": "int"}), "config_groups.group_0.weights.num_bits"),
        (_ct({"strategy": "block", "block_structure": [128, 128]}), "config_groups.group_0.weights.strategy"),
        (_ct({"strategy": "group", "group_size": 128}), "config_groups.group_0.weights.strategy"),
        (_ct({"type": "int"}), "config_groups.group_0.weights.type"),
        (
            _ct(inputs={"dynamic": False, "strategy": "token"}),
            "config_groups.group_0.input_activations.strategy",
        ),
        ({**_ct(), "format": "pack-quantized"}, "format"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "weight_block_size"),
        ({"quant_method": "fp8", "activation_scheme": "tensor"}, "activation_scheme"),
        ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "quant_algo"),
        ({"quant_method": "awq", "bits": 4}, "quant_method"),
    ],
)
def test_unsupported_configs_name_the_key(
    config: dict[str, Any], key: str, tiny: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=f"quantization_config\\.{key.replace('.', '[.]')}"):
        parse_quantization(config)
    hf = {**json.loads((tiny / "config.json").read_text()), "quantization_config": config}
    model_dir = tmp_path / "bad"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=key.split(".")[-1]):
        _load(model_dir, load_format="dummy")


def test_quant_configs_parse() -> None:
    assert parse_quantization(None) is None
    ct = parse_quantization({**_ct(), "ignore": ["lm_head", "re:.*down_proj"]})
    assert ct == QuantConfig(source="compressed-tensors", ignore=("lm_head", "re:.*down_proj"))
    nested = {
        "producer": {"name": "modelopt"},
        "quantization": {"quant_algo": "FP8", "exclude_modules": ["lm_head"]},
    }
    assert parse_quantization(None, nested) == QuantConfig(
        source="modelopt", static_activations=True, ignore=("lm_head",)
    )
    flat = parse_quantization({"quant_method": "modelopt", "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"})
    assert flat == QuantConfig(source="modelopt", static_activations=False)
    fp8 = parse_quantization(
        {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
    )
    assert fp8 == QuantConfig(source="fp8", static_activations=True, ignore=("lm_head",))
    with pytest.raises(ValueError, match="quantization must be one of"):
        ShardConfig(model=Path("m"), quantization="int4")
    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "vocab_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 4, "quantization_config": _ct()}  # fmt: skip
    assert ModelConfig.from_dict(hf, name="m").quantization == QuantConfig(source="compressed-tensors")


# --- tensor parallelism -------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_tensor_parallel_fp8_matches_single_rank(strategy: str, tmp_path: Path) -> None:
    """Two gloo ranks on an FP8 checkpoint: per-tensor (static inputs) or per-channel scales are
    sharded with their weights. With dynamic scales each rank quantizes its own slice of a
    row-parallel layer's input, so prefill logits are close to TP=1's rather than bit-equal."""
    src = make_tiny_model("llama3", tmp_path / "src", vocab_size=VOCAB, standard_init=True)
    prompts = _prompts([7, 2, 11], seed=4)
    static = strategy == "tensor"
    model_dir = write_fp8_checkpoint(
        src, tmp_path / "m", fmt="compressed-tensors", strategy=strategy, static=static, prompts=prompts
    )
    expected = greedy_logits(model_dir, prompts, 0)[0]
    out_file = str(tmp_path / "logits")
    mp.spawn(tp_worker, (2, str(tmp_path / "init"), model_dir, prompts, 0, out_file), nprocs=2)
    for rank in range(2):
        logits = torch.load(f"{out_file}.{rank}")[0]
        rel = ((logits - expected).norm() / expected.norm()).item()
        assert rel < (1e-5 if static else 0.05), (rank, rel)


def test_fp8_check_accuracy_runs_on_cpu(tiny: Path) -> None:
    """The GPU script's accuracy measurement (bench/fp8_check.py), small, on the CPU in bf16."""
    from lightllm_grpc.bench.fp8_check import accuracy

    result = accuracy(tiny, "auto", sequences=2, length=32, backend=TorchAttentionBackend(), device="cpu")
    assert result["positions"] == 64
    assert 0.0 <= result["mean_kl"] < 0.05 and result["top1_agreement"] > 0.6, result


def test_server_serves_fp8(tmp_path: Path) -> None:
    """``serve --quantization fp8`` end to end on the CPU; the shard logs that its layers are FP8."""
    from tests.server_harness import ServerProcess, greedy_request, make_served_model

    model_dir = make_served_model("llama3", tmp_path / "m", standard_init=True)
    log = tmp_path / "server.log"
    server = ServerProcess(model_dir, log, "--quantization", "fp8", "--max-total-tokens", "200")
    try:
        reply = server.stub.Generate(greedy_request([5, 6, 7, 8], 6), timeout=60)
        assert len(reply.token_ids) == 6
    finally:
        server.stop()
    assert "FP8 linear layers" in log.read_text()
