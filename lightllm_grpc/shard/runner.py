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
        # Decode and prefill may be replaced by CUDA-graph runners with the same signature
        # (shard/cuda_graph.py, shard/prefill_graph.py), which run what they cannot replay eagerly.
        self.decode_forward: ForwardFn = forward
        self.prefill_forward: ForwardFn = forward
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
        outs: list[tuple[np.ndarray, SampleOutput]] = []
        self._prompt_logprobs = None
        if msg.prefill.rows:
            outs.append(self._prefill(msg.prefill))
        if msg.decode.rows:
            outs.append(self._decode(msg.decode))
        step = PendingStep.start(msg.step_id, [o for o in outs if o[0].size], start)
        lp = self._prompt_logprobs
        if lp is not None:
            step.prompt_logprobs = _to_host(lp, lp.is_cuda)
            if lp.is_cuda:  # finish() must also wait for this copy, queued after start's event
                step.event = torch.cuda.Event()
                step.event.record()
        return step

    def _prefill(self, p: shard_pb2.PrefillBatch) -> tuple[np.ndarray, SampleOutput]:
        rows = np.asarray(p.rows, dtype=np.int64)
        starts = np.asarray(p.starts, dtype=np.int64)
        lens = np.asarray(p.lens, dtype=np.int64)
        offsets = np.cumsum(lens) - lens
        positions = np.repeat(starts - offsets, lens) + np.arange(int(lens.sum()))
        self._write_prefix(rows, p)
        seq_lens = starts + lens
        if int(seq_lens.max()) > self.max_context:
            raise ValueError(f"sequence longer than the shard's max context {self.max_context}")
        host = np.concatenate(
            [
                p.token_ids,
                positions,
                p.slots,
                np.repeat(rows, lens),
                rows,
                seq_lens,
                offsets,
                lens,
                offsets + lens - 1,
            ]
        ).astype(np.int64)
        dev = torch.from_numpy(host).to(self.device, non_blocking=True)
        t, b = positions.size, rows.size
        ids, pos, slots, tok_rows = dev[: 4 * t].view(4, t)
        self.req_to_token[tok_rows, pos] = slots.to(torch.int32)
        b_rows, b_seq, b_off, b_len, b_last = dev[4 * t :].view(5, b)
        batch = ForwardBatch(
            mode=ForwardMode.PREFILL,
            positions=pos,
            out_slots=slots,
            req_rows=b_rows.to(torch.int32),
            seq_lens=b_seq.to(torch.int32),
            q_starts=b_off.to(torch.int32),
            q_lens=b_len.to(torch.int32),
            req_to_token=self.req_to_token,
            logits_indices=b_last,
            max_q_len=int(lens.max()),
            max_seq_len=int(seq_lens.max()),
        )
        want = np.asarray(p.prompt_logprobs, dtype=bool) if len(p.prompt_logprobs) else None
        if want is not None and want.any():
            logits = self._forward_with_prompt_logprobs(ids, batch, p, want, offsets, lens)
        else:
            logits = self.prefill_forward(ids, batch)
        self.row_len[rows] = seq_lens
        sample = np.asarray(p.sample, dtype=bool)
        if not sample.any():
            return rows[:0], SampleOutput(torch.empty(0, dtype=torch.int64), None, None, None)
        if sample.all():
            return self._sample(logits, rows, b_rows)
        keep = torch.from_numpy(np.flatnonzero(sample)).to(self.device)
        return self._sample(logits.index_select(0, keep), rows[sample], b_rows.index_select(0, keep))

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
        b = rows.size
        host = np.concatenate([rows, positions, d.slots, positions + 1]).astype(np.int64)
        dev = torch.from_numpy(host).to(self.device, non_blocking=True)
        d_rows, d_pos, d_slots, d_seq = dev.view(4, b)
        self.req_to_token[d_rows, d_pos] = d_slots.to(torch.int32)
        arange = torch.arange(b, device=self.device)
        batch = ForwardBatch(
            mode=ForwardMode.DECODE,
            positions=d_pos,
            out_slots=d_slots,
            req_rows=d_rows.to(torch.int32),
            seq_lens=d_seq.to(torch.int32),
            q_starts=arange.to(torch.int32),
            q_lens=torch.ones(b, dtype=torch.int32, device=self.device),
            req_to_token=self.req_to_token,
            logits_indices=arange,
            max_q_len=1,
            max_seq_len=int(positions.max()) + 1,
        )
        if d.group_sizes:
            if len(d.group_sizes) != b or len(d.shared_lens) != b:
                raise ValueError("decode prefix groups must be aligned with the rows")
            groups = torch.tensor(np.stack([d.shared_lens, d.group_sizes]), dtype=torch.int32)
            batch.shared_lens, batch.group_sizes = groups.to(self.device, non_blocking=True).unbind(0)
        grammars = self.sampler.grammars
        # Constrained rows' previous tokens leave for the host before this forward is queued,
        # so reading them below waits for the previous step only, not for this forward.
        input_ids = self.last_token[d_rows]
        pending = grammars.pending(rows, input_ids) if grammars is not None else None
        logits = self.decode_forward(input_ids, batch)
        if pending is not None:
            assert grammars is not None
            grammars.accept(pending)
        self.row_len[rows] += 1
        return self._sample(logits, rows, d_rows)

    def _sample(
        self, logits: torch.Tensor, rows: np.ndarray, dev_rows: torch.Tensor
    ) -> tuple[np.ndarray, SampleOutput]:
        out = self.sampler.sample(logits, rows)
        self.last_token[dev_rows] = out.tokens
        return rows, out


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
