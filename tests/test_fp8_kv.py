"""FP8 KV cache (``--kv-cache-dtype fp8_e4m3``): the pool's storage and size, the torch
backend's store and read, per-layer scales from every checkpoint spelling (replicated under
TP), the flag's way from the command line to the shard and its reports, and a server that
generates with it. The kernels' FP8 paths are tested in tests/kernels (store_kv, decode,
cascade, prefill, and the Triton backend against the torch one)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from lightllm_grpc.cli import build_parser, server_config, shard_config
from lightllm_grpc.config import KV_CACHE_DTYPES, ShardConfig
from lightllm_grpc.layers.attention.base import FP8, KVCache, quantize_kv
from lightllm_grpc.layers.attention.torch_backend import TorchAttentionBackend
from lightllm_grpc.layers.forward_batch import ForwardMode
from lightllm_grpc.layers.fp8 import FP8_MAX
from lightllm_grpc.models.config import ModelConfig
from lightllm_grpc.models.llama import LlamaForCausalLM
from lightllm_grpc.models.loader import load_model
from lightllm_grpc.models.quantization import parse_kv_cache_scheme, parse_quantization
from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.scheduler.remote_shards import ShardMismatch, check_agreement, describe
from tests.model_factory import (
    build_batch,
    greedy_logits,
    logits_at_every_position,
    make_tiny_model,
    tp_worker,
)
from tests.test_fp8 import write_fp8_checkpoint

VOCAB = 512
NUM_LAYERS = 2  # of the tiny models
K_SCALES, V_SCALES = (0.011, 0.023), (0.031, 0.047)
CT_KV_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def _load(model_dir: Path, kv_cache_dtype: str = "auto", **kw: Any) -> LlamaForCausalLM:
    return load_model(
        model_dir,
        device="cpu",
        dtype="float32",
        attn_backend=TorchAttentionBackend(),
        kv_cache_dtype=kv_cache_dtype,
        **kw,
    )


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _compare(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || other)) over all positions."""
    logp, logq = reference.log_softmax(-1), other.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    return (reference.argmax(-1) == other.argmax(-1)).float().mean().item(), kl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # transformers' own (small) init: the enlarged test weights make a 2-layer model chaotic.
    return make_tiny_model("llama3", tmp_path_factory.mktemp("fp8kv") / "llama3", standard_init=True)


# --- the pool --------------------------------------------------------------------------------


def test_fp8_pool_stores_one_byte_an_element_and_holds_twice_the_tokens(tiny: Path, monkeypatch) -> None:
    """The same memory budget: an FP8 pool holds twice the tokens of a bf16 one (four times
    fp32's), through the sizing a shard does (``build_shard`` -> ``memory.kv_capacity``)."""
    from lightllm_grpc.shard import memory
    from lightllm_grpc.shard.worker import build_shard
    from tests.server_harness import make_served_model

    auto, fp8 = _load(tiny).kv_cache_spec, _load(tiny, "fp8_e4m3").kv_cache_spec
    assert not auto.fp8 and fp8.fp8 and fp8.k_scales == fp8.v_scales == (1.0,) * NUM_LAYERS
    assert auto.bytes_per_token(torch.bfloat16) == 2 * fp8.bytes_per_token(torch.bfloat16)
    assert auto.bytes_per_token(torch.float32) == 4 * fp8.bytes_per_token(torch.float32)
    pool = fp8.make_cache(10, torch.bfloat16, "cpu")
    assert pool.fp8 and all(t.dtype == FP8 and t.element_size() == 1 for t in pool.k + pool.v)

    model_dir = make_served_model("llama3", tiny.parent / "served", standard_init=True)
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 100 << 20)  # a 10 MiB budget
    capacity = {}
    for kv_dtype in KV_CACHE_DTYPES:
        cfg = ShardConfig(model=model_dir, device="cpu", dtype="bfloat16", kv_cache_dtype=kv_dtype)
        shard = build_shard(cfg, rank=0, world_size=1, init_method=None)
        capacity[kv_dtype] = shard.runner.kv_capacity
        assert shard.kv_cache_dtype == {"auto": "bfloat16", "fp8_e4m3": "fp8_e4m3"}[kv_dtype]
        assert shard.runner.kv.k[0].dtype == {"auto": torch.bfloat16, "fp8_e4m3": FP8}[kv_dtype]
    assert capacity["auto"] == (10 << 20) // auto.bytes_per_token(torch.bfloat16)
    assert capacity["fp8_e4m3"] == 2 * capacity["auto"]


