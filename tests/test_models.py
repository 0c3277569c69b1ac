"""The Llama-family decoder, its loader and the torch attention backend, checked against transformers."""

from __future__ import annotations

import dataclasses
import json
import shutil
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, eager_attention_forward

from lightllm_grpc.layers.attention.base import KVCache
from lightllm_grpc.layers.attention.torch_backend import TorchAttentionBackend
from lightllm_grpc.layers.embedding import VocabParallelEmbedding
from lightllm_grpc.layers.forward_batch import ForwardMode
from lightllm_grpc.layers.linear import (
    UNQUANTIZED,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from lightllm_grpc.layers.rotary import compute_inv_freq
from lightllm_grpc.models.config import ModelConfig
from lightllm_grpc.models.llama import LlamaForCausalLM
from lightllm_grpc.models.loader import load_model, resolve_dtype
from lightllm_grpc.models.registry import get_model_spec
from lightllm_grpc.parallel import ParallelState, set_parallel_state
from tests.model_factory import (
    TINY_ARCHS,
    build_batch,
    greedy_logits,
    make_tiny_model,
    rewrite_config_legacy,
    tp_worker,
)

VOCAB = 512
DECODE_STEPS = 24
LOGIT_ATOL = 1e-4
NEAR_TIE = 1e-4


class Sequences:
    """Runs several sequences through our model like a shard would: scattered slots, shuffled rows."""

    def __init__(self, model: LlamaForCausalLM, num_rows: int = 6, num_slots: int = 400) -> None:
        self.model = model
        self.kv = model.kv_cache_spec.make_cache(num_slots, torch.float32, "cpu")
        # Entries past each sequence's end hold out-of-range ids: the backend must never use them.
        self.req_to_token = torch.full((num_rows, 160), 10**6, dtype=torch.int32)
        self.free_slots = torch.randperm(num_slots, generator=torch.Generator().manual_seed(1)).tolist()
        self.lens: dict[int, int] = {}  # row -> tokens in the pool

    def _place(self, row: int, count: int) -> None:
        start = self.lens.get(row, 0)
        slots = [self.free_slots.pop() for _ in range(count)]
        self.req_to_token[row, start : start + count] = torch.tensor(slots, dtype=torch.int32)
        self.lens[row] = start + count

    def step(self, mode: ForwardMode, rows: list[int], new_tokens: list[list[int]]) -> torch.Tensor:
        prefix_lens = [self.lens.get(row, 0) for row in rows]
        for row, tokens in zip(rows, new_tokens, strict=True):
            self._place(row, len(tokens))
        input_ids, batch = build_batch(mode, new_tokens, prefix_lens, rows, self.req_to_token)
        with torch.no_grad():
            return self.model(input_ids, batch, self.kv)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch) for arch in TINY_ARCHS}


def _load(model_dir: Path, **kwargs: object) -> LlamaForCausalLM:
    return load_model(
        model_dir, device="cpu", dtype="float32", attn_backend=TorchAttentionBackend(), **kwargs
    )


