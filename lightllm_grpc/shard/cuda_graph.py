"""CUDA-graph decode: one captured graph per batch size, replayed with padded inputs.

At batch 1 a decode step is hundreds of small kernels; launching them one by one costs
milliseconds of CPU time per token. Replaying a captured graph launches them all at once.
Graphs are captured from the largest batch down, sharing one memory pool (which the prefill
graphs of shard/prefill_graph.py then share too); a batch is padded up to the next captured
size with a dummy row whose K/V goes to a dummy slot. The step's inputs come packed in one
copy (shard/decode_inputs.py) and the graph unpacks them, so the launches left around a replay
are that copy and the tokens' copy back (there were ~18 small launches; the change saved
~0.04 ms of a 2.9-4.3 ms batch-1 step, BENCHMARKS.md).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from lightllm_grpc_kernels import RELEASE_POLICIES, forced_release, programmatic_launch

from lightllm_grpc.layers.forward_batch import ForwardBatch
from lightllm_grpc.shard import decode_inputs

log = logging.getLogger(__name__)


# Batches this large also get a graph with cascade attention (prefix groups): smaller ones
# gain too little from reading a shared prefix once to pay for a second capture.
CASCADE_MIN_BATCH = 64


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 12, 16, 24, 32, *range(48, 257, 16), *range(288, 1025, 32)]
    return [s for s in sizes if s <= max_batch] or [1]


# Graphs of at most this many rows also take the argmax of their logits and store it as each
# row's last token: an all-greedy step (batch 1 above all) then needs no launch after the
# replay but the tokens' copy to the host. Larger graphs leave that to the sampler (an
# argmax over 32 x 128k fp32 logits is ~6 µs, wasted when the step samples).
GREEDY_IN_GRAPH_MAX = 32

# Graphs of at most this many rows launch their Triton kernels with programmatic dependent
# launch (Hopper): each is scheduled while the one before drains. Measured on an H100, the
# shard's decode loop, same machine (BENCHMARKS.md): batch 1 and 8 0.6-1.6% faster (FP8 and
# bf16); batch 32 and 64, whose GEMMs are cuBLAS kernels between ours, 0.05-0.6% slower.
PDL_MAX_BATCH = 8


# Replays timed per release policy when a graph of up to PDL_MAX_BATCH rows is captured with
# each (after TIMING_WARMUP untimed ones): 3 x 23 replays, ~0.3 s of warm-up per size for 8B.
TIMING_REPLAYS, TIMING_WARMUP = 20, 3


def _launches(bs: int, release: str = "wait") -> contextlib.AbstractContextManager[None]:
    """How the graph of ``bs`` rows launches its kernels: programmatic dependent launch up to
    ``PDL_MAX_BATCH`` rows, with ``release`` as the policy for scheduling each kernel's successor."""
    return programmatic_launch(release) if bs <= PDL_MAX_BATCH else contextlib.nullcontext()


def release_candidates(bs: int) -> tuple[str, ...]:
    """The release policies the graph of ``bs`` rows is captured with: every one up to
    ``PDL_MAX_BATCH`` rows; above it the graph launches without PDL and one capture does.
    Not the environment's to change: under TP every rank must capture and replay as many graphs
    as the others, or their collectives stop pairing up (a shard started by hand on another
    host may have another ``LIGHTLLM_GRPC_PDL``); ``choose_release`` applies a forced policy."""
    return RELEASE_POLICIES if bs <= PDL_MAX_BATCH else ("wait",)


def choose_release(times: dict[str, float]) -> str:
    """The policy to keep: the one ``LIGHTLLM_GRPC_PDL`` forces, else the one of least time
    (ms per replay; on a tie the first)."""
    return forced_release() or min(times, key=times.__getitem__)


def replay_ms(
    graph: torch.cuda.CUDAGraph, replays: int = TIMING_REPLAYS, warmup: int = TIMING_WARMUP
) -> float:
    """Mean GPU time of a replay of ``graph`` over ``replays`` back to back, after ``warmup``
    untimed ones. Under TP every rank must replay the same graphs as often (the collectives in
    them pair up)."""
    for _ in range(warmup):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