def test_kv_cache_scales_default_to_one_and_are_checked() -> None:
    cache = KVCache(3, 4, 1, 8, FP8, "cpu", k_scales=[0.5, 1.0, 2.0])
    assert cache.fp8 and cache.k_scale.dtype == torch.float32
    assert torch.equal(cache.k_scale, torch.tensor([0.5, 1.0, 2.0])) and torch.equal(
        cache.v_scale, torch.ones(3)
    )
    k_scale, v_scale = cache.scales(2)
    assert k_scale.item() == 2.0 and v_scale.item() == 1.0
    cache.k_scale[2] = 4.0  # the per-layer views read the pool's scale tensor (what graphs capture)
    assert cache.scales(2)[0].item() == 4.0
    assert KVCache(1, 4, 1, 8, torch.bfloat16, "cpu").scales(0) == (None, None)  # unused outside FP8
    with pytest.raises(ValueError, match="finite positive"):
        KVCache(2, 4, 1, 8, FP8, "cpu", v_scales=[1.0, 0.0])


def test_every_layers_kv_scales_start_16_byte_aligned() -> None:
    """Triton compiles a kernel per pointer alignment: scales packed 4 bytes apart would give
    every attention kernel a second variant for three layers in four."""
    for scales in (None, [0.5, 1.0, 2.0, 3.0, 4.0]):
        cache = KVCache(5, 4, 1, 8, FP8, "cpu", k_scales=scales, v_scales=scales)
        pointers = [t.data_ptr() for layer in range(5) for t in cache.scales(layer)]
        assert all(p % 16 == 0 for p in pointers), [p % 16 for p in pointers]
    assert cache.k_scale.tolist() == [0.5, 1.0, 2.0, 3.0, 4.0]


def test_quantize_kv_divides_clamps_and_rounds() -> None:
    x = torch.tensor([0.0, 1e-6, 0.1, -0.33, 5.0, 1000.0, -1e9])
    q = quantize_kv(x, torch.tensor(0.5))
    assert q.dtype == FP8
    expected = (x / 0.5).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # no NaN past ±448: clamped first
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))
    assert q.float()[-2:].tolist() == [448.0, -448.0]


