"""One decoder for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3).

The members differ only in flags carried by ``ModelConfig``: q/k/v (and o) bias, per-head
q/k RMSNorm, RoPE scaling and tied embeddings. Module names mirror transformers' so checkpoint
names map one to one, except for the fused projections listed in ``packed_modules_mapping``.
With ``config.quantization`` the decoder's projections get ``Fp8LinearMethod`` through
``ops.linear`` (``Ops.with_quantization``); embeddings, LM head and norms stay in the model
dtype (docs/quantization.md says why). With ``config.kv_cache_dtype == "fp8_e4m3"`` each
attention layer holds its K and V cache scales (fp32 buffers, 1.0 unless the checkpoint has
them), which ``kv_cache_spec`` hands to the KV pool.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from lightllm_grpc.layers.activation import ActIntoDown, SiluAndMul
from lightllm_grpc.layers.attention.base import FP8, AttentionBackend, KVCache
from lightllm_grpc.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from lightllm_grpc.layers.forward_batch import ForwardBatch
from lightllm_grpc.layers.linear import (
    Matmul,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from lightllm_grpc.layers.norm import AddNormLinear, RMSNorm
from lightllm_grpc.layers.ops import Ops
from lightllm_grpc.layers.rotary import RotaryEmbedding
from lightllm_grpc.models.config import ModelConfig
from lightllm_grpc.parallel import all_reduce


@dataclass(frozen=True)
class KVCacheSpec:
    """What one rank's KV pool holds per token: sizes the pool and builds the ``KVCache``.

    ``dtype`` arguments are the model's; an FP8 spec stores e4m3 whatever it is, with the
    per-layer scales (the same on every TP rank) given to the pool it builds.
    """

    num_layers: int
    num_kv_heads: int  # on this rank (kv heads are split, or replicated when fewer than ranks)
    head_dim: int
    fp8: bool = False  # --kv-cache-dtype fp8_e4m3
    k_scales: tuple[float, ...] | None = None  # per layer, FP8 only (None: 1.0)
    v_scales: tuple[float, ...] | None = None

    def storage_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return FP8 if self.fp8 else dtype

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        storage = self.storage_dtype(dtype)
        return KVCache.bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, storage)

    def make_cache(self, num_slots: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        return KVCache(
            self.num_layers, num_slots, self.num_kv_heads, self.head_dim, self.storage_dtype(dtype), device,
            self.k_scales, self.v_scales,
        )  # fmt: skip


class QKV(NamedTuple):
    """A layer's attention inputs: q ``[T, H, D]`` and the K/V it stored ``[T, Hkv, D]`` (k rotated)."""

    q: Tensor
    k: Tensor
    v: Tensor


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        rotary_emb: RotaryEmbedding,
        backend: AttentionBackend,
        ops: Ops,
        prefix: str,
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_heads,
            config.num_kv_heads,
            config.attention_bias,
            method=ops.linear(f"{prefix}.qkv_proj"),
        )
        # Its partial sums go to the post-attention norm, which all-reduces them (AddNormLinear).
        self.o_proj = RowParallelLinear(
            config.q_size,
            config.hidden_size,
            config.o_proj_bias,
            method=ops.linear(f"{prefix}.o_proj"),
            reduce_output=False,
        )
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, ops) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, ops) if config.qk_norm else None
        self.rotary_emb = rotary_emb  # one module shared by all layers
        # The backend rotates q/k in its KV store (one kernel on the Triton path) or we do first.
        self.rotary_in_kv_store = ops.rotary_in_kv_store
        self.backend = backend
        if config.kv_cache_dtype == "fp8_e4m3":
            # The checkpoint's KV-cache scales, if any (the loader fills them); copied to the pool.
            self.register_buffer("k_scale", torch.ones((), dtype=torch.float32))
            self.register_buffer("v_scale", torch.ones((), dtype=torch.float32))

    def project(
        self, positions: torch.Tensor, hidden: torch.Tensor, out_slots: torch.Tensor, kv: KVCache
    ) -> QKV:
        """Everything before attention: q/k/v projections, q/k norms, rotary, and the store of
        the new K/V at ``out_slots``. Returns q ``[T, H, D]`` and the stored k (rotated) and v
        ``[T, Hkv, D]``. Reads no other batch field, and never syncs with the host: piecewise
        CUDA graphs capture it (shard/piecewise_graph.py)."""
        return self.project_qkv(positions, self.qkv_proj(hidden), out_slots, kv)

    def project_qkv(
        self, positions: torch.Tensor, qkv: torch.Tensor, out_slots: torch.Tensor, kv: KVCache
    ) -> QKV:
        """``project`` from the qkv projection's output on (the decoder layer computes it with
        the input norm, ``attn_in``)."""
        num_tokens = qkv.shape[0]
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, -1, self.head_dim)
        k = k.view(num_tokens, -1, self.head_dim)
        v = v.view(num_tokens, -1, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q)[0], self.k_norm(k)[0]
        if self.rotary_in_kv_store:  # rotary inside the store (one kernel on the Triton backend)
            q, k = self.backend.rotate_and_store(
                q, k, v, self.layer_id, positions, out_slots, kv, self.rotary_emb
            )
        else:
            q, k = self.rotary_emb(positions, q, k)
            self.backend.store(k, v, self.layer_id, out_slots, kv)
        return QKV(q, k, v)

    def attend(
        self, qkv: QKV, batch: ForwardBatch, kv: KVCache, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of ``qkv.q`` ``[T, H, D]`` over the pool (the new K/V already stored, and
        also passed as they are), into ``out``."""
        new_kv = (qkv.k, qkv.v)
        return self.backend.attend(qkv.q, self.layer_id, batch, kv, self.scale, out=out, new_kv=new_kv)


class LlamaMLP(nn.Module, ActIntoDown):
    def __init__(self, config: ModelConfig, ops: Ops, prefix: str) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [inter, inter], config.mlp_bias, method=ops.linear(f"{prefix}.gate_up_proj")
        )
        self.act_fn = SiluAndMul(ops)
        # Its partial sums go to the next layer's input norm (or the final norm), which all-reduces.
        self.down_proj = RowParallelLinear(
            inter,
            config.hidden_size,
            config.mlp_bias,
            method=ops.linear(f"{prefix}.down_proj"),
            reduce_output=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_gate_up(self.gate_up_proj(x))

    def forward_gate_up(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The MLP from its gate_up projection's output on (the decoder layer computes it with the
        post-attention norm, ``mlp_in``)."""
        return self.down_proj(self.act_fn(gate_up))

    def fuse_act_into_down(self, matmul: Matmul) -> None:
        """``ActIntoDown``: ``down_proj`` multiplies with ``matmul``, which applies SiLU-and-mul to
        the gate_up output itself (warm-up's choice, per layer)."""
        self.down_proj.matmul = matmul
        self.act_fn = nn.Identity()
        self.act_in_down = True


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        rotary_emb: RotaryEmbedding,
        backend: AttentionBackend,
        ops: Ops,
        prefix: str,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, rotary_emb, backend, ops, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, ops, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        # Each norm with the projection that reads it, as one step (warm-up may make it one kernel).
        # With TP their inputs are partial sums (embedding, down_proj, o_proj): they all-reduce.
        self.attn_in = AddNormLinear(self.input_layernorm, self.self_attn.qkv_proj, reduce_input=True)
        self.mlp_in = AddNormLinear(self.post_attention_layernorm, self.mlp.gate_up_proj, reduce_input=True)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        kv: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mlp output, residual stream)``; the next layer's norm adds them (fused)."""
        qkv, residual = self.before_attention(positions, hidden, residual, batch.out_slots, kv)
        return self.after_attention(self.self_attn.attend(qkv, batch, kv), residual)

    def before_attention(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        out_slots: torch.Tensor,
        kv: KVCache,
    ) -> tuple[QKV, torch.Tensor]:
        """The input norm and ``self_attn.project``: ``(QKV, residual stream)``."""
        qkv, residual = self.attn_in(hidden, residual)  # input_layernorm, then qkv_proj
        return self.self_attn.project_qkv(positions, qkv, out_slots, kv), residual

    def after_attention(
        self, attn: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """From the attention output ``[T, H, D]``: o_proj, the post-attention norm and the MLP;
        ``(mlp output, residual stream)``."""
        hidden = self.self_attn.o_proj(attn.reshape(attn.shape[0], -1))
        gate_up, residual = self.mlp_in(hidden, residual)  # post_attention_layernorm, then gate_up_proj
        return self.mlp.forward_gate_up(gate_up), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, ops: Ops, prefix: str) -> None:
        super().__init__()
        # Partial rows with TP: the first layer's input norm all-reduces them.
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, reduce_output=False)
        rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling, ops
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary_emb, backend, ops, f"{prefix}.layers.{i}")
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """Final-norm hidden states ``[B, hidden]`` of the rows at ``batch.logits_indices`` only."""
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(batch.positions, hidden, residual, batch, kv)
        assert residual is not None  # config validation guarantees at least one layer
        return self.final_norm(hidden, residual, batch.logits_indices)

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The last add + RMSNorm, of the token rows ``rows`` only. ``hidden`` is the last
        down_proj's partial sum (TP): only those rows are all-reduced."""
        return self.norm(all_reduce(hidden[rows]), residual[rows])[0]

    def piece(
        self,
        i: int,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        out_slots: torch.Tensor,
        kv: KVCache,
    ) -> tuple[QKV | torch.Tensor, torch.Tensor]:
        """Piece ``i`` of the ``num_layers + 1`` that ``forward`` is cut into at attention (what
        shard/piecewise_graph.py captures; attention runs between pieces). Piece 0 embeds
        ``x`` (token ids) and runs layer 0 up to its K/V store; piece i (1..L-1) finishes layer
        i - 1 from its attention output ``x`` and ``residual`` and runs layer i up to its K/V
        store: these return ``(QKV, residual)``. Piece L finishes the last layer and returns
        ``(mlp output, residual)`` for ``final_norm``. The same calls as ``forward``'s, in order."""
        if i == 0:
            hidden, residual = self.embed_tokens(x), None
        else:
            assert residual is not None, "pieces after the first take the residual stream"
            hidden, residual = self.layers[i - 1].after_attention(x, residual)
        if i == len(self.layers):
            return hidden, residual
        return self.layers[i].before_attention(positions, hidden, residual, out_slots, kv)