def _hf(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def _greedy(model: LlamaForCausalLM, prompts: list[list[int]], rows: list[int]) -> list[torch.Tensor]:
    """Packed prefill of all prompts, then batched greedy decode; logits ``[steps+1, V]`` per sequence."""
    runner = Sequences(model)
    logits = runner.step(ForwardMode.PREFILL, rows, prompts)
    history = [logits]
    for _ in range(DECODE_STEPS):
        next_tokens = logits.argmax(-1).tolist()
        logits = runner.step(ForwardMode.DECODE, rows, [[t] for t in next_tokens])
        history.append(logits)
    stacked = torch.stack(history, dim=1)  # [B, steps+1, V]
    return list(stacked)


def _check_tokens_against_generate(hf: torch.nn.Module, prompt: list[int], logits: torch.Tensor) -> None:
    """Our greedy ids must equal HF generate's; a divergence is allowed only at a true near-tie."""
    ours = logits.argmax(-1).tolist()
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=len(ours),
            eos_token_id=None,
            pad_token_id=0,
        )
    theirs = out[0, len(prompt) :].tolist()
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b:
            top2 = logits[step].topk(2).values
            gap = float(top2[0] - top2[1])
            assert gap < NEAR_TIE, f"step {step}: ours {a}, HF {b}, top-2 gap {gap:.3g} is not a tie"
            warnings.warn(f"near-tie at step {step} (gap {gap:.2g}): ours {a}, HF {b}", stacklevel=1)
            return  # the continuations legitimately differ from here on
    assert len(set(ours)) > len(ours) // 2, f"greedy output is too repetitive to be a useful check: {ours}"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_prefill_and_decode_match_transformers(arch: str, tiny_dirs: dict[str, Path]) -> None:
    model, hf = _load(tiny_dirs[arch]), _hf(tiny_dirs[arch])
    prompts = _prompts([9, 3, 17, 1])
    all_logits = _greedy(model, prompts, rows=[4, 0, 2, 5])
    for prompt, logits in zip(prompts, all_logits, strict=True):
        generated = logits.argmax(-1).tolist()
        full = torch.tensor([prompt + generated[:-1]])
        with torch.no_grad():
            reference = hf(full).logits[0, len(prompt) - 1 :]
        diff = (logits - reference).abs().max().item()
        assert diff < LOGIT_ATOL, f"{arch}: max |logit diff| {diff:.3g}"
        _check_tokens_against_generate(hf, prompt, logits)


def test_chunked_prefill_matches_single_chunk(tiny_dirs: dict[str, Path]) -> None:
    model = _load(tiny_dirs["llama3"])
    long, other = _prompts([21, 6], seed=3)
    whole = Sequences(model)
    one_chunk = whole.step(ForwardMode.PREFILL, [1], [long])
    whole_next = whole.step(ForwardMode.DECODE, [1], [[7]])

    chunked = Sequences(model)
    chunked.step(ForwardMode.PREFILL, [3], [long[:8]])
    # The second chunk sees the first through req_to_token, packed beside a fresh sequence.
    mixed = chunked.step(ForwardMode.PREFILL, [3, 0], [long[8:], other])
    chunked_next = chunked.step(ForwardMode.DECODE, [3, 0], [[7], [7]])

    alone = Sequences(model).step(ForwardMode.PREFILL, [2], [other])
    torch.testing.assert_close(mixed[0], one_chunk[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked_next[0], whole_next[0], atol=1e-5, rtol=0)


def test_torch_backend_matches_hf_eager_attention() -> None:
    """Packed prefill with cached prefixes and padded decode, against transformers' eager attention."""
    generator = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, slots = 8, 2, 16, 64
    kv = KVCache(1, slots, kv_heads, dim, torch.float32, "cpu")
    kv.k[0].normal_(generator=generator)
    kv.v[0].normal_(generator=generator)
    req_to_token = torch.randperm(slots, generator=generator)[:60].view(3, 20).int()
    prefix_lens, q_lens = [0, 5, 11], [7, 3, 1]
    tokens = [[0] * n for n in q_lens]
    hf_module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False)
    for mode in (ForwardMode.PREFILL, ForwardMode.DECODE):
        if mode is ForwardMode.DECODE:
            prefix_lens, tokens = [p + n for p, n in zip(prefix_lens, q_lens, strict=True)], [[0]] * 3
            q_lens = [1, 1, 1]
        _, batch = build_batch(mode, tokens, prefix_lens, [2, 0, 1], req_to_token)
        q = torch.randn(batch.num_tokens, heads, dim, generator=generator)
        k, v = torch.randn(2, batch.num_tokens, kv_heads, dim, generator=generator)
        out = TorchAttentionBackend().forward(q, k, v, 0, batch, kv, scale=dim**-0.5)
        assert torch.equal(kv.k[0][batch.out_slots], k) and torch.equal(kv.v[0][batch.out_slots], v)
        start = 0
        for row, prefix, n in zip([2, 0, 1], prefix_lens, q_lens, strict=True):
            slots_of_seq = req_to_token[row, : prefix + n].long()
            keys = kv.k[0][slots_of_seq].transpose(0, 1)[None]
            values = kv.v[0][slots_of_seq].transpose(0, 1)[None]
            causal = torch.ones(n, prefix + n, dtype=torch.bool).tril(prefix)
            mask = torch.zeros(n, prefix + n).masked_fill(~causal, torch.finfo(torch.float32).min)
            query = q[start : start + n].transpose(0, 1)[None]
            expected, _ = eager_attention_forward(hf_module, query, keys, values, mask[None, None], dim**-0.5)
            torch.testing.assert_close(out[start : start + n], expected[0], atol=1e-5, rtol=0)
            start += n


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
YARN_BETA = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16}


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}),
        ("llama", {"rope_scaling": YARN}),
        ("llama3", {"rope_scaling": YARN_BETA}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),  # biases on q/k/v/o and the MLP
        ("qwen3", {"attention_bias": True}),
    ],
    ids=["linear", "dynamic", "yarn", "yarn-beta", "llama-biases", "qwen3-bias"],
)
def test_variants_match_transformers(arch: str, options: dict[str, object], tmp_path: Path) -> None:
    model_dir = make_tiny_model(arch, tmp_path / "m", **options)
    model, hf = _load(model_dir), _hf(model_dir)
    prompt = _prompts([90], seed=5)[0]
    ours = Sequences(model).step(ForwardMode.PREFILL, [0], [prompt])[0]
    with torch.no_grad():
        reference = hf(torch.tensor([prompt])).logits[0, -1]
    assert (ours - reference).abs().max().item() < LOGIT_ATOL