def test_torch_backend_reads_the_fp8_pool_as_stored_times_the_scale() -> None:
    """Prefill, then decode, on an FP8 pool give exactly what the same backend gives on an fp32
    pool holding the dequantized values (with the new K/V rounded the same way): the backend
    stores ``quantize_kv`` and reads stored x scale, nothing else."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, slots = 4, 2, 16, 24
    scales = {"k_scales": [1.0, 0.02], "v_scales": [1.0, 0.07]}
    fp8, fp32 = (
        KVCache(2, slots, kv_heads, dim, FP8, "cpu", **scales),
        KVCache(2, slots, kv_heads, dim, torch.float32, "cpu"),
    )
    backend = TorchAttentionBackend()
    table = torch.randperm(slots, generator=gen)[:20].int().view(2, 10)
    for mode, new, prefix in (
        (ForwardMode.PREFILL, [[1] * 7, [2] * 4], [0, 0]),
        (ForwardMode.DECODE, [[3], [4]], [7, 4]),
    ):
        _, batch = build_batch(mode, new, prefix, [0, 1], table)
        n = sum(map(len, new))
        q = torch.randn(n, heads, dim, generator=gen)
        k, v = torch.randn(n, kv_heads, dim, generator=gen), torch.randn(n, kv_heads, dim, generator=gen) * 3
        k_scale, v_scale = fp8.scales(1)
        k_round = quantize_kv(k, k_scale).float() * k_scale
        v_round = quantize_kv(v, v_scale).float() * v_scale
        out = backend.forward(q, k, v, 1, batch, fp8, 0.25)
        expected = backend.forward(q, k_round, v_round, 1, batch, fp32, 0.25)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        stored = batch.out_slots
        assert torch.equal(fp8.k[1][stored].float() * k_scale, fp32.k[1][stored])
        assert torch.equal(fp8.v[1][stored].float() * v_scale, fp32.v[1][stored])


# --- scales from checkpoints --------------------------------------------------------------


def _add_tensors(model_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    saved = load_file(model_dir / "model.safetensors")
    save_file({**saved, **tensors}, model_dir / "model.safetensors")


def _update_json(path: Path, update: dict[str, Any]) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


def _per_layer(names: tuple[str, ...], values: tuple[tuple[float, ...], ...], shape: tuple[int, ...]) -> dict:
    return {
        f"model.layers.{i}.self_attn.{name}": torch.tensor(vals[i]).reshape(shape)
        for name, vals in zip(names, values)
        for i in range(NUM_LAYERS)
    }


def _checkpoint(spelling: str, tiny: Path, out: Path) -> tuple[Path, tuple[float, ...], tuple[float, ...]]:
    """``tiny`` rewritten with per-layer KV scales spelled as ``spelling``; returns it and the K and
    V scales it stores."""
    ks, vs = K_SCALES, V_SCALES
    if spelling == "compressed-tensors":  # FP8 weights, kv_cache_scheme, self_attn.k_scale/v_scale
        model_dir = write_fp8_checkpoint(tiny, out, fmt="compressed-tensors")
        _update_json(model_dir / "config.json", {"quantization_config": {"kv_cache_scheme": CT_KV_SCHEME}})
        tensors = _per_layer(("k_scale", "v_scale", "q_scale"), (ks, vs, ks), ())  # q_scale: unused
    elif spelling == "compressed-tensors-kv-only":  # unquantized weights, only the KV cache
        model_dir = Path(shutil.copytree(tiny, out))
        qc = {
            "quant_method": "compressed-tensors",
            "format": "dense",
            "config_groups": {},
            "kv_cache_scheme": CT_KV_SCHEME,
        }
        _update_json(model_dir / "config.json", {"quantization_config": qc})
        tensors = _per_layer(("k_scale", "v_scale"), (ks, vs), (1,))
    elif spelling == "modelopt":  # hf_quant_config.json kv_cache_quant_algo, scales on k/v_proj
        model_dir = write_fp8_checkpoint(tiny, out, fmt="modelopt", static=True, prompts=_prompts([9]))
        _update_json(model_dir / "hf_quant_config.json", {"quantization": {"kv_cache_quant_algo": "FP8"}})
        tensors = _per_layer(("k_proj.k_scale", "v_proj.v_scale"), (ks, vs), ())
    elif spelling == "output_scale":  # older compressed-tensors / AutoFP8: no declaration in config
        model_dir = Path(shutil.copytree(tiny, out))
        tensors = _per_layer(("k_proj.output_scale", "v_proj.output_scale"), (ks, vs), (1,))
    else:  # "kv_scale": one scale for K and V, in an fp8 (vLLM/AutoFP8) checkpoint
        model_dir = write_fp8_checkpoint(tiny, out, fmt="fp8")
        tensors = _per_layer(("kv_scale",), (ks,), ())
        vs = ks
    _add_tensors(model_dir, tensors)
    return model_dir, ks, vs


SPELLINGS = ["compressed-tensors", "compressed-tensors-kv-only", "modelopt", "output_scale", "kv_scale"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_scales_load_from_every_spelling(spelling: str, tiny: Path, tmp_path: Path) -> None:
    model_dir, ks, vs = _checkpoint(spelling, tiny, tmp_path / spelling)
    as_fp32 = lambda values: tuple(torch.tensor(values, dtype=torch.float32).tolist())  # noqa: E731

    spec = _load(model_dir, "fp8_e4m3").kv_cache_spec
    assert spec.fp8 and spec.k_scales == as_fp32(ks) and spec.v_scales == as_fp32(vs)
    pool = spec.make_cache(8, torch.float32, "cpu")
    assert pool.k_scale.tolist() == list(as_fp32(ks)) and pool.v_scale.tolist() == list(as_fp32(vs))

    # auto: the same checkpoint loads with its scales skipped and a model-dtype cache.
    model = _load(model_dir)
    assert not model.kv_cache_spec.fp8 and not any("k_scale" in n for n, _ in model.named_buffers())


def test_kv_cache_schemes_parse() -> None:
    ct = {"quant_method": "compressed-tensors", "config_groups": {}, "kv_cache_scheme": CT_KV_SCHEME}
    assert parse_kv_cache_scheme(ct) == "fp8" and parse_quantization(ct) is None  # KV only: no FP8 linears
    assert parse_kv_cache_scheme(
        {**ct, "kv_cache_scheme": {**CT_KV_SCHEME, "strategy": "attn_head"}}
    ).startswith("kv_cache_scheme.strategy")
    assert parse_kv_cache_scheme({**ct, "kv_cache_scheme": {"num_bits": 8, "type": "int"}}).startswith(
        "kv_cache_scheme.type"
    )
    nested = {"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}}
    assert parse_kv_cache_scheme(None, nested) == "fp8"
    assert (
        parse_kv_cache_scheme(None, {"quantization": {"quant_algo": None, "kv_cache_quant_algo": "FP8"}})
        == "fp8"
    )
    assert (
        parse_quantization(None, {"quantization": {"quant_algo": None, "kv_cache_quant_algo": "FP8"}}) is None
    )
    assert "NVFP4" in parse_kv_cache_scheme(
        {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "NVFP4"}
    )
    assert parse_kv_cache_scheme({"quant_method": "fp8"}) is None and parse_kv_cache_scheme(None) is None


def test_default_keeps_the_model_dtype_even_when_the_checkpoint_declares_fp8_kv(
    tiny: Path, tmp_path: Path
) -> None:
    """As vLLM: a declared FP8 KV cache is used only when asked for (--kv-cache-dtype fp8_e4m3)."""
    model_dir, _, _ = _checkpoint("compressed-tensors", tiny, tmp_path / "ct")
    model = _load(model_dir)
    assert model.config.kv_cache_scheme == "fp8" and model.config.kv_cache_dtype == "auto"
    assert model.kv_cache_spec.make_cache(4, torch.float32, "cpu").k[0].dtype == torch.float32


def test_unusable_scales_fail_loudly(tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    per_head = Path(shutil.copytree(tiny, tmp_path / "per-head"))
    _add_tensors(per_head, {"model.layers.0.self_attn.k_scale": torch.full((2,), 0.1)})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_scale has shape \[2\]"):
        _load(per_head, "fp8_e4m3")
    _load(per_head)  # unused without an FP8 cache
    negative = Path(shutil.copytree(tiny, tmp_path / "negative"))
    _add_tensors(negative, {"model.layers.1.self_attn.v_scale": torch.tensor(-1.0)})
    with pytest.raises(ValueError, match="finite and positive"):
        _load(negative, "fp8_e4m3")
    int8 = Path(shutil.copytree(tiny, tmp_path / "int8"))
    qc = {
        "quant_method": "compressed-tensors",
        "config_groups": {},
        "kv_cache_scheme": {"num_bits": 8, "type": "int"},
    }
    _update_json(int8 / "config.json", {"quantization_config": qc})
    with pytest.raises(ValueError, match=r"fp8_e4m3: .*kv_cache_scheme\.type = 'int'"):
        _load(int8, "fp8_e4m3")
    _load(int8)  # the default never reads them
    with caplog.at_level(logging.WARNING, logger="lightllm_grpc.models.loader"):
        _load(tiny, "fp8_e4m3")
    assert "no scale for 4 of 4 layer K/V caches; those use 1.0" in caplog.text


def test_checkpoint_scales_reach_the_attention(tiny: Path, tmp_path: Path) -> None:
    """Calibrated scales (amax / 448 per layer) keep the logits as close to the full-precision
    cache as scale 1.0 does; scales far too small (everything clips at ±448 x scale) ruin them:
    the loaded values are what the store divides by and the attention multiplies by."""
    prompts = _prompts([64, 40, 97, 55], seed=3)
    reference = logits_at_every_position(_load(tiny), prompts)
    amax = _kv_amax(tiny, prompts)

    def with_scales(name: str, k: tuple[float, ...], v: tuple[float, ...]) -> torch.Tensor:
        model_dir = Path(shutil.copytree(tiny, tmp_path / name))
        _add_tensors(model_dir, _per_layer(("k_scale", "v_scale"), (k, v), ()))
        return logits_at_every_position(_load(model_dir, "fp8_e4m3"), prompts)

    calibrated = with_scales("calibrated", *(tuple(a / FP8_MAX for a in amax[x]) for x in "kv"))
    clipped = with_scales("clipped", *(tuple(a / FP8_MAX / 100 for a in amax[x]) for x in "kv"))
    agree, kl = _compare(reference, calibrated)
    assert agree > 0.95 and kl < 1e-4, (agree, kl)
    unit_agree, unit_kl = _compare(reference, logits_at_every_position(_load(tiny, "fp8_e4m3"), prompts))
    assert kl < 3 * unit_kl and agree > unit_agree - 0.02, (kl, unit_kl)
    clipped_agree, clipped_kl = _compare(reference, clipped)
    assert clipped_kl > 100 * kl and clipped_agree < agree, (clipped_agree, clipped_kl)


def _kv_amax(model_dir: Path, prompts: list[list[int]]) -> dict[str, list[float]]:
    """Per layer, the largest |K| and |V| the full-precision model stores on ``prompts``."""
    model = _load(model_dir)
    amax: dict[str, list[float]] = {"k": [0.0] * NUM_LAYERS, "v": [0.0] * NUM_LAYERS}
    backend = model.model.layers[0].self_attn.backend

    def record(k, v, layer, out_slots, kv):
        amax["k"][layer] = max(amax["k"][layer], k.abs().max().item())
        amax["v"][layer] = max(amax["v"][layer], v.abs().max().item())
        backend.store(k, v, layer, out_slots, kv)

    recording = type("Recording", (), {"store": staticmethod(record), "attend": staticmethod(backend.attend)})
    for layer in model.model.layers:
        layer.self_attn.backend = recording()
    logits_at_every_position(model, prompts)
    return amax


def test_tensor_parallel_ranks_share_the_scales(tiny: Path, tmp_path: Path) -> None:
    """Two gloo ranks, each with half the KV heads, load the same per-layer scales: their greedy
    logits (prefill and decode on FP8 pools) equal a single rank's."""
    model_dir, _, _ = _checkpoint("compressed-tensors-kv-only", tiny, tmp_path / "m")
    prompts = _prompts([7, 2, 11], seed=4)
    expected = greedy_logits(model_dir, prompts, 3, "fp8_e4m3")
    assert not torch.allclose(expected, greedy_logits(model_dir, prompts, 3), atol=1e-6)  # FP8 matters
    out_file = str(tmp_path / "logits")
    args = (2, str(tmp_path / "init"), model_dir, prompts, 3, out_file, "fp8_e4m3")
    mp.spawn(tp_worker, args, nprocs=2)
    for rank in range(2):
        logits = torch.load(f"{out_file}.{rank}")
        rel = ((logits - expected).norm() / expected.norm()).item()
        assert rel < 1e-3, (rank, rel)  # a rank without the scales is ~1e-2 off


