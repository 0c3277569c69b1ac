"""Per-row sampling on the shard: penalties, logit bias, temperature, top-k/top-p/min-p, seeded draws.

Every rank samples identically from identical logits, so tensor-parallel ranks agree on
each token without a broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.shard import rng
from lightllm_grpc.shard.grammar import RowGrammars


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32
    top_ids: torch.Tensor | None  # [B, k] int64
    top_logprobs: torch.Tensor | None  # [B, k] float32


@dataclass
class _Penalty:
    repetition: float
    presence: float
    frequency: float
    seen: torch.Tensor  # [V] bool: in the prompt or generated
    counts: torch.Tensor  # [V] float32: times generated


class Sampler:
    def __init__(
        self, max_rows: int, vocab_size: int, device: torch.device, grammars: RowGrammars | None = None
    ) -> None:
        self.vocab = vocab_size
        self.grammars = grammars  # None: this shard refuses constrained rows
        self.device = device
        # Host mirrors of per-row parameters; gathered per step into one small tensor.
        self.params = np.zeros((max_rows, 4), dtype=np.float32)  # temperature, top_k, top_p, min_p
        self.seed = np.zeros(max_rows, dtype=np.int64)
        self.generated = np.zeros(max_rows, dtype=np.int64)
        self.want_logprobs = np.zeros(max_rows, dtype=bool)
        self.top_logprobs = np.zeros(max_rows, dtype=np.int64)
        self.penalties: dict[int, _Penalty] = {}
        self.suppress: dict[int, tuple[int, torch.Tensor]] = {}
        self.bias: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # row -> (ids, values)

    def admit(self, s: shard_pb2.RowSampling) -> None:
        row = s.row
        self.params[row] = (s.temperature, s.top_k if s.top_k > 0 else self.vocab, s.top_p, s.min_p)
        self.seed[row] = rng.to_int64_seed(s.seed)
        self.generated[row] = len(s.generated_ids)
        self.want_logprobs[row] = s.logprobs
        self.top_logprobs[row] = s.top_logprobs
        if s.repetition_penalty != 1.0 or s.presence_penalty or s.frequency_penalty:
            self.penalties[row] = self._penalty(s)
        if s.min_new_tokens > len(s.generated_ids) and s.suppress_ids:
            ids = torch.tensor(list(s.suppress_ids), dtype=torch.int64, device=self.device)
            self.suppress[row] = (s.min_new_tokens, ids)
        if s.logit_bias_ids:
            ids = torch.tensor(list(s.logit_bias_ids), dtype=torch.int64, device=self.device)
            values = torch.tensor(list(s.logit_bias_values), dtype=torch.float32, device=self.device)
            self.bias[row] = (ids, values)
        if s.HasField("constraint"):
            if self.grammars is None:
                raise ValueError("this shard has no grammar support; constrained rows are refused")
            self.grammars.admit(row, s.constraint, list(s.generated_ids))

    def _penalty(self, s: shard_pb2.RowSampling) -> _Penalty:
        seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
        counts = torch.zeros(self.vocab, dtype=torch.float32, device=self.device)
        prompt = torch.tensor(list(s.penalty_prompt_ids), dtype=torch.int64, device=self.device)
        gen = torch.tensor(list(s.generated_ids), dtype=torch.int64, device=self.device)
        seen[prompt] = True
        seen[gen] = True
        counts.index_add_(0, gen, torch.ones_like(gen, dtype=torch.float32))
        return _Penalty(s.repetition_penalty, s.presence_penalty, s.frequency_penalty, seen, counts)

    def release(self, row: int) -> None:
        self.penalties.pop(row, None)
        self.suppress.pop(row, None)
        self.bias.pop(row, None)
        if self.grammars is not None:
            self.grammars.release(row)

    def sample(self, logits: torch.Tensor, rows: np.ndarray) -> SampleOutput:
        """Sample one token per row from float32 ``logits`` [B, V]; rows index the per-row state."""
        logprobs_raw = None
        k = int(self.top_logprobs[rows].max()) if rows.size else 0
        if self.want_logprobs[rows].any():
            logprobs_raw = torch.log_softmax(logits, dim=-1)
        logits = self._process(logits, rows)
        params = self.params[rows]
        if not (params[:, 0] > 0).any():
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._draw(logits, rows, params)
        self._record(rows, tokens)
        return _with_logprobs(tokens, logprobs_raw, k)

    def _process(self, logits: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Penalties and logit bias, then the constraint's mask, then min_new_tokens suppression."""
        grammars = self.grammars
        constrained = grammars.constrained(rows) if grammars is not None else np.empty(0, dtype=np.int64)
        if not (self.penalties or self.suppress or self.bias or constrained.size):
            return logits  # the common case: no per-row Python
        if self.penalties or self.bias:
            for i, row in enumerate(rows.tolist()):
                pen = self.penalties.get(row)
                if pen is not None:
                    logits[i] = _apply_penalty(logits[i], pen)
                bias = self.bias.get(row)
                if bias is not None:
                    logits[i].index_add_(0, bias[0], bias[1])
        if constrained.size:
            assert grammars is not None
            grammars.apply(logits, rows, constrained)
        if self.suppress:
            self._suppress(logits, rows, set(rows[constrained].tolist()))
        return logits

    def _suppress(self, logits: torch.Tensor, rows: np.ndarray, constrained: set[int]) -> None:
        for i, row in enumerate(rows.tolist()):
            sup = self.suppress.get(row)
            if sup is None or self.generated[row] >= sup[0]:
                continue
            if row not in constrained:
                logits[i, sup[1]] = float("-inf")
                continue
            # The constraint wins: when it allows only stop tokens, they stay (no host sync).
            kept = logits[i].index_fill(0, sup[1], float("-inf"))
            logits[i] = torch.where(torch.isfinite(kept).any(), kept, logits[i])

    def _draw(self, logits: torch.Tensor, rows: np.ndarray, params: np.ndarray) -> torch.Tensor:
        p = torch.from_numpy(params).to(self.device, non_blocking=True)
        temp, top_k, top_p, min_p = p.unbind(1)
        greedy = temp <= 0
        probs = torch.softmax(logits / torch.where(greedy, 1.0, temp)[:, None], dim=-1)
        if (params[:, 1] < self.vocab).any() or (params[:, 2] < 1).any() or (params[:, 3] > 0).any():
            probs = _filter(probs, top_k, top_p, min_p)
        seeds = torch.from_numpy(self.seed[rows]).to(self.device, non_blocking=True)
        counters = torch.from_numpy(self.generated[rows]).to(self.device, non_blocking=True)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p exactly.
        race = probs / -torch.log(rng.uniform(seeds, counters, probs.shape[1]))
        return torch.where(greedy, logits.argmax(dim=-1), race.argmax(dim=-1))

    def _record(self, rows: np.ndarray, tokens: torch.Tensor) -> None:
        self.generated[rows] += 1
        if not self.penalties:
            return
        for i, row in enumerate(rows.tolist()):
            pen = self.penalties.get(row)
            if pen is not None:
                tok = tokens[i : i + 1]
                pen.seen[tok] = True
                pen.counts[tok] += 1.0


def _apply_penalty(logits: torch.Tensor, pen: _Penalty) -> torch.Tensor:
    if pen.repetition != 1.0:
        scaled = torch.where(logits > 0, logits / pen.repetition, logits * pen.repetition)
        logits = torch.where(pen.seen, scaled, logits)
    if pen.presence or pen.frequency:
        logits = logits - pen.frequency * pen.counts - pen.presence * (pen.counts > 0).float()
    return logits


def _filter(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    sorted_p, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[1], device=probs.device)[None, :]
    drop = rank >= top_k[:, None]
    # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
    drop |= (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p[:, None]
    drop |= sorted_p < (min_p * sorted_p[:, 0])[:, None]
    drop[:, 0] = False
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_p)


def _with_logprobs(tokens: torch.Tensor, logprobs: torch.Tensor | None, k: int) -> SampleOutput:
    if logprobs is None:
        return SampleOutput(tokens, None, None, None)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    if k <= 0:
        return SampleOutput(tokens, chosen, None, None)
    top_lp, top_ids = logprobs.topk(k, dim=-1)
    return SampleOutput(tokens, chosen, top_ids, top_lp)