@pytest.mark.parametrize(
    "rope",
    [
        None,
        {"rope_type": "linear", "factor": 3.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
        {
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 4096,
            "mscale": 0.707,
            "mscale_all_dim": 0.5,
            "truncate": False,
        },
        {
            "rope_type": "yarn",
            "factor": 2.0,
            "original_max_position_embeddings": 4096,
            "attention_factor": 1.3,
        },
    ],
)
def test_inv_freq_equals_transformers_exactly(rope: dict[str, object] | None) -> None:
    hf_config = AutoConfig.for_model(
        "llama",
        hidden_size=2048,
        num_attention_heads=16,
        max_position_embeddings=32768,
        rope_parameters={"rope_theta": 500000.0, **(rope or {"rope_type": "default"})},
    )
    reference = LlamaRotaryEmbedding(hf_config)
    config = ModelConfig.from_dict({**hf_config.to_dict(), "architectures": ["LlamaForCausalLM"]}, name="x")
    inv_freq, scaling = compute_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    assert torch.equal(inv_freq, reference.inv_freq)
    assert scaling == reference.attention_scaling


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "mistral"])
def test_legacy_and_new_config_spellings_agree(arch: str, tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    new = json.loads((tiny_dirs[arch] / "config.json").read_text())
    legacy_file = tmp_path / "config.json"
    legacy_file.write_text(json.dumps(new))
    rewrite_config_legacy(legacy_file)
    legacy = json.loads(legacy_file.read_text())
    assert "rope_parameters" not in legacy and "torch_dtype" in legacy
    assert ModelConfig.from_dict(legacy, name=arch) == ModelConfig.from_dict(new, name=arch)
    if legacy["rope_scaling"]:  # transformers 4.43-4.x wrote "rope_type" inside rope_scaling
        legacy["rope_scaling"]["rope_type"] = legacy["rope_scaling"].pop("type")
        assert ModelConfig.from_dict(legacy, name=arch) == ModelConfig.from_dict(new, name=arch)


def test_config_fields(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    qwen3_dir = tmp_path / "qwen3"
    qwen3_dir.mkdir()
    shutil.copy(tiny_dirs["qwen3"] / "config.json", qwen3_dir / "config.json")
    (qwen3_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "bos_token_id": 1}))
    qwen3 = ModelConfig.from_pretrained(qwen3_dir)
    assert (qwen3.name, qwen3.architecture) == ("qwen3", "Qwen3ForCausalLM")
    assert qwen3.qk_norm and not qwen3.attention_bias and not qwen3.o_proj_bias
    assert qwen3.eos_token_ids == (2, 7) and qwen3.bos_token_id == 1 and qwen3.dtype == "float32"
    qwen2 = ModelConfig.from_pretrained(tiny_dirs["qwen2"])
    assert qwen2.attention_bias and not qwen2.o_proj_bias and qwen2.tie_word_embeddings
    llama3 = ModelConfig.from_pretrained(tiny_dirs["llama3"])
    assert llama3.rope_scaling is not None and llama3.rope_scaling["rope_type"] == "llama3"
    assert (llama3.num_kv_heads, llama3.head_dim, llama3.max_position_embeddings) == (2, 16, 512)
    assert resolve_dtype(llama3, "auto", "cpu") == torch.float32
    assert resolve_dtype(dataclasses.replace(llama3, dtype="bfloat16"), "auto", "cuda") == torch.bfloat16
    assert resolve_dtype(dataclasses.replace(llama3, dtype="float16"), "auto", "cuda") == torch.float16
    assert resolve_dtype(dataclasses.replace(llama3, dtype="float32"), "auto", "cuda") == torch.bfloat16
    assert resolve_dtype(llama3, "float16", "cpu") == torch.float16


