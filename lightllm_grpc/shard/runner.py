"""Runs the coordinator's steps: builds input tensors, runs the model, samples.

The runner owns the req_to_token table and each row's length and last sampled token,
so a decode entry needs only (row, slot) from the coordinator.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lightllm_grpc.layers.attention.base import KVCache
from lightllm_grpc.layers.forward_batch import ForwardBatch, ForwardMode
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.shard import decode_inputs
from lightllm_grpc.shard.cuda_graph import CudaGraphDecoder
from lightllm_grpc.shard.sampler import SampleOutput, Sampler

# (input_ids, batch) -> float32 logits [B, V]
ForwardFn = Callable[[torch.Tensor, ForwardBatch], torch.Tensor]


class ModelRunner:
    """Contract: rows are ``[0, max_rows)`` and slots ``[0, kv_capacity)``; one more row and
    one more slot exist past those, never handed out, for padding CUDA-graph batches."""

    def __init__(
        self,
        forward: ForwardFn,
        kv: KVCache,
        vocab_size: int,
        max_rows: int,
        max_context: int,
        device: torch.device,
        sampler: Sampler | None = None,
    ) -> None:
        self.forward = forward
        self.kv = kv
        self.device = device
        self.max_rows = max_rows
        self.max_context = max_context
        self.kv_capacity = kv.num_slots - 1
        self.pad_row, self.pad_slot = max_rows, kv.num_slots - 1
        self.req_to_token = torch.zeros((max_rows + 1, max_context), dtype=torch.int32, device=device)
        self.row_len = np.zeros(max_rows + 1, dtype=np.int64)
        self.last_token = torch.zeros(max_rows + 1, dtype=torch.int64, device=device)
        # A shard builds its sampler first, so the memory profile sees its tables.
        self.sampler = sampler or Sampler(max_rows + 1, vocab_size, device)
        self.consts = decode_inputs.DecodeConstants.make(max_rows + 1, device)
        # Decode steps that fit replay CUDA graphs when set (shard/cuda_graph.py); prefill and
        # mixed steps may be replaced by graph runners with the forward's signature
        # (shard/prefill_graph.py, shard/piecewise_graph.py), which run what they cannot replay
        # eagerly (or hand it to the next: a prefill graph gives what it cannot replay to the
        # piecewise graphs).
        self.decode_graphs: CudaGraphDecoder | None = None
        self.prefill_forward: ForwardFn = forward
        self.mixed_forward: ForwardFn = forward
        self._prompt_logprobs: torch.Tensor | None = None  # of the step being launched

    def reset(self) -> None:
        self.row_len[:] = 0
        for row in range(self.max_rows):
            self.sampler.release(row)

    def live_rows(self) -> int:
        """Rows holding a request's tokens (the padding row excepted)."""
        return int(np.count_nonzero(self.row_len[: self.max_rows]))

    def step(self, msg: shard_pb2.StepRequest) -> shard_pb2.StepResult:
        """Run a step to completion (warm-up, tests); serving uses ``launch`` and ``finish``."""
        return self.launch(msg).finish()

    @torch.inference_mode()
    def launch(self, msg: shard_pb2.StepRequest) -> PendingStep:
        """Queue the step's device work and the copy of its tokens; return without waiting.

        Host-side state (row lengths, sampler counters) is updated here, in launch order,
        so the next step can be launched before this one's tokens reach the host.
        """
        start = time.perf_counter()
        for row in msg.release_rows:
            self.row_len[row] = 0
            self.sampler.release(row)
        for s in msg.admit:
            self.sampler.admit(s)
        self._prompt_logprobs = None
        if msg.prefill.rows:  # with decode rows too: one forward pass over both (a mixed step)
            out = self._prefill(msg.prefill, msg.decode if msg.decode.rows else None)
        elif msg.decode.rows:
            out = self._decode(msg.decode)
        else:
            out = None
        step = PendingStep.start(msg.step_id, [out] if out is not None and out[0].size else [], start)
        lp = self._prompt_logprobs
        if lp is not None:
            step.prompt_logprobs = _to_host(lp, lp.is_cuda)
            if lp.is_cuda:  # finish() must also wait for this copy, queued after start's event
                step.event = torch.cuda.Event()
                step.event.record()
        return step

    def _prefill(
        self, p: shard_pb2.PrefillBatch, d: shard_pb2.DecodeBatch | None = None
    ) -> tuple[np.ndarray, SampleOutput]:
        """A prefill step or, with ``d``, a mixed step: the decode rows follow the prefill
        entries as one-token sequences in the same forward pass (MIXED), so every weight is
        read once per step, and all rows that sample share one sampler call (prefill entries
        that sample, then the decode rows: the order the coordinator expects)."""
        self._write_prefix(np.asarray(p.rows, dtype=np.int64), p)
        s = _Packed.build(p, d, self.row_len)
        if int(s.seq_lens.max()) > self.max_context:
            raise ValueError(f"sequence longer than the shard's max context {self.max_context}")
        ids, batch, dev_rows = self._upload(s, mixed=d is not None)
        pending = None
        if d is not None:
            input_ids = self.last_token[dev_rows[s.num_prefill :]]
            grammars = self.sampler.grammars
            # As in _decode: constrained rows' previous tokens leave before the forward is queued.
            pending = (
                grammars.pending(s.rows[s.num_prefill :], lambda: input_ids) if grammars is not None else None
            )
            ids[s.num_prefill_tokens :] = input_ids
        if s.want is not None and s.want.any():
            logits = self._forward_with_prompt_logprobs(ids, batch, p, s.want, s.offsets, s.lens)
        else:
            # A one-prompt prefill may replay a CUDA graph (prefill_graph.py); other prefills and
            # mixed steps may run piecewise graphs (piecewise_graph.py).
            logits = self.prefill_forward(ids, batch) if d is None else self.mixed_forward(ids, batch)
        if pending is not None:
            assert self.sampler.grammars is not None
            self.sampler.grammars.accept(pending)
        self.row_len[s.rows] = s.seq_lens
        if not s.sample.any():
            return s.rows[:0], SampleOutput(torch.empty(0, dtype=torch.int64), None, None, None)
        if s.sample.all():
            return self._sample(logits, s.rows, dev_rows)
        keep = torch.from_numpy(np.flatnonzero(s.sample)).to(self.device)
        return self._sample(logits.index_select(0, keep), s.rows[s.sample], dev_rows.index_select(0, keep))

    def _upload(self, s: _Packed, mixed: bool) -> tuple[torch.Tensor, ForwardBatch, torch.Tensor]:
        """One host-to-device copy of the packed step; writes its slots into req_to_token.
        Returns the token ids (decode rows' still 0), the batch and the rows (int64)."""
        t, b = s.positions.size, s.rows.size
        # Per-token rows of an even length, so each starts 16-byte aligned: Triton compiles a
        # kernel per pointer alignment (positions feed the rotary kernel).
        w = t + (t & 1)
        tokens = np.zeros((4, w), dtype=np.int64)
        tokens[:, :t] = (s.token_ids, s.positions, s.slots, np.repeat(s.rows, s.lens))
        host = np.concatenate(
            [tokens.ravel(), s.rows, s.seq_lens, s.offsets, s.lens, s.offsets + s.lens - 1, *s.groups],
            dtype=np.int64,
        )
        dev = torch.from_numpy(host).to(self.device, non_blocking=True)
        ids, pos, slots, tok_rows = dev[: 4 * w].view(4, w)[:, :t]
        self.req_to_token[tok_rows, pos] = slots.to(torch.int32)
        rows, seq_lens, offsets, lens, last = dev[4 * w : 4 * w + 5 * b].view(5, b)
        batch = ForwardBatch(
            mode=ForwardMode.MIXED if mixed else ForwardMode.PREFILL,
            positions=pos,
            out_slots=slots,
            req_rows=rows.to(torch.int32),
            seq_lens=seq_lens.to(torch.int32),
            q_starts=offsets.to(torch.int32),
            q_lens=lens.to(torch.int32),
            req_to_token=self.req_to_token,
            logits_indices=last,
            max_q_len=int(s.lens.max()),
            max_seq_len=int(s.seq_lens.max()),
            num_prefill=s.num_prefill if mixed else 0,
            num_prefill_tokens=s.num_prefill_tokens if mixed else 0,
        )
        if s.groups:
            shared, sizes = dev[4 * w + 5 * b :].to(torch.int32).view(2, -1)
            # A copy: a view b int32s in is 16-byte aligned only when 4 divides b, and Triton
            # compiles the cascade kernels once per alignment (a late compile under load).
            batch.shared_lens, batch.group_sizes = shared, sizes.clone()
        return ids, batch, rows

    def _forward_with_prompt_logprobs(
        self,
        ids: torch.Tensor,
        batch: ForwardBatch,
        p: shard_pb2.PrefillBatch,
        want: np.ndarray,
        offsets: np.ndarray,
        lens: np.ndarray,
    ) -> torch.Tensor:
        """Logits at every position of the entries in ``want`` (their prompt logprobs go to
        ``self._prompt_logprobs``) and at the last position of each entry (returned)."""
        counts = np.where(want, lens, 1)
        indices = np.concatenate(
            [np.arange(o, o + n) if w else [o + n - 1] for o, n, w in zip(offsets, lens, want)]
        ).astype(np.int64)
        batch.logits_indices = torch.from_numpy(indices).to(self.device)
        logits = self.forward(ids, batch)
        ends = torch.from_numpy(np.cumsum(counts) - 1).to(self.device)
        starts = np.cumsum(counts) - counts
        rows = np.concatenate([np.arange(s, s + n) for s, n, w in zip(starts, counts, want) if w])
        targets = torch.tensor(list(p.prompt_targets), dtype=torch.int64, device=self.device)
        if targets.numel() != rows.size:
            raise ValueError("prompt_targets must hold lens[i] ids for each entry asking prompt logprobs")
        logprobs = torch.log_softmax(logits[torch.from_numpy(rows).to(self.device)], dim=-1)
        picked = logprobs.gather(1, targets.clamp(min=0)[:, None])[:, 0]
        self._prompt_logprobs = torch.where(targets >= 0, picked, torch.full_like(picked, float("nan")))
        return logits.index_select(0, ends)

    def _write_prefix(self, rows: np.ndarray, p: shard_pb2.PrefillBatch) -> None:
        prefix_lens = np.asarray(p.prefix_lens, dtype=np.int64)
        if not prefix_lens.any():
            return
        cols = np.concatenate([np.arange(n) for n in prefix_lens])
        slots = torch.tensor(list(p.prefix_slots), dtype=torch.int32, device=self.device)
        self.req_to_token[np.repeat(rows, prefix_lens), cols] = slots

    def _decode(self, d: shard_pb2.DecodeBatch) -> tuple[np.ndarray, SampleOutput]:
        rows = np.asarray(d.rows, dtype=np.int64)
        positions = self.row_len[rows]
        if int(positions.max()) >= self.max_context:
            raise ValueError(f"sequence longer than the shard's max context {self.max_context}")
        slots = np.asarray(d.slots, dtype=np.int64)
        groups = _groups(d, rows.size)
        grammars = self.sampler.grammars
        # Constrained rows' previous tokens leave for the host before this forward is queued
        # (a decode graph overwrites them), so reading them waits for the previous step only.
        pending = (
            grammars.pending(rows, lambda: self.last_token[torch.from_numpy(rows).to(self.device)])
            if grammars is not None
            else None
        )
        graphs = self.decode_graphs
        tokens = None
        if graphs is not None and graphs.fits(rows.size):
            logits, tokens, dev_rows = graphs.run(rows, positions, slots, groups)
        else:
            logits, dev_rows = self._decode_eagerly(rows, positions, slots, groups)
        if pending is not None:
            assert grammars is not None
            grammars.accept(pending)
        self.row_len[rows] += 1
        if tokens is not None and self.sampler.plain_argmax(rows):
            self.sampler.record_argmax(rows)  # the graph stored the tokens as the rows' last ones
            return rows, SampleOutput(tokens, None, None, None)
        return self._sample(logits, rows, dev_rows)

    def _decode_eagerly(
        self, rows: np.ndarray, positions: np.ndarray, slots: np.ndarray, groups: list[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward of a decode batch that no graph takes: its logits and rows on the device."""
        b = rows.size
        host = decode_inputs.pack(rows, positions, slots, groups, b, self.pad_row, self.pad_slot)
        inputs = decode_inputs.DecodeInputs.view(torch.from_numpy(host).to(self.device, non_blocking=True), b)
        max_len = int(positions.max()) + 1
        ids, batch = decode_inputs.prepare(
            inputs, self.consts, self.req_to_token, self.last_token, max_len, bool(groups)
        )
        return self.forward(ids, batch), inputs.rows

    def _sample(
        self, logits: torch.Tensor, rows: np.ndarray, dev_rows: torch.Tensor
    ) -> tuple[np.ndarray, SampleOutput]:
        out = self.sampler.sample(logits, rows)
        self.last_token[dev_rows] = out.tokens
        return rows, out


@dataclass
class _Packed:
    """A prefill or mixed step's sequences on the host, packed as ``ForwardBatch`` packs them:
    the prefill entries, then any decode rows as one-token sequences (decode row r's token is
    at position ``row_len[r]``; its id is the row's last sampled token, on the device, so
    ``token_ids`` holds 0 there)."""

    rows: np.ndarray  # [B] int64
    starts: np.ndarray  # [B] int64: K/V tokens before each sequence's new ones
    lens: np.ndarray  # [B] int64: new tokens
    slots: np.ndarray  # [T] int64
    token_ids: np.ndarray  # [T] int64
    sample: np.ndarray  # [B] bool
    want: np.ndarray | None  # [B] bool: prompt logprobs asked (None: by no entry)
    groups: list[np.ndarray]  # decode rows' [shared_lens, group_sizes], or empty
    num_prefill: int
    num_prefill_tokens: int

    @classmethod
    def build(
        cls, p: shard_pb2.PrefillBatch, d: shard_pb2.DecodeBatch | None, row_len: np.ndarray
    ) -> _Packed:
        want = np.asarray(p.prompt_logprobs, dtype=bool) if len(p.prompt_logprobs) else None
        s = cls(
            rows=np.asarray(p.rows, dtype=np.int64),
            starts=np.asarray(p.starts, dtype=np.int64),
            lens=np.asarray(p.lens, dtype=np.int64),
            slots=np.asarray(p.slots, dtype=np.int64),
            token_ids=np.asarray(p.token_ids, dtype=np.int64),
            sample=np.asarray(p.sample, dtype=bool),
            want=want,
            groups=[],
            num_prefill=len(p.rows),
            num_prefill_tokens=len(p.token_ids),
        )
        if d is None:
            return s
        rows = np.asarray(d.rows, dtype=np.int64)
        n = rows.size
        s.rows = np.concatenate([s.rows, rows])
        s.starts = np.concatenate([s.starts, row_len[rows]])
        s.lens = np.concatenate([s.lens, np.ones(n, dtype=np.int64)])
        s.slots = np.concatenate([s.slots, np.asarray(d.slots, dtype=np.int64)])
        s.token_ids = np.concatenate([s.token_ids, np.zeros(n, dtype=np.int64)])
        s.sample = np.concatenate([s.sample, np.ones(n, dtype=bool)])
        if want is not None:
            s.want = np.concatenate([want, np.zeros(n, dtype=bool)])
        s.groups = _groups(d, n)
        return s

    @property
    def offsets(self) -> np.ndarray:
        return np.cumsum(self.lens) - self.lens

    @property
    def seq_lens(self) -> np.ndarray:
        return self.starts + self.lens

    @property
    def positions(self) -> np.ndarray:
        return np.repeat(self.starts - self.offsets, self.lens) + np.arange(self.token_ids.size)


def _groups(d: shard_pb2.DecodeBatch, n: int) -> list[np.ndarray]:
    """The decode rows' prefix groups as host arrays ``[shared_lens, group_sizes]``, or none."""
    if not d.group_sizes:
        return []
    if len(d.group_sizes) != n or len(d.shared_lens) != n:
        raise ValueError("decode prefix groups must be aligned with the rows")
    return [np.asarray(d.shared_lens, dtype=np.int64), np.asarray(d.group_sizes, dtype=np.int64)]


@dataclass
class PendingStep:
    """A launched step whose sampled tokens are on their way to host memory."""

    step_id: int
    rows: np.ndarray
    host: dict[str, torch.Tensor]
    top_k: int
    event: torch.cuda.Event | None
    started: float
    prompt_logprobs: torch.Tensor | None = None  # host copy, on its way when on GPU

    @classmethod
    def start(cls, step_id: int, outs: list[tuple[np.ndarray, SampleOutput]], started: float) -> PendingStep:
        if not outs:
            return cls(step_id, np.empty(0, dtype=np.int64), {}, 0, None, started)
        rows = np.concatenate([r for r, _ in outs])
        device = _gather(outs)
        top_k = int(device["top_ids"].shape[1]) if "top_ids" in device else 0
        on_gpu = device["tokens"].is_cuda
        host = {name: _to_host(t, on_gpu) for name, t in device.items()}
        event = None
        if on_gpu:
            event = torch.cuda.Event()
            event.record()
        return cls(step_id, rows, host, top_k, event, started)

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def finish(self) -> shard_pb2.StepResult:
        """Wait for this step's tokens (not for steps launched after it) and pack them."""
        if self.event is not None:
            self.event.synchronize()
        result = shard_pb2.StepResult(step_id=self.step_id, rows=self.rows.tolist())
        if self.host:
            result.token_ids.extend(self.host["tokens"].tolist())
        if "logprobs" in self.host:
            result.logprobs.extend(self.host["logprobs"].tolist())
        if self.top_k:
            result.top_k = self.top_k
            result.top_ids.extend(self.host["top_ids"].flatten().tolist())
            result.top_logprobs.extend(self.host["top_logprobs"].flatten().tolist())
        if self.prompt_logprobs is not None:
            result.prompt_logprobs.extend(self.prompt_logprobs.tolist())
        result.forward_seconds = time.perf_counter() - self.started
        return result


def _to_host(t: torch.Tensor, on_gpu: bool) -> torch.Tensor:
    if not on_gpu:
        return t
    # Pinned memory and a non-blocking copy: queued behind this step's kernels only, so
    # waiting for it does not wait for a step launched afterwards.
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def _gather(outs: list[tuple[np.ndarray, SampleOutput]]) -> dict[str, torch.Tensor]:
    samples = [s for _, s in outs]
    if len(samples) == 1 and samples[0].logprobs is None:  # the common step: nothing to concatenate
        return {"tokens": samples[0].tokens}
    device = {"tokens": torch.cat([s.tokens for s in samples])}
    if any(s.logprobs is not None for s in samples):
        device["logprobs"] = torch.cat(
            [
                s.logprobs if s.logprobs is not None else torch.zeros_like(s.tokens, dtype=torch.float32)
                for s in samples
            ]
        )
    k = max((s.top_ids.shape[1] for s in samples if s.top_ids is not None), default=0)
    if k:
        ids, lps = zip(*(_pad_top(s, k) for s in samples))
        device["top_ids"], device["top_logprobs"] = torch.cat(ids), torch.cat(lps)
    return device


def _pad_top(s: SampleOutput, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = s.tokens.shape[0]
    ids = torch.full((n, k), -1, dtype=torch.int64, device=s.tokens.device)
    lps = torch.full((n, k), float("-inf"), dtype=torch.float32, device=s.tokens.device)
    if s.top_ids is not None:
        ids[:, : s.top_ids.shape[1]] = s.top_ids
        lps[:, : s.top_logprobs.shape[1]] = s.top_logprobs
    return ids, lps
