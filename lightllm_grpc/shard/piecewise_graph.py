"""Piecewise CUDA graphs: prefill and mixed steps replay the model cut at attention.

A step that prefills several prompts, or mixes prefill chunks with decode rows
(``ForwardMode.MIXED``), cannot replay a whole-model graph: attention depends on the batch's
ragged structure (how many sequences, how long each), which a graph would freeze. Eagerly,
it is ~15 launches per layer from Python, which on an 8B model take longer (13-21 ms) than the
GPU takes to run a few-hundred-token step (4-5 ms). So, as vLLM v1 does, everything but
attention is captured, per token-count bucket (``prefill_graph_sizes``), as ``L + 1`` graphs
("pieces", ``LlamaModel.piece``): piece 0 is the embedding and layer 0 up to the store of its
new K/V; piece i finishes layer i - 1 (o_proj, norm, MLP) and runs layer i up to its K/V
store; piece L finishes the last layer. Between pieces attention runs eagerly
(``LlamaAttention.attend``: the prefill kernel and/or the decode kernels over the KV pool), on
the real tokens only. After the last piece, the rows at ``batch.logits_indices`` go through
the final norm and the LM head, eagerly too (their count varies by step). The pieces hold the
per-token ops (norms, matmuls, rotary, the KV store, tensor-parallel all-reduces) whose shapes
depend on the token count alone.

Static buffers, sized for the largest bucket and shared by every bucket through slices: token
ids, positions and KV slots (inputs), q (after rotary, a piece's output and attention's input),
the attention output (attention's output, the next piece's input), the residual stream and the
last piece's MLP output. A piece copies its results into them (the Triton add+RMSNorm updates
the residual in place), so what it allocates inside is freed when its capture ends and the
graphs' memory pool (the decode graphs', shared with the prefill graphs) keeps about one
piece's activations at the largest bucket.

Padding: a step of T tokens runs the smallest bucket of at least T; rows T..bucket carry
whatever ids and positions an earlier step left (valid ones), and their K/V go to ``pad_slot``,
which no request uses. They only feed their own rows: every op in a piece works token by
token, attention reads ``[:T]`` and writes ``[:T]`` only, and the LM head reads the rows of
``logits_indices``. The logits are the eager forward's: the same kernels in the same order on
the same values (a padded matmul has more rows, which cuBLAS may tile differently).

Until ``capture`` is called (always on the CPU: tests), the same pieces run eagerly through the
same buffers and padding.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from lightllm_grpc.layers.attention.base import KVCache
from lightllm_grpc.layers.forward_batch import ForwardBatch, ForwardMode
from lightllm_grpc.models.llama import QKV
from lightllm_grpc.shard.prefill_graph import copy_tokens, prefill_graph_sizes

if TYPE_CHECKING:
    from lightllm_grpc.models.llama import LlamaForCausalLM
    from lightllm_grpc.shard.runner import ForwardFn

log = logging.getLogger(__name__)


class PiecewiseCudaGraphs:
    """Drop-in forward for prefill and mixed batches: ``(input_ids, batch) -> logits``.

    Batches that ``fit`` (PREFILL or MIXED, at most the largest bucket of tokens) are copied into
    the static buffers (``pad``) and run the bucket's pieces with attention between them
    (``run``); any other batch runs ``forward`` (the eager model) as it is. ``model`` and
    ``kv`` are what ``forward`` runs on. Until ``capture`` is called, or on CPU, the pieces run
    eagerly; after it, each replays its graph. Returns fresh logits (not a graph's output).
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv: KVCache,
        forward: ForwardFn,
        pad_slot: int,
        max_tokens: int,
        device: torch.device,
    ) -> None:
        assert max_tokens > 0, "piecewise graphs need at least one token"
        self.model, self.body, self.kv, self.forward = model, model.model, kv, forward
        self.pad_slot = pad_slot
        self.sizes = prefill_graph_sizes(max_tokens)
        self.num_layers = len(self.body.layers)
        attn = self.body.layers[0].self_attn
        heads, head_dim = attn.qkv_proj.num_heads, attn.head_dim  # this rank's heads
        kv_heads = attn.qkv_proj.num_kv_heads
        dtype = self.body.embed_tokens.weight.dtype
        n, hidden = self.sizes[-1], model.config.hidden_size
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), pad_slot, dtype=torch.int64, device=device)
        self.q = torch.zeros(n, heads, head_dim, dtype=dtype, device=device)
        # The stored K/V of the pieces' tokens: prefill attention reads a chunk's own keys here.
        self.k = torch.zeros(n, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(n, kv_heads, head_dim, dtype=dtype, device=device)
        self.attn = torch.zeros(n, heads, head_dim, dtype=dtype, device=device)
        self.residual = torch.zeros(n, hidden, dtype=dtype, device=device)
        self.hidden = torch.zeros(n, hidden, dtype=dtype, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}  # bucket -> its L + 1 pieces
        self.pool = None
        self.replays = 0  # batches run through the pieces (captured or not)

    @property
    def buffer_bytes(self) -> int:
        tensors = (self.ids, self.positions, self.slots, self.q, self.k, self.v, self.attn)
        tensors += (self.residual, self.hidden)
        return sum(t.numel() * t.element_size() for t in tensors)

    def fits(self, batch: ForwardBatch) -> bool:
        """Whether ``batch`` can run through the pieces; host-side shapes only, no device sync."""
        return batch.mode is not ForwardMode.DECODE and 0 < batch.num_tokens <= self.sizes[-1]

    def __call__(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if not self.fits(batch):
            return self.forward(input_ids, batch)
        size = self.pad(input_ids, batch)
        self.replays += 1
        return self.run(size, batch)

    def pad(self, input_ids: torch.Tensor, batch: ForwardBatch) -> int:
        """Copy a batch that ``fits`` into the static inputs (``copy_tokens``); return its bucket."""
        return copy_tokens(self, input_ids, batch)

    def run(self, size: int, batch: ForwardBatch) -> torch.Tensor:
        """Bucket ``size``'s pieces on the static buffers (``pad`` filled them), attention of the
        real tokens between them, then the final norm and LM head of the rows that need logits."""
        t = batch.num_tokens
        pieces = self.graphs.get(size)
        for i in range(self.num_layers + 1):
            if pieces is not None:
                pieces[i].replay()
            else:
                self.piece(size, i)
            if i < self.num_layers:
                qkv = QKV(self.q[:t], self.k[:t], self.v[:t])
                self.body.layers[i].self_attn.attend(qkv, batch, self.kv, out=self.attn[:t])
        rows = batch.logits_indices
        return self.model.logits(self.body.final_norm(self.hidden, self.residual, rows))

    def piece(self, size: int, i: int) -> None:
        """Piece ``i`` of bucket ``size`` on the static buffers (what its graph holds)."""
        if i == 0:
            x, residual = self.ids[:size], None
        else:
            x, residual = self.attn[:size], self.residual[:size]
        out, residual = self.body.piece(i, x, residual, self.positions[:size], self.slots[:size], self.kv)
        if isinstance(out, QKV):
            for buf, t in zip((self.q, self.k, self.v), out, strict=True):
                buf[:size].copy_(t)
        else:
            self.hidden[:size].copy_(out)
        if residual.data_ptr() != self.residual.data_ptr():  # the Triton add+norm updates it in place
            self.residual[:size].copy_(residual)

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """Capture every bucket's pieces, largest bucket first, into ``pool`` (the decode graphs'
        ``graph.pool()``; None: a new one, kept in ``self.pool``). Collective under TP: every rank
        captures the same buckets in the same order. The slots buffer is reset to ``pad_slot``
        first, so the capture's forwards write K/V there alone."""
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        self.slots.fill_(self.pad_slot)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        for size in reversed(self.sizes):
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile kernels and settle the allocator first
                    for i in range(self.num_layers + 1):
                        self.piece(size, i)
            stream.synchronize()
            pieces = []
            for i in range(self.num_layers + 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.piece(size, i)
                pool = graph.pool()
                pieces.append(graph)
            self.graphs[size] = pieces
        torch.cuda.synchronize()
        self.pool = pool
        log.info(
            "captured %d piecewise graphs (%d pieces x %d buckets: %s tokens) in %.1fs, %.0f MiB "
            "of GPU memory (+ %.0f MiB of static buffers)",
            len(self.sizes) * (self.num_layers + 1),
            self.num_layers + 1,
            len(self.sizes),
            ",".join(map(str, self.sizes)),
            time.perf_counter() - start,
            (free_before - torch.cuda.mem_get_info()[0]) / 2**20,
            self.buffer_bytes / 2**20,
        )