def test_sliding_window_caps_context() -> None:
    base = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 32768,
    }
    assert ModelConfig.from_dict({**base, "sliding_window": 4096}, name="m").max_position_embeddings == 4096
    assert ModelConfig.from_dict({**base, "sliding_window": None}, name="m").max_position_embeddings == 32768
    assert (
        ModelConfig.from_dict(base, name="m").max_position_embeddings == 4096
    )  # transformers' default window
    qwen = {**base, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 1024}
    assert (
        ModelConfig.from_dict({**qwen, "use_sliding_window": False}, name="q").max_position_embeddings
        == 32768
    )
    sliding = {**qwen, "use_sliding_window": True, "max_window_layers": 1}
    assert ModelConfig.from_dict(sliding, name="q").max_position_embeddings == 1024


def test_sharded_legacy_checkpoint_loads(tmp_path: Path) -> None:
    model_dir = make_tiny_model("llama3", tmp_path / "m", sharded=True, legacy_config_spelling=True)
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert len(list(model_dir.glob("*.safetensors"))) > 1
    model, hf = _load(model_dir), _hf(model_dir)
    prompt = _prompts([12], seed=9)[0]
    ours = Sequences(model).step(ForwardMode.PREFILL, [0], [prompt])[0]
    with torch.no_grad():
        reference = hf(torch.tensor([prompt])).logits[0, -1]
    assert (ours - reference).abs().max().item() < LOGIT_ATOL


def test_missing_and_unexpected_tensors_are_named(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["qwen2"], broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.bias"
    ) as err:
        _load(broken)
    assert "unexpected tensors: model.layers.0.mlp.extra_proj.weight" in str(err.value)


def test_wrong_shape_fails_loudly(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["llama"], broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(1)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match="does not fit"):
        _load(broken)


