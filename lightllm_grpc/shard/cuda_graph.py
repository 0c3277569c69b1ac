"""CUDA-graph decode: one captured graph per batch size, replayed with padded inputs.

At batch 1 a decode step is hundreds of small kernels; launching them one by one costs
milliseconds of CPU time per token. Replaying a captured graph launches them all at once.
Graphs are captured from the largest batch down, sharing one memory pool (which the prefill
graphs of shard/prefill_graph.py then share too); a batch is padded up to the next captured
size with a dummy row whose K/V goes to a dummy slot.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from lightllm_grpc.layers.forward_batch import ForwardBatch, ForwardMode

log = logging.getLogger(__name__)


# Batches this large also get a graph with cascade attention (prefix groups): smaller ones
# gain too little from reading a shared prefix once to pay for a second capture.
CASCADE_MIN_BATCH = 64


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 12, 16, 24, 32, *range(48, 257, 16), *range(288, 1025, 32)]
    return [s for s in sizes if s <= max_batch] or [1]


class CudaGraphDecoder:
    """Drop-in replacement for the decode forward: ``(input_ids, batch) -> logits``.

    ``pad_row`` is a req_to_token row and ``pad_slot`` a KV slot that no request ever
    uses; padded entries attend over that row (length 1) and write to that slot.
    """

    def __init__(
        self,
        forward,
        req_to_token: torch.Tensor,
        pad_row: int,
        pad_slot: int,
        max_batch: int,
        device: torch.device,
    ) -> None:
        self.forward = forward
        self.req_to_token = req_to_token
        self.pad_row, self.pad_slot = pad_row, pad_slot
        self.sizes = graph_batch_sizes(max_batch)
        n = self.sizes[-1]
        i64, i32 = torch.int64, torch.int32
        self.ids = torch.zeros(n, dtype=i64, device=device)
        self.positions = torch.zeros(n, dtype=i64, device=device)
        self.slots = torch.full((n,), pad_slot, dtype=i64, device=device)
        self.rows = torch.full((n,), pad_row, dtype=i32, device=device)
        self.seq_lens = torch.ones(n, dtype=i32, device=device)
        self.arange32 = torch.arange(n, dtype=i32, device=device)
        self.arange64 = torch.arange(n, dtype=i64, device=device)
        self.ones = torch.ones(n, dtype=i32, device=device)
        self.shared_lens = torch.zeros(n, dtype=i32, device=device)
        self.group_sizes = torch.zeros(n, dtype=i32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.cascade_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cascade_outputs: dict[int, torch.Tensor] = {}
        self.logits: torch.Tensor | None = None  # [max batch, vocab] fp32: every graph's output
        self.pool = None  # the graphs' memory pool, once captured

    def _batch(self, bs: int, cascade: bool = False) -> ForwardBatch:
        batch = ForwardBatch(
            mode=ForwardMode.DECODE,
            positions=self.positions[:bs],
            out_slots=self.slots[:bs],
            req_rows=self.rows[:bs],
            seq_lens=self.seq_lens[:bs],
            q_starts=self.arange32[:bs],
            q_lens=self.ones[:bs],
            req_to_token=self.req_to_token,
            logits_indices=self.arange64[:bs],
            max_q_len=1,
            max_seq_len=self.req_to_token.shape[1],
        )
        if cascade:
            batch.shared_lens, batch.group_sizes = self.shared_lens[:bs], self.group_sizes[:bs]
        return batch

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        self.req_to_token[self.pad_row, 0] = self.pad_slot
        pool = None
        stream = torch.cuda.Stream()
        # Every graph writes its logits into one shared buffer: were each graph's output its own
        # tensor in the pool, the outputs would add up (sum of the sizes x vocab x 4 bytes:
        # 5.4 GiB at 512 rows, an out-of-memory at 1,024 on a 141 GB card).
        vocab = self.forward(self.ids[:1], self._batch(1)).shape[-1]
        self.logits = torch.empty(self.sizes[-1], vocab, dtype=torch.float32, device=self.ids.device)
        # The side stream runs after the forward above: under TP, two forwards in flight at once
        # would interleave their collectives (the barrier-free all-reduce counts its calls).
        stream.wait_stream(torch.cuda.current_stream())
        for bs in reversed(self.sizes):
            for cascade in (True, False) if bs >= CASCADE_MIN_BATCH else (False,):
                batch = self._batch(bs, cascade)
                out = self.logits[:bs]
                with torch.cuda.stream(stream):
                    for _ in range(2):  # compile kernels and settle the allocator first
                        self.forward(self.ids[:bs], batch, logits_out=out)
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    output = self.forward(self.ids[:bs], batch, logits_out=out)
                pool = graph.pool()
                graphs, outputs = (
                    (self.cascade_graphs, self.cascade_outputs) if cascade else (self.graphs, self.outputs)
                )
                graphs[bs], outputs[bs] = graph, output
        torch.cuda.synchronize()
        self.pool = pool
        log.info(
            "captured %d decode graphs (batch 1..%d) and %d with cascade attention in %.1fs, "
            "%.0f MiB of GPU memory",
            len(self.sizes),
            self.sizes[-1],
            len(self.cascade_graphs),
            time.perf_counter() - start,
            (free_before - torch.cuda.mem_get_info()[0]) / 2**20,
        )

    def __call__(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        bs = batch.batch_size
        if bs > self.sizes[-1]:
            return self.forward(input_ids, batch)
        size = self.sizes[bisect.bisect_left(self.sizes, bs)]
        self.ids[:bs].copy_(input_ids)
        self.positions[:bs].copy_(batch.positions)
        self.slots[:bs].copy_(batch.out_slots)
        self.rows[:bs].copy_(batch.req_rows)
        self.seq_lens[:bs].copy_(batch.seq_lens)
        if size > bs:  # earlier, larger batches left real rows and slots here
            self.slots[bs:size].fill_(self.pad_slot)
            self.rows[bs:size].fill_(self.pad_row)
            self.seq_lens[bs:size].fill_(1)
            self.positions[bs:size].zero_()
        if batch.group_sizes is not None and size in self.cascade_graphs:
            # Padding rows are in no group: zero their entries (a larger batch left some).
            self.group_sizes[:bs].copy_(batch.group_sizes)
            self.shared_lens[:bs].copy_(batch.shared_lens)
            self.group_sizes[bs:size].zero_()
            self.shared_lens[bs:size].zero_()
            self.cascade_graphs[size].replay()
            return self.cascade_outputs[size][:bs]
        self.graphs[size].replay()  # prefix groups (if any) are only a speed-up: ignoring them is exact
        return self.outputs[size][:bs]