class LlamaForCausalLM(nn.Module):
    """``forward(input_ids [T], batch, kv)`` -> fp32 logits ``[B, vocab]`` of each sequence's last token.

    ``ops`` chooses every layer's implementation (native torch or Triton) once, here; layers
    are named by their checkpoint prefix, which ``ops.linear`` sees. ``config.quantization``
    is applied to ``ops`` first, so ``self.ops`` is what the layers were built with.
    """

    # checkpoint module name -> (our fused module, shard id for its weight_loader)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # checkpoint tensors that are derived buffers, not weights
    ignored_weight_suffixes: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend, ops: Ops) -> None:
        super().__init__()
        self.config = config
        self.ops = ops = ops.with_quantization(config.quantization, self.packed_modules_mapping)
        self.model = LlamaModel(config, attn_backend, ops, "model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        attns = [layer.self_attn for layer in self.model.layers]
        spec = KVCacheSpec(self.config.num_layers, attns[0].qkv_proj.num_kv_heads, attns[0].head_dim)
        if self.config.kv_cache_dtype != "fp8_e4m3":
            return spec
        k_scales = tuple(float(a.k_scale) for a in attns)
        return dataclasses.replace(
            spec, fp8=True, k_scales=k_scales, v_scales=tuple(float(a.v_scale) for a in attns)
        )

    def forward(
        self, input_ids: torch.Tensor, batch: ForwardBatch, kv: KVCache, logits_out: Tensor | None = None
    ) -> torch.Tensor:
        return self.logits(self.model(input_ids, batch, kv), logits_out)

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits of final-norm hidden states ``[B, hidden]``, written into ``out`` if given
        (the decode CUDA graphs' one shared buffer: no per-graph copy of the logits)."""
        logits = self.lm_head(hidden)
        return logits.float() if out is None else out.copy_(logits)
