"""The embedded default model: a small random-weight Llama with a locally trained tokenizer.

``make serve`` with no ``--model`` serves it, so the whole server runs on a fresh
machine with no download. It is generated deterministically on first use into a cache
folder; its output is fluent-looking gibberish, since the weights are random.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from lightllm_grpc.models.tiny_tokenizer import save_tokenizer

log = logging.getLogger(__name__)
NAME = "lightllm-tiny-llama-v1"
VOCAB = 2048


def cache_root() -> Path:
    env = os.environ.get("LIGHTLLM_GRPC_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightllm-grpc"


def ensure_default_model(root: Path | None = None) -> Path:
    """Return the default model's folder, building it there first if needed."""
    target = (root or cache_root()) / NAME
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
    try:
        _build(tmp)
        tmp.rename(target)  # atomic: a half-written model is never seen
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def _build(out: Path) -> None:
    # Imported here: the coordinator calls ensure_default_model and otherwise never needs torch.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = save_tokenizer(VOCAB, out)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=0.08,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out))
