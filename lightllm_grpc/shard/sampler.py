"""Per-row sampling on the shard: penalties, logit bias, temperature, top-k/top-p/min-p, seeded draws.

Every rank samples identically from identical logits, so tensor-parallel ranks agree on
each token without a broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from lightllm_grpc_kernels.sampling import filter_ref  # the kernel's reference: one definition

from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.shard import rng
from lightllm_grpc.shard.grammar import RowGrammars


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32
    top_ids: torch.Tensor | None  # [B, k] int64
    top_logprobs: torch.Tensor | None  # [B, k] float32


# Columns of Sampler.params, gathered per step into one [B, 8] float32 device tensor.
TEMPERATURE, TOP_K, TOP_P, MIN_P, REPETITION, PRESENCE, FREQUENCY = range(7)


@dataclass
class _Step:
    """Device copies of the per-row state of one ``sample`` call."""

    params: torch.Tensor  # [B, 8] float32, columns as above
    seeds: torch.Tensor  # [B] int64
    counters: torch.Tensor  # [B] int64: tokens the row generated so far
    rows: torch.Tensor  # [B] int64: state rows (of Sampler.counts)


def kernels_by_default(device: torch.device) -> bool:
    """The Triton path on CUDA (20x faster at 512 rows x 128k vocab, docs/sampling.md), torch elsewhere."""
    return device.type == "cuda"


class Sampler:
    """Per-row sampling state and the step's draw.

    Contract: ``admit`` a row before it is sampled, ``release`` it when its request leaves.
    Parameters live in host arrays gathered per step; token counts for the penalties live in
    one device table ``counts`` [max_rows, vocab] int32 allocated here, so a shard that builds
    its sampler before sizing the KV pool has it in its memory profile. ``kernels`` picks the
    Triton path (default: on CUDA); the torch path is the CPU implementation and both give the
    same tokens for the same seeds (docs/sampling.md).
    """

    def __init__(
        self,
        max_rows: int,
        vocab_size: int,
        device: torch.device,
        kernels: bool | None = None,
        grammars: RowGrammars | None = None,
    ) -> None:
        self.vocab = vocab_size
        self.grammars = grammars  # None: this shard refuses constrained rows
        self.device = device
        self.kernels = kernels_by_default(device) if kernels is None else kernels
        self.params = np.zeros((max_rows, 8), dtype=np.float32)
        self.seed = np.zeros(max_rows, dtype=np.int64)
        self.generated = np.zeros(max_rows, dtype=np.int64)
        self.want_logprobs = np.zeros(max_rows, dtype=bool)
        self.top_logprobs = np.zeros(max_rows, dtype=np.int64)
        self.penalized = np.zeros(max_rows, dtype=bool)
        # 2 * times generated + (1 if in the prompt): the repetition penalty reads "nonzero",
        # presence and frequency read the generated count. Rows are reset when admitted.
        self.counts = torch.zeros((max_rows, vocab_size), dtype=torch.int32, device=device)
        self.min_new = np.zeros(max_rows, dtype=np.int64)  # suppress ids while generated < this
        self.suppress: dict[int, np.ndarray] = {}
        self.bias: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # row -> (ids, values)
        self.has_bias = np.zeros(max_rows, dtype=bool)
        self._neg_inf = torch.tensor(float("-inf"), device=device)

    def admit(self, s: shard_pb2.RowSampling) -> None:
        row = s.row
        top_k = s.top_k if s.top_k > 0 else self.vocab
        self.params[row] = (s.temperature, top_k, s.top_p, s.min_p, s.repetition_penalty,
                            s.presence_penalty, s.frequency_penalty, 0.0)  # fmt: skip
        self.seed[row] = rng.to_int64_seed(s.seed)
        self.generated[row] = len(s.generated_ids)
        self.want_logprobs[row] = s.logprobs
        self.top_logprobs[row] = s.top_logprobs
        self.penalized[row] = s.repetition_penalty != 1.0 or bool(s.presence_penalty or s.frequency_penalty)
        if self.penalized[row]:
            self._reset_counts(row, s)
        self.min_new[row] = 0
        self.suppress.pop(row, None)
        if s.min_new_tokens > len(s.generated_ids) and s.suppress_ids:
            self.min_new[row] = s.min_new_tokens
            self.suppress[row] = np.asarray(s.suppress_ids, dtype=np.int64)
        self.has_bias[row] = bool(s.logit_bias_ids)
        self.bias.pop(row, None)
        if s.logit_bias_ids:
            ids = np.asarray(s.logit_bias_ids, dtype=np.int64)
            self.bias[row] = (ids, np.asarray(s.logit_bias_values, dtype=np.float32))
        if s.HasField("constraint"):
            if self.grammars is None:
                raise ValueError("this shard has no grammar support; constrained rows are refused")
            self.grammars.admit(row, s.constraint, list(s.generated_ids))

    def _reset_counts(self, row: int, s: shard_pb2.RowSampling) -> None:
        counts = self.counts[row]
        counts.zero_()
        if s.penalty_prompt_ids:
            prompt = torch.from_numpy(np.asarray(s.penalty_prompt_ids, dtype=np.int64))
            counts.index_fill_(0, prompt.to(self.device), 1)
        if s.generated_ids:
            gen = torch.from_numpy(np.asarray(s.generated_ids, dtype=np.int64)).to(self.device)
            counts.index_add_(0, gen, torch.full_like(gen, 2, dtype=torch.int32))

    def release(self, row: int) -> None:
        self.penalized[row] = False
        self.min_new[row] = 0
        self.has_bias[row] = False
        self.suppress.pop(row, None)
        self.bias.pop(row, None)
        if self.grammars is not None:
            self.grammars.release(row)

    def sample(self, logits: torch.Tensor, rows: np.ndarray) -> SampleOutput:
        """Sample one token per row from float32 ``logits`` [B, V]; rows index the per-row state.

        ``logits`` is modified in place (penalties, bias, suppression).
        """
        logprobs_raw = None
        k = int(self.top_logprobs[rows].max()) if rows.size else 0
        if self.want_logprobs[rows].any():
            logprobs_raw = torch.log_softmax(logits, dim=-1)
        penalized = self.penalized[rows]
        sampled = (self.params[rows, TEMPERATURE] > 0).any()
        step = self._step(rows) if sampled or penalized.any() else None
        logits = self._process(logits, rows, penalized, step)
        if not sampled:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._draw(logits, rows, step)
        self._record(rows, penalized, step, tokens)
        return _with_logprobs(tokens, logprobs_raw, k)

    def plain_argmax(self, rows: np.ndarray) -> bool:
        """Whether ``sample`` gives these rows their logits' argmax and nothing else: greedy, no
        penalty, bias, suppressed ids, constraint or logprobs (a decode graph's own argmax is
        then the step's tokens; see ``record_argmax``)."""
        if (self.params[rows, TEMPERATURE] > 0).any() or self.want_logprobs[rows].any():
            return False
        if self.penalized[rows].any() or self.has_bias[rows].any():
            return False
        if (self.generated[rows] < self.min_new[rows]).any():
            return False
        return self.grammars is None or not self.grammars.constrained(rows).size

    def record_argmax(self, rows: np.ndarray) -> None:
        """What ``sample`` records for rows that ``plain_argmax`` approved (one more generated
        token each), without sampling."""
        self.generated[rows] += 1

    def _step(self, rows: np.ndarray) -> _Step:
        params = torch.from_numpy(self.params[rows]).to(self.device, non_blocking=True)
        # One copy for the three: its rows an even number of int64s apart, so each starts 16-byte
        # aligned whatever the batch (Triton compiles a kernel per pointer alignment: an odd
        # batch's counters would otherwise compile one more sampling kernel mid-serving).
        b = len(rows)
        ints = np.zeros((3, b + (b & 1)), dtype=np.int64)
        ints[0, :b], ints[1, :b], ints[2, :b] = self.seed[rows], self.generated[rows], rows
        dev = torch.from_numpy(ints).to(self.device, non_blocking=True)
        seeds, counters, dev_rows = dev[:, :b].unbind(0)
        return _Step(params, seeds, counters, dev_rows)

    def _process(
        self, logits: torch.Tensor, rows: np.ndarray, penalized: np.ndarray, step: _Step | None
    ) -> torch.Tensor:
        if step is not None and penalized.any():
            if self.kernels:
                from lightllm_grpc_kernels.sampling import apply_penalties

                apply_penalties(logits, self.counts, step.rows, step.params[:, REPETITION:])
            else:
                sel = torch.from_numpy(np.flatnonzero(penalized)).to(self.device)
                p = step.params.index_select(0, sel)
                counts = self.counts.index_select(0, step.rows.index_select(0, sel))
                logits[sel] = _penalize(logits.index_select(0, sel), counts, p[:, REPETITION : FREQUENCY + 1])
        if self.bias:
            self._add_bias(logits, rows)
        grammars = self.grammars
        constrained = grammars.constrained(rows) if grammars is not None else np.empty(0, dtype=np.int64)
        if constrained.size:
            assert grammars is not None
            grammars.apply(logits, rows, constrained)
        if self.suppress:
            self._suppress(logits, rows, constrained)
        return logits

    def _add_bias(self, logits: torch.Tensor, rows: np.ndarray) -> None:
        sel = np.flatnonzero(self.has_bias[rows])
        if not sel.size:
            return
        parts = [self.bias[row] for row in rows[sel].tolist()]
        where = np.stack(
            [np.repeat(sel, [ids.size for ids, _ in parts]), np.concatenate([i for i, _ in parts])]
        )
        b, ids = torch.from_numpy(where).to(self.device, non_blocking=True).unbind(0)
        values = torch.from_numpy(np.concatenate([v for _, v in parts])).to(self.device, non_blocking=True)
        logits.index_put_((b, ids), values, accumulate=True)

    def _suppress(self, logits: torch.Tensor, rows: np.ndarray, constrained: np.ndarray) -> None:
        sel = np.flatnonzero(self.generated[rows] < self.min_new[rows])
        if not sel.size:
            return
        parts = [self.suppress[row] for row in rows[sel].tolist()]
        where = np.stack([np.repeat(sel, [ids.size for ids in parts]), np.concatenate(parts)])
        b, ids = torch.from_numpy(where).to(self.device, non_blocking=True).unbind(0)
        guarded = np.intersect1d(sel, constrained)
        if not guarded.size:
            logits.index_put_((b, ids), self._neg_inf)
            return
        # The constraint wins: a constrained row whose only allowed tokens are suppressed stop
        # tokens (its sentence is complete) keeps them. No host sync.
        g = torch.from_numpy(guarded).to(self.device)
        before = logits.index_select(0, g)
        logits.index_put_((b, ids), self._neg_inf)
        after = logits.index_select(0, g)
        logits[g] = torch.where(torch.isfinite(after).any(dim=1, keepdim=True), after, before)

    def _draw(self, logits: torch.Tensor, rows: np.ndarray, step: _Step) -> torch.Tensor:
        if self.kernels:
            from lightllm_grpc_kernels.sampling import sample

            return sample(logits, step.params, step.seeds, step.counters)
        params = self.params[rows]
        temp, top_k, top_p, min_p = step.params[:, :4].unbind(1)
        greedy = temp <= 0
        probs = torch.softmax(logits / torch.where(greedy, 1.0, temp)[:, None], dim=-1)
        if (
            (params[:, TOP_K] < self.vocab).any()
            or (params[:, TOP_P] < 1).any()
            or (params[:, MIN_P] > 0).any()
        ):
            probs = filter_ref(probs, top_k, top_p, min_p)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p exactly.
        race = probs / -torch.log(rng.uniform(step.seeds, step.counters, probs.shape[1]))
        return torch.where(greedy, logits.argmax(dim=-1), race.argmax(dim=-1))

    def _record(
        self, rows: np.ndarray, penalized: np.ndarray, step: _Step | None, tokens: torch.Tensor
    ) -> None:
        self.record_argmax(rows)  # the count every drawn token adds; penalized rows add more
        if step is None or not penalized.any():
            return
        add = torch.from_numpy(penalized.astype(np.int32) * 2).to(self.device, non_blocking=True)
        self.counts.index_put_((step.rows, tokens), add, accumulate=True)


def _penalize(logits: torch.Tensor, counts: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Repetition, presence and frequency penalties of rows ``logits`` [n, V] given their
    ``counts`` rows and ``params`` [n, 3] (the torch path; apply_penalties is the kernel)."""
    rep, presence, frequency = (c[:, None] for c in params.unbind(1))
    generated = (counts >> 1).float()
    scaled = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where((counts != 0) & (rep != 1), scaled, logits)
    return logits - frequency * generated - presence * (generated > 0).float()


def _with_logprobs(tokens: torch.Tensor, logprobs: torch.Tensor | None, k: int) -> SampleOutput:
    if logprobs is None:
        return SampleOutput(tokens, None, None, None)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    if k <= 0:
        return SampleOutput(tokens, chosen, None, None)
    top_lp, top_ids = logprobs.topk(k, dim=-1)
    return SampleOutput(tokens, chosen, top_ids, top_lp)
