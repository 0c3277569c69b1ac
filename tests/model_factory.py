"""Tiny random-weight Hugging Face checkpoints for tests, and helpers that run our model on them.

``make_tiny_model`` writes a real transformers checkpoint (config.json, generation_config.json,
safetensors) of a 2-layer model, with weights scaled up so greedy decoding produces varied
tokens. It builds no tokenizer. ``build_batch`` packs sequences into a CPU ``ForwardBatch``;
``greedy_logits`` runs prefill plus greedy decode; ``tp_worker`` does so as one gloo rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lightllm_grpc.layers.attention.torch_backend import TorchAttentionBackend
from lightllm_grpc.layers.forward_batch import ForwardBatch, ForwardMode
from lightllm_grpc.models.loader import load_model
from lightllm_grpc.parallel import ParallelState, set_parallel_state

TINY_ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3")
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small on purpose: with head_dim 16 this puts frequencies in all three llama3 bands.
    "original_max_position_embeddings": 64,
}
_BASE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_ARCH_CONFIG: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "num_key_value_heads": 4, "rope_theta": 10000.0},
    "llama3": {
        "model_type": "llama",
        "num_key_value_heads": 2,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE,
    },
    "mistral": {"model_type": "mistral", "num_key_value_heads": 2, "rope_theta": 1e6, "sliding_window": 4096},
    "qwen2": {
        "model_type": "qwen2",
        "num_key_value_heads": 2,
        "rope_theta": 1e6,
        "tie_word_embeddings": True,
    },
    "qwen3": {"model_type": "qwen3", "num_key_value_heads": 2, "rope_theta": 1e6},
}
_WEIGHT_STD = 0.25  # large enough that logits spread out and greedy decoding varies
_EMBED_STD = 0.5  # larger makes tied-embedding models (qwen2) just repeat their last token


def make_tiny_model(
    arch: str,
    out_dir: Path,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    legacy_config_spelling: bool = False,
    sharded: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    standard_init: bool = False,
    **config_overrides: Any,
) -> Path:
    """Save a tiny fp32 ``arch`` model (one of ``TINY_ARCHS``) to ``out_dir`` and return it.

    ``rope_scaling`` replaces the arch's RoPE scaling (e.g. ``{"rope_type": "yarn", "factor": 4.0}``);
    ``config_overrides`` go to the HF config as is (e.g. ``attention_bias=True``).
    ``standard_init`` keeps transformers' small-weight init (for numerics checks, where
    the enlarged weights would blow bf16 rounding up). ``legacy_config_spelling`` rewrites
    config.json the pre-transformers-5 way
    (``rope_theta``/``rope_scaling`` with ``type``/``torch_dtype``); ``sharded`` splits the
    weights over several files with a ``model.safetensors.index.json``.
    """
    from transformers import AutoModelForCausalLM  # lazily: TP worker processes never need it

    if arch not in _ARCH_CONFIG:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")
    config = _hf_config(arch, vocab_size, rope_scaling, config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if not standard_init:  # transformers' own init (std 0.02) gives near-uniform, degenerate output
        _scale_up_weights(model, seed)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, max_shard_size="100KB" if sharded else "10GB")
    if legacy_config_spelling:
        rewrite_config_legacy(out_dir / "config.json")
    return out_dir


def rewrite_config_legacy(config_file: Path) -> None:
    """Rewrite a transformers-5 config.json into the older spelling of the same settings."""
    hf = json.loads(config_file.read_text())
    rope = dict(hf.pop("rope_parameters", None) or {})
    hf["rope_theta"] = rope.pop("rope_theta", 10000.0)
    rope_type = rope.pop("rope_type", "default")
    rope.pop("type", None)
    hf["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    if "dtype" in hf:
        hf["torch_dtype"] = hf.pop("dtype")
    config_file.write_text(json.dumps(hf, indent=2))


def _hf_config(
    arch: str, vocab_size: int, rope_scaling: dict[str, Any] | None, overrides: dict[str, Any]
) -> Any:
    from transformers import AutoConfig

    settings = {**_BASE, **_ARCH_CONFIG[arch], "vocab_size": vocab_size, **overrides}
    model_type = settings.pop("model_type")
    theta = settings.pop("rope_theta")
    rope = dict(rope_scaling or settings.pop("rope_scaling", None) or {"rope_type": "default"})
    settings.pop("rope_scaling", None)
    settings["rope_parameters"] = {"rope_theta": theta, **rope}
    return AutoConfig.for_model(model_type, **settings)


def _scale_up_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-init with large weights and non-trivial norms/biases so every loaded tensor matters."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                std = _EMBED_STD if "embed_tokens" in name else _WEIGHT_STD
                param.copy_(std * torch.randn(param.shape, generator=generator))


def build_batch(
    mode: ForwardMode,
    new_tokens: list[list[int]],
    prefix_lens: list[int],
    req_rows: list[int],
    req_to_token: torch.Tensor,
) -> tuple[torch.Tensor, ForwardBatch]:
    """Pack ``new_tokens`` of each sequence into ``(input_ids [T], ForwardBatch)`` on CPU.

    Sequence ``b`` occupies row ``req_rows[b]`` of ``req_to_token``, whose first
    ``prefix_lens[b] + len(new_tokens[b])`` entries must already hold its slot ids.
    """
    q_lens = [len(tokens) for tokens in new_tokens]
    seq_lens = [p + n for p, n in zip(prefix_lens, q_lens, strict=True)]
    q_starts = [sum(q_lens[:b]) for b in range(len(q_lens))]
    positions = torch.cat([torch.arange(p, s) for p, s in zip(prefix_lens, seq_lens, strict=True)])
    rows = torch.tensor(req_rows, dtype=torch.int64)
    out_slots = torch.cat(
        [req_to_token[r, p:s].long() for r, p, s in zip(req_rows, prefix_lens, seq_lens, strict=True)]
    )
    batch = ForwardBatch(
        mode=mode,
        positions=positions,
        out_slots=out_slots,
        req_rows=rows.int(),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        q_starts=torch.tensor(q_starts, dtype=torch.int32),
        q_lens=torch.tensor(q_lens, dtype=torch.int32),
        req_to_token=req_to_token,
        logits_indices=torch.tensor([s + n - 1 for s, n in zip(q_starts, q_lens, strict=True)]),
        max_q_len=max(q_lens),
        max_seq_len=max(seq_lens),
    )
    input_ids = torch.tensor([t for tokens in new_tokens for t in tokens], dtype=torch.int64)
    return input_ids, batch


def greedy_logits(
    model_dir: Path, prompts: list[list[int]], steps: int, kv_cache_dtype: str = "auto"
) -> torch.Tensor:
    """Load ``model_dir`` on CPU (fp32, torch backend), prefill ``prompts`` packed, decode ``steps`` tokens.

    Returns the logits ``[steps + 1, B, V]``. Under tensor parallelism every rank returns the full logits.
    """
    model = load_model(
        model_dir,
        device="cpu",
        dtype="float32",
        attn_backend=TorchAttentionBackend(),
        kv_cache_dtype=kv_cache_dtype,
    )
    max_len = max(map(len, prompts)) + steps
    kv = model.kv_cache_spec.make_cache(len(prompts) * max_len, torch.float32, "cpu")
    req_to_token = torch.arange(len(prompts) * max_len, dtype=torch.int32).view(len(prompts), max_len)
    rows, lens, history = list(range(len(prompts))), [0] * len(prompts), []
    new_tokens, mode = prompts, ForwardMode.PREFILL
    with torch.no_grad():
        for _ in range(steps + 1):
            input_ids, batch = build_batch(mode, new_tokens, lens, rows, req_to_token)
            logits = model(input_ids, batch, kv)
            history.append(logits)
            lens = [n + len(t) for n, t in zip(lens, new_tokens, strict=True)]
            new_tokens, mode = [[t] for t in logits.argmax(-1).tolist()], ForwardMode.DECODE
    return torch.stack(history)


def tp_worker(
    rank: int,
    world_size: int,
    init_file: str,
    model_dir: Path,
    prompts: list[list[int]],
    steps: int,
    out_file: str,
    kv_cache_dtype: str = "auto",
) -> None:
    """``torch.multiprocessing.spawn`` target: rank ``rank`` of a gloo group runs ``greedy_logits``."""
    set_parallel_state(ParallelState(rank, world_size))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        logits = greedy_logits(model_dir, prompts, steps, kv_cache_dtype)
        torch.save(logits, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def logits_at_every_position(model: torch.nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    """Prefill ``prompts`` packed on a fresh CPU pool (each stores its K/V, then attends to the
    pool) and return the logits of every position ``[T, V]``."""
    total = sum(map(len, prompts))
    kv = model.kv_cache_spec.make_cache(total, torch.float32, "cpu")
    table = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.int32)
    start = 0
    for i, p in enumerate(prompts):
        table[i, : len(p)] = torch.arange(start, start + len(p), dtype=torch.int32)
        start += len(p)
    ids, batch = build_batch(
        ForwardMode.PREFILL, prompts, [0] * len(prompts), list(range(len(prompts))), table
    )
    batch.logits_indices = torch.arange(total)
    with torch.no_grad():
        return model(ids, batch, kv)
