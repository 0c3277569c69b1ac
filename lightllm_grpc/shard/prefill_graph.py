"""CUDA-graph prefill: one prompt of up to a few hundred tokens replays a captured graph.

A short prefill is as many kernel launches as a decode step (about 15 per layer), and from
Python they take longer to launch than the GPU takes to run them: time to first token is
CPU-bound. Graphs are captured per token-count bucket (``prefill_graph_sizes``), from the
largest down, in the decode graphs' memory pool; a prefill of T new tokens of one sequence
(after any cached prefix) replays the smallest bucket of at least T tokens.

Padding: the T real tokens come first, then ``size - T`` padding tokens, which form a second
sequence on ``pad_row``, as decode's padding rows do. That row's columns hold ``pad_slot``,
which no request uses: padding tokens write their K/V there and attend only
to it, so the real sequence (whose device-side ``q_lens`` is T; attention masks by
``q_lens``/``seq_lens``, and its grid, sized by the host bound ``max_q_len`` = the bucket,
has the programs past a sequence's tokens return at once) never sees them, and every other
op (norms, matmuls, rotary, all-reduce) works token by token. Only token T - 1 reaches the
LM head. The padding sequence's lengths are computed from T inside the graph, so a replay
costs the copies of the real inputs and the launch, and every padding row holds finite,
well-defined values rather than whatever memory the pool held.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Protocol

import torch

from lightllm_grpc.layers.forward_batch import ForwardBatch, ForwardMode

log = logging.getLogger(__name__)

MIN_BUCKET = 16


def prefill_graph_sizes(max_tokens: int) -> list[int]:
    """Token-count buckets up to ``max_tokens``, which is always the last (none for 0).

    Powers of two from 16 and 1.5 times each from 32 (16, 32, 48, 64, 96, 128, 192, ...): a
    prefill of more than 32 tokens is padded by at most half its size (below that, reading the
    weights dominates and padding costs little).
    """
    if max_tokens <= 0:
        return []
    sizes, n = [], MIN_BUCKET
    while n < max_tokens:
        sizes.append(n)
        if n >= 32 and n * 3 // 2 < max_tokens:
            sizes.append(n * 3 // 2)
        n *= 2
    return [*sizes, max_tokens]


class TokenInputs(Protocol):
    """The static token inputs of a graph runner captured per token bucket."""

    sizes: list[int]  # the buckets, ascending
    pad_slot: int
    ids: torch.Tensor  # [largest bucket] int64
    positions: torch.Tensor
    slots: torch.Tensor


def copy_tokens(graphs: TokenInputs, input_ids: torch.Tensor, batch: ForwardBatch) -> int:
    """Copy a batch's token ids, positions and KV slots into ``graphs``' static inputs; return
    its bucket (the smallest of ``graphs.sizes`` holding its tokens).

    Device-to-device copies only. Padding tokens keep the ids and positions an earlier step left
    (valid ones, and they only feed their own rows), but their slots go back to ``pad_slot``: an
    earlier step's real slots would get the padding's K/V.
    """
    t = batch.num_tokens
    size = graphs.sizes[bisect.bisect_left(graphs.sizes, t)]
    graphs.ids[:t].copy_(input_ids)
    graphs.positions[:t].copy_(batch.positions)
    graphs.slots[:t].copy_(batch.out_slots)
    if size > t:
        graphs.slots[t:size].fill_(graphs.pad_slot)
    return size


class CudaGraphPrefill:
    """Drop-in replacement for the prefill forward: ``(input_ids, batch) -> logits``.

    Batches that ``fits`` (one sequence, logits at its last token only, at most the largest
    bucket of new tokens) are copied into static buffers (``pad``) and replay the bucket's
    graph (``run``, captured); any other batch runs ``fallback`` (default ``forward``, eagerly;
    the piecewise graphs when there are some). ``pad_row`` is a
    req_to_token row and ``pad_slot`` a KV slot that no request ever uses (the runner's,
    shared with the decode graphs); the constructor points that row's first ``max_tokens``
    columns at that slot.

    The returned logits are the graph's static output: read them (sample) before the next
    replay of any graph of the shared pool, as decode does.
    """

    def __init__(
        self,
        forward,
        req_to_token: torch.Tensor,
        pad_row: int,
        pad_slot: int,
        max_tokens: int,
        device: torch.device,
        fallback: Callable[[torch.Tensor, ForwardBatch], torch.Tensor] | None = None,
    ) -> None:
        assert max_tokens > 0, "a prefill graph needs at least one token"
        self.forward = forward
        self.fallback = forward if fallback is None else fallback
        self.req_to_token = req_to_token
        self.pad_row, self.pad_slot = pad_row, pad_slot
        self.sizes = prefill_graph_sizes(max_tokens)
        n, i64, i32 = self.sizes[-1], torch.int64, torch.int32
        self.ids = torch.zeros(n, dtype=i64, device=device)
        self.positions = torch.zeros(n, dtype=i64, device=device)
        self.slots = torch.full((n,), pad_slot, dtype=i64, device=device)
        # Sequence 0 is the prefill, 1 the padding: rows, lengths and query offsets; and the
        # index of sequence 0's last token (the only one whose logits are computed).
        self.rows = torch.full((2,), pad_row, dtype=i32, device=device)
        self.seq_lens = torch.ones(2, dtype=i32, device=device)
        self.q_starts = torch.zeros(2, dtype=i32, device=device)
        self.q_lens = torch.ones(2, dtype=i32, device=device)
        self.last = torch.zeros(1, dtype=i64, device=device)
        assert n <= req_to_token.shape[1], f"{n} tokens do not fit a req_to_token row"
        req_to_token[pad_row, :n] = pad_slot  # the padding sequence's K/V, all in one slot
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.replays = 0

    def fits(self, batch: ForwardBatch) -> bool:
        """Whether ``batch`` can replay a graph; host-side shapes only, no device sync."""
        return (
            batch.mode is ForwardMode.PREFILL
            and batch.batch_size == 1
            and batch.logits_indices.shape[0] == 1
            and 0 < batch.num_tokens <= self.sizes[-1]
        )

    def static(self, size: int) -> tuple[torch.Tensor, ForwardBatch]:
        """The static inputs of bucket ``size``: what its graph was captured on."""
        batch = ForwardBatch(
            mode=ForwardMode.PREFILL,
            positions=self.positions[:size],
            out_slots=self.slots[:size],
            req_rows=self.rows,
            seq_lens=self.seq_lens,
            q_starts=self.q_starts,
            q_lens=self.q_lens,
            req_to_token=self.req_to_token,
            logits_indices=self.last,
            max_q_len=size,
            max_seq_len=self.req_to_token.shape[1],
        )
        return self.ids[:size], batch

    def run(self, size: int) -> torch.Tensor:
        """What bucket ``size``'s graph holds: the padding sequence's lengths from the real one's
        (device ops only), then the forward on the static buffers."""
        torch.sub(size, self.q_lens[:1], out=self.q_lens[1:])  # its tokens are the rest of the bucket
        self.seq_lens[1:].copy_(self.q_lens[1:])  # and its keys are its own tokens, from position 0
        self.q_starts[1:].copy_(self.q_lens[:1])
        return self.forward(*self.static(size))

    def pad(self, input_ids: torch.Tensor, batch: ForwardBatch) -> int:
        """Copy a batch that ``fits`` into the static buffers (``copy_tokens``, then its one
        sequence's lengths); return its bucket."""
        size = copy_tokens(self, input_ids, batch)
        self.rows[:1].copy_(batch.req_rows)
        self.seq_lens[:1].copy_(batch.seq_lens)
        self.q_lens[:1].copy_(batch.q_lens)  # q_starts[0] is 0 for one sequence, as in the buffer
        self.last.copy_(batch.logits_indices)
        return size

    def _reset(self) -> None:
        """Capture's inputs: a one-token sequence on the padding row; every token writes ``pad_slot``."""
        self.rows[:1].fill_(self.pad_row)
        self.seq_lens[:1].fill_(1)
        self.q_lens[:1].fill_(1)
        self.last.zero_()
        self.slots.fill_(self.pad_slot)

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """Capture every bucket, largest first, into ``pool`` (the decode graphs' ``graph.pool()``;
        None: a new one, kept in ``self.pool``). Collective under TP: every rank captures the
        same buckets in the same order."""
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        self._reset()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        for size in reversed(self.sizes):
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile kernels and settle the allocator first
                    self.run(size)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                output = self.run(size)
            pool = graph.pool()
            self.graphs[size], self.outputs[size] = graph, output
        torch.cuda.synchronize()
        self.pool = pool
        log.info(
            "captured %d prefill graphs (%s tokens) in %.1fs, %.0f MiB of GPU memory",
            len(self.sizes),
            ",".join(map(str, self.sizes)),
            time.perf_counter() - start,
            (free_before - torch.cuda.mem_get_info()[0]) / 2**20,
        )

    def __call__(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if not self.fits(batch):
            return self.fallback(input_ids, batch)
        size = self.pad(input_ids, batch)
        self.replays += 1
        return self.replay(size)

    def replay(self, size: int) -> torch.Tensor:
        """Run bucket ``size``'s graph on the static buffers; its logits ``[1, vocab]``."""
        self.graphs[size].replay()
        return self.outputs[size]