def test_fp8_check_measures_the_kv_cache_on_cpu(tiny: Path) -> None:
    """The GPU script's accuracy check (bench/fp8_check.py --checks kv), small, on the CPU in bf16:
    the same weights, the cache in bf16 vs e4m3."""
    from lightllm_grpc.bench.fp8_check import accuracy

    kw = dict(sequences=2, length=32, backend=TorchAttentionBackend(), device="cpu")
    result = accuracy(tiny, "auto", variant="fp8-kv", **kw)
    assert result["positions"] == 64
    assert 0.0 < result["mean_kl"] < 1e-3 and result["top1_agreement"] > 0.8, result


# --- the flag, the shard's reports and the server -----------------------------------------


def test_flag_reaches_the_shard_config(tiny: Path) -> None:
    serve = build_parser().parse_args(["serve", "--model", str(tiny), "--kv-cache-dtype", "fp8_e4m3"])
    assert server_config(serve).shard.kv_cache_dtype == "fp8_e4m3"
    assert (
        server_config(build_parser().parse_args(["serve", "--model", str(tiny)])).shard.kv_cache_dtype
        == "auto"
    )
    shard = ["shard", "--model", str(tiny), "--rank", "0", "--world-size", "1", "--listen", "127.0.0.1:1"]
    assert (
        shard_config(build_parser().parse_args([*shard, "--kv-cache-dtype", "fp8_e4m3"])).kv_cache_dtype
        == "fp8_e4m3"
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args([*shard, "--kv-cache-dtype", "fp8_e5m2"])
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        ShardConfig(model=tiny, kv_cache_dtype="int8")
    from lightllm_grpc.bench import gpu  # the GPU benchmark's variant serves with the flag

    assert gpu.VARIANT_FLAGS["fp8-kv"] == ("--kv-cache-dtype", "fp8_e4m3")
    assert gpu.BREAKDOWN_ARGS["fp8-kv"] == {"kv_cache_dtype": "fp8_e4m3"}
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        dataclasses.replace(ModelConfig.from_pretrained(tiny), kv_cache_dtype="fp8")


def test_gpus_without_e4m3_conversions_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightllm_grpc.shard.worker import check_kv_cache_dtype

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(RuntimeError, match=r"compute capability 8\.9 or newer; NVIDIA A100 is 8\.0"):
        check_kv_cache_dtype("fp8_e4m3", gpu)
    check_kv_cache_dtype("auto", gpu)
    check_kv_cache_dtype("fp8_e4m3", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_kv_cache_dtype("fp8_e4m3", gpu)


def _info(rank: int, **kw: Any) -> shard_pb2.InfoResponse:
    fields = dict(model_name="m", architecture="LlamaForCausalLM", dtype="bfloat16", vocab_size=512,
                  max_context=64, kv_cache_dtype="fp8_e4m3")  # fmt: skip
    return shard_pb2.InfoResponse(rank=rank, world_size=2, **{**fields, **kw})


def test_hand_started_shards_must_agree_on_the_kv_cache_dtype() -> None:
    check_agreement(["a:1", "b:2"], [_info(0), _info(1)], "LlamaForCausalLM", 512)
    with pytest.raises(ShardMismatch, match="disagree on kv_cache_dtype"):
        check_agreement(
            ["a:1", "b:2"], [_info(0), _info(1, kv_cache_dtype="bfloat16")], "LlamaForCausalLM", 512
        )
    assert "kv_cache_dtype=fp8_e4m3 kv_capacity_tokens=9" in describe(["a:1"], [_info(0, kv_capacity=9)])[0]


def test_server_generates_with_an_fp8_kv_cache(tmp_path: Path) -> None:
    """``serve --kv-cache-dtype fp8_e4m3`` end to end on the CPU (see ``check_fp8_kv_server``)."""
    check_fp8_kv_server(tmp_path)


def check_fp8_kv_server(tmp_path: Path, *server_args: str) -> None:
    """Eight prompts at once (shared prefill and decode batches) through a server with an FP8
    KV cache. Every generated token is what our model with an FP8 cache predicts there on the
    CPU (teacher-forced along the server's own output; a near-tie may go either way), and those
    predictions agree with the full-precision cache's at most positions. The checkpoint carries
    calibrated scales (about amax / 448 of this model's K and V), which the shard loads."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.server_harness import ServerProcess, greedy_request, make_served_model

    model_dir = make_served_model("llama3", tmp_path / "m", standard_init=True)
    _add_tensors(model_dir, _per_layer(("k_scale", "v_scale"), ((0.0013, 0.0015), (0.0015, 0.0013)), ()))
    prompts, new_tokens = _prompts([1, 3, 7, 12, 20, 33, 50, 64], seed=7), 24
    log = tmp_path / "server.log"
    args = ("--kv-cache-dtype", "fp8_e4m3", "--max-total-tokens", "1024", *server_args)
    server = ServerProcess(model_dir, log, *args)
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            replies = list(pool.map(lambda p: server.stub.Generate(greedy_request(p, new_tokens)), prompts))
        info, model_info = server.wait_idle(), server.stub.GetModelInfo(pb.GetModelInfoRequest())
    finally:
        server.stop()
    assert info.kv_cache_dtype == model_info.kv_cache_dtype == "fp8_e4m3" and info.kv_total_tokens == 1024
    text = log.read_text()
    assert "kv_cache_dtype=fp8_e4m3" in text and "1024 tokens" in text and "fp8_e4m3)" in text
    assert "FP8 KV cache: 4 per-layer scales from the checkpoint (0.0013 .. 0.0015)" in text

    sequences = [p + list(r.token_ids) for p, r in zip(prompts, replies)]
    assert all(len(r.token_ids) == new_tokens for r in replies)
    fp8 = logits_at_every_position(_load(model_dir, "fp8_e4m3"), sequences)
    full = logits_at_every_position(_load(model_dir), sequences)
    picked, start = [], 0
    for p, seq in zip(prompts, sequences):
        rows = torch.arange(start + len(p) - 1, start + len(seq) - 1)  # the logits that chose each new token
        chosen = torch.tensor(seq[len(p) :])
        gap = fp8[rows].max(-1).values - fp8[rows].gather(1, chosen[:, None])[:, 0]
        assert (gap < 1e-3).all(), f"server tokens are not the FP8 model's argmax: gaps {gap.tolist()}"
        picked.append(rows)
        start += len(seq)
    rows = torch.cat(picked)
    agree, kl = _compare(full[rows], fp8[rows])
    assert agree > 0.9 and kl < 1e-4, (agree, kl)