class _EagerReplay:
    """Stands in for a CUDA graph where there is none (CPU tests): replay runs the captured step."""

    def __init__(self, step: Callable[[], torch.Tensor]) -> None:
        self.step = step

    def replay(self) -> None:
        self.step()


class CudaGraphDecoder:
    """Decode steps of up to ``sizes[-1]`` rows as replays of captured graphs.

    A step's inputs arrive packed (shard/decode_inputs.py) in one host-to-device copy; the
    graph writes their slots into req_to_token, gathers each row's last token from
    ``last_token``, runs the forward and, up to ``GREEDY_IN_GRAPH_MAX`` rows, takes the
    argmax and stores it into ``last_token``. ``pad_row`` is a req_to_token row and
    ``pad_slot`` a KV slot that no request ever uses; padded entries attend over that row
    (length 1) and write to that slot. ``cuda_graphs=False`` runs the same steps eagerly.
    """

    def __init__(
        self,
        forward,
        req_to_token: torch.Tensor,
        last_token: torch.Tensor,
        pad_row: int,
        pad_slot: int,
        max_batch: int,
        device: torch.device | str,
        cuda_graphs: bool = True,
    ) -> None:
        self.forward = forward
        self.req_to_token = req_to_token
        self.last_token = last_token
        self.pad_row, self.pad_slot = pad_row, pad_slot
        self.sizes = graph_batch_sizes(max_batch)
        self.cuda_graphs = cuda_graphs
        n = self.sizes[-1]
        self.packed = torch.zeros(decode_inputs.buffer_size(n), dtype=torch.int64, device=device)
        self.consts = decode_inputs.DecodeConstants.make(n, device)
        self.tokens = torch.zeros(n, dtype=torch.int64, device=device)
        self.inputs = {bs: decode_inputs.DecodeInputs.view(self.packed, bs) for bs in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph | _EagerReplay] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.cascade_graphs: dict[int, torch.cuda.CUDAGraph | _EagerReplay] = {}
        self.cascade_outputs: dict[int, torch.Tensor] = {}
        self.logits: torch.Tensor | None = None  # [max batch, vocab] fp32: every graph's output
        self.pool = None  # the graphs' memory pool, once captured
        # Each PDL graph's release policy and the replay times that chose it (ms per policy).
        self.release: dict[int, str] = {}
        self.release_times: dict[int, dict[str, float]] = {}

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def _step(self, bs: int, cascade: bool) -> Callable[[], torch.Tensor]:
        """What the graph of ``bs`` rows runs: inputs, forward and (small graphs) argmax."""
        inputs = self.inputs[bs]

        def step() -> torch.Tensor:
            assert self.logits is not None
            logits = self.forward(*self._prepare(bs, cascade), logits_out=self.logits[:bs])
            if bs <= GREEDY_IN_GRAPH_MAX:
                torch.argmax(logits, dim=-1, out=self.tokens[:bs])
                self.last_token[inputs.rows] = self.tokens[:bs]
            return logits

        return step

    def _prepare(self, bs: int, cascade: bool) -> tuple[torch.Tensor, ForwardBatch]:
        max_len = self.req_to_token.shape[1]
        return decode_inputs.prepare(
            self.inputs[bs], self.consts, self.req_to_token, self.last_token, max_len, cascade
        )

    def _pad(self, bs: int) -> None:
        """Fill the inputs of the graph of ``bs`` rows with padding (what capture runs on): the
        layout depends on the size, so each size needs its own before its first run."""
        empty = np.empty(0, dtype=np.int64)
        host = decode_inputs.pack(empty, empty, empty, [], bs, self.pad_row, self.pad_slot)
        self.packed[: host.size].copy_(torch.from_numpy(host))

    def _start(self) -> None:
        """The logits buffer, sized by a probe forward of one padding row."""
        self._pad(1)
        vocab = self.forward(*self._prepare(1, False)).shape[-1]
        self.logits = torch.empty(self.sizes[-1], vocab, dtype=torch.float32, device=self.packed.device)

    @torch.inference_mode()
    def capture(self) -> None:
        if not self.cuda_graphs:
            return self._capture_eager()
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        # Every graph writes its logits into one shared buffer: were each graph's output its own
        # tensor in the pool, the outputs would add up (sum of the sizes x vocab x 4 bytes:
        # 5.4 GiB at 512 rows, an out-of-memory at 1,024 on a 141 GB card).
        self._start()
        self.pool = None
        stream = torch.cuda.Stream()
        for bs, cascade, step in self._captures():
            candidates = release_candidates(bs)
            graphs = {release: self._capture_one(bs, step, release, stream) for release in candidates}
            chosen = candidates[0]
            if len(candidates) > 1:
                self.release_times[bs] = {r: replay_ms(g) for r, (g, _) in graphs.items()}
                chosen = self.release[bs] = choose_release(self.release_times[bs])
            self._keep(bs, cascade, *graphs[chosen])
        torch.cuda.synchronize()
        log.info(
            "captured %d decode graphs (batch 1..%d) and %d with cascade attention in %.1fs, "
            "%.0f MiB of GPU memory; PDL release policy per batch: %s",
            len(self.sizes),
            self.sizes[-1],
            len(self.cascade_graphs),
            time.perf_counter() - start,
            (free_before - torch.cuda.mem_get_info()[0]) / 2**20,
            self._describe_release(),
        )

    def _capture_one(
        self, bs: int, step: Callable[[], torch.Tensor], release: str, stream: torch.cuda.Stream
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """One graph of ``step``, captured on ``stream`` into the shared pool."""
        # The side stream runs after the padding's copy, the probe forward and any replay before:
        # under TP, two forwards in flight at once would interleave their collectives (the
        # barrier-free all-reduce counts its calls).
        stream.wait_stream(torch.cuda.current_stream())
        with _launches(bs, release):
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile kernels and settle the allocator first
                    step()
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                output = step()
        self.pool = graph.pool()
        return graph, output

    def _describe_release(self) -> str:
        parts = [
            f"{bs}: {release} ("
            + ", ".join(f"{r} {ms:.3f}" for r, ms in self.release_times[bs].items())
            + " ms)"
            for bs, release in sorted(self.release.items())
        ]
        return "; ".join(parts) or f"none (no graph of up to {PDL_MAX_BATCH} rows)"

    def _capture_eager(self) -> None:
        self._start()
        for bs, cascade, step in self._captures():
            with _launches(bs):  # as captured (no launch attribute on CPU)
                output = step()
            self._keep(bs, cascade, _EagerReplay(step), output)

    def _captures(self) -> Iterator[tuple[int, bool, Callable[[], torch.Tensor]]]:
        """Each graph to capture, largest first, its inputs padding when it comes."""
        for bs in reversed(self.sizes):
            for cascade in (True, False) if bs >= CASCADE_MIN_BATCH else (False,):
                self._pad(bs)
                yield bs, cascade, self._step(bs, cascade)

    def _keep(self, bs: int, cascade: bool, graph, output: torch.Tensor) -> None:
        graphs, outputs = (
            (self.cascade_graphs, self.cascade_outputs) if cascade else (self.graphs, self.outputs)
        )
        graphs[bs], outputs[bs] = graph, output

    def run(
        self, rows: np.ndarray, positions: np.ndarray, slots: np.ndarray, groups: list[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Replay the step of ``rows`` (``fits`` their number) whose new tokens sit at
        ``positions`` in ``slots``: their logits, their argmax (already stored as their last
        tokens; None from graphs over ``GREEDY_IN_GRAPH_MAX`` rows) and their rows on the device."""
        bs = rows.size
        size = self.sizes[bisect.bisect_left(self.sizes, bs)]
        # Prefix groups only speed attention up: a graph without cascade attention ignores them exactly.
        cascade = bool(groups) and size in self.cascade_graphs
        host = decode_inputs.pack(
            rows, positions, slots, groups if cascade else [], size, self.pad_row, self.pad_slot
        )
        self.packed[: host.size].copy_(torch.from_numpy(host), non_blocking=True)
        if cascade:
            self.cascade_graphs[size].replay()
            logits = self.cascade_outputs[size][:bs]
        else:
            self.graphs[size].replay()
            logits = self.outputs[size][:bs]
        tokens = self.tokens[:bs] if size <= GREEDY_IN_GRAPH_MAX else None
        return logits, tokens, self.inputs[size].rows[:bs]