def test_unsupported_architecture_lists_supported(tiny_dirs: dict[str, Path]) -> None:
    hf = json.loads((tiny_dirs["llama"] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        ModelConfig.from_dict({**hf, "architectures": ["GPT2LMHeadModel"]}, name="gpt2")
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM, MistralForCausalLM"):
        get_model_spec("GPT2LMHeadModel")
    with pytest.raises(ValueError, match="rope type 'longrope' is unsupported"):
        ModelConfig.from_dict({**hf, "rope_parameters": {"rope_type": "longrope", "factor": 2.0}}, name="x")


def test_dummy_load_needs_only_config(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    shutil.copy(tiny_dirs["llama3"] / "config.json", tmp_path / "config.json")
    model = _load(tmp_path, load_format="dummy")
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    logits = Sequences(model).step(ForwardMode.PREFILL, [0, 1], _prompts([5, 2]))
    assert logits.shape == (2, VOCAB) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        _load(tmp_path)


def test_kv_cache_spec(tiny_dirs: dict[str, Path]) -> None:
    spec = _load(tiny_dirs["llama3"]).kv_cache_spec
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 2, 16)
    assert spec.bytes_per_token(torch.bfloat16) == KVCache.bytes_per_token(2, 2, 16, torch.bfloat16) == 256


def test_weight_loaders_cut_rank_slices() -> None:
    """Rank 1 of 4 takes its rows/columns; a single kv head is replicated on every rank."""
    try:
        set_parallel_state(ParallelState(rank=1, world_size=4))
        qkv = QKVParallelLinear(
            hidden_size=3, head_dim=2, num_heads=8, num_kv_heads=1, bias=True, method=UNQUANTIZED
        )
        full_q, full_k = torch.arange(48.0).view(16, 3), torch.arange(6.0).view(2, 3) + 100
        qkv.weight_loader(qkv.weight, full_q, "q")
        qkv.weight_loader(qkv.weight, full_k, "k")
        qkv.weight_loader(qkv.weight, full_k + 100, "v")
        assert torch.equal(qkv.weight, torch.cat([full_q[4:8], full_k, full_k + 100]))
        gate_up = MergedColumnParallelLinear(3, [8, 8], method=UNQUANTIZED)
        gate_up.weight_loader(gate_up.weight, torch.arange(24.0).view(8, 3), 0)
        gate_up.weight_loader(gate_up.weight, -torch.arange(24.0).view(8, 3), 1)
        assert torch.equal(gate_up.weight[:2], torch.arange(24.0).view(8, 3)[2:4])
        assert torch.equal(gate_up.weight[2:], -torch.arange(24.0).view(8, 3)[2:4])
        row = RowParallelLinear(8, 3, method=UNQUANTIZED)
        row.weight_loader(row.weight, torch.arange(24.0).view(3, 8))
        assert torch.equal(row.weight, torch.arange(24.0).view(3, 8)[:, 2:4])
        embed = VocabParallelEmbedding(10, 2)  # 3 rows per rank; rank 1 owns ids 3..5
        embed.weight_loader(embed.weight, torch.arange(20.0).view(10, 2))
        assert torch.equal(embed.weight, torch.arange(20.0).view(10, 2)[3:6])
    finally:
        set_parallel_state(ParallelState())


@pytest.mark.parametrize(("arch", "world_size", "vocab"), [("qwen2", 2, 512), ("llama3", 4, 510)])
def test_tensor_parallel_matches_single_rank(arch: str, world_size: int, vocab: int, tmp_path: Path) -> None:
    """Real gloo ranks: sharded weights, all-reduce and logits all-gather reproduce TP=1 greedy decoding.

    llama3 at TP=4 has 2 kv heads (each replicated on 2 ranks) and a vocabulary that 4 does not divide.
    """
    model_dir = make_tiny_model(arch, tmp_path / "m", vocab_size=vocab)
    prompts, steps = _prompts([7, 2, 11], seed=4), 6
    expected = greedy_logits(model_dir, prompts, steps)
    out_file = str(tmp_path / "logits")
    mp.spawn(
        tp_worker,
        (world_size, str(tmp_path / "init"), model_dir, prompts, steps, out_file),
        nprocs=world_size,
    )
    for rank in range(world_size):
        logits = torch.load(f"{out_file}.{rank}")
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
