"""Mixed-step parity: two ``ModelRunner``s on one tiny model and the same script of steps, one
running each step as sent (a step with prefill and decode rows is one MIXED forward), the
other running such a step as two steps, its prefill part and then its decode part (what the
runner did before mixed forwards). Everything a caller can see must agree: sampled tokens,
their logprobs and top logprobs, prompt logprobs, and the logits of every sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lightllm_grpc.layers.forward_batch import ForwardBatch, ForwardMode
from lightllm_grpc.layers.ops import Ops
from lightllm_grpc.models.config import ModelConfig
from lightllm_grpc.models.loader import load_model
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.shard.runner import ModelRunner

MAX_ROWS, MAX_CONTEXT, NUM_SLOTS = 8, 64, 256
CPU = torch.device("cpu")


@dataclass
class Recorded:
    """A runner whose forward keeps a copy of each call's logits and batch mode."""

    runner: ModelRunner
    logits: list[torch.Tensor] = field(default_factory=list)
    modes: list[ForwardMode] = field(default_factory=list)


def make_runners(model_dir: Path, ops: Ops, grammars: object | None = None) -> tuple[Recorded, Recorded]:
    """Two runners, each with its own KV pool, on one fp32 CPU model built with ``ops``."""
    cfg = ModelConfig.from_pretrained(model_dir)
    backend = ops.attention(MAX_ROWS + 1, cfg.num_heads, cfg.head_dim, CPU, torch.float32)
    model = load_model(model_dir, device=CPU, dtype="float32", attn_backend=backend, ops=ops)
    out = []
    for _ in range(2):
        kv = model.kv_cache_spec.make_cache(NUM_SLOTS + 1, torch.float32, CPU)
        logits: list[torch.Tensor] = []
        modes: list[ForwardMode] = []

        def forward(
            ids: torch.Tensor,
            batch: ForwardBatch,
            logits_out: torch.Tensor | None = None,
            kv=kv,
            logits=logits,
            modes=modes,
        ) -> torch.Tensor:
            out = model(ids, batch, kv, logits_out)
            logits.append(out.clone())  # the sampler edits logits in place
            modes.append(batch.mode)
            return out

        runner = ModelRunner(forward, kv, cfg.vocab_size, MAX_ROWS, MAX_CONTEXT, CPU)
        runner.sampler.grammars = grammars  # type: ignore[assignment]
        out.append(Recorded(runner, logits, modes))
    return out[0], out[1]


def row(row: int, **options: object) -> shard_pb2.RowSampling:
    """A row's sampling: greedy and every filter off unless ``options`` say otherwise."""
    base: dict[str, object] = {"top_k": -1, "top_p": 1.0, "repetition_penalty": 1.0}
    return shard_pb2.RowSampling(row=row, **{**base, **options})


@dataclass
class Script:
    """Builds steps with explicit slots, as the coordinator does; remembers each row's slots."""

    next_slot: int = 0
    slots: dict[int, list[int]] = field(default_factory=dict)
    step_id: int = 0

    def new(self, *admit: shard_pb2.RowSampling, release: tuple[int, ...] = ()) -> shard_pb2.StepRequest:
        self.step_id += 1
        for r in release:
            self.slots.pop(r, None)
        return shard_pb2.StepRequest(step_id=self.step_id, admit=admit, release_rows=release)

    def _take(self, n: int) -> list[int]:
        # Scattered, descending slot ids: the pool never matches positions by accident.
        taken = [NUM_SLOTS - 1 - self.next_slot - i for i in range(n)]
        self.next_slot += n
        return taken

    def prefill(
        self,
        msg: shard_pb2.StepRequest,
        r: int,
        tokens: list[int],
        *,
        sample: bool = True,
        prefix_from: tuple[int, int] | None = None,
        prompt_targets: list[int] | None = None,
    ) -> None:
        """Add row ``r``'s next chunk ``tokens``; ``prefix_from=(row, n)`` first shares that row's
        first n slots (a prefix-cache hit); ``prompt_targets`` asks prompt logprobs."""
        p = msg.prefill
        own = self.slots.setdefault(r, [])
        prefix: list[int] = []
        if prefix_from is not None:
            prefix = self.slots[prefix_from[0]][: prefix_from[1]]
            own.extend(prefix)
        new = self._take(len(tokens))
        p.rows.append(r)
        p.starts.append(len(own))
        p.lens.append(len(tokens))
        p.token_ids.extend(tokens)
        p.slots.extend(new)
        p.prefix_lens.append(len(prefix))
        p.prefix_slots.extend(prefix)
        p.sample.append(sample)
        p.prompt_logprobs.append(prompt_targets is not None)
        p.prompt_targets.extend(prompt_targets or [])
        own.extend(new)

    def decode(
        self, msg: shard_pb2.StepRequest, rows: list[int], groups: list[tuple[int, int]] | None = None
    ) -> None:
        """Add decode entries; ``groups`` gives each row's (shared_len, group_size) when set."""
        d = msg.decode
        for r in rows:
            (slot,) = self._take(1)
            self.slots[r].append(slot)
            d.rows.append(r)
            d.slots.append(slot)
        if groups is not None:
            d.shared_lens.extend(s for s, _ in groups)
            d.group_sizes.extend(g for _, g in groups)


def scenario(vocab: int) -> Iterator[shard_pb2.StepRequest]:
    """Prefill, decode, then mixed steps covering: a chunk continuation, a cached prefix, a
    chunk that does not sample, prompt logprobs, decode rows of different lengths, a decode
    prefix group, a released row, and a mixed step in which no prefill entry samples."""
    gen = np.random.default_rng(7)

    def prompt(n: int) -> list[int]:
        return gen.integers(3, vocab, n).tolist()

    p0, p1, p2, p4, p5, p6 = prompt(12), prompt(5), prompt(13), prompt(9), prompt(6), prompt(7)
    p3 = p0[:5] + prompt(4)
    s = Script()
    msg = s.new(row(0, logprobs=True, top_logprobs=2), row(1, temperature=0.8, top_k=50, seed=11), row(2))
    s.prefill(msg, 0, p0)
    s.prefill(msg, 1, p1)
    s.prefill(msg, 2, p2[:6], sample=False)
    yield msg
    msg = s.new()
    s.decode(msg, [0, 1])
    yield msg
    msg = s.new(
        row(3, temperature=1.0, top_p=0.9, seed=5, logprobs=True),
        row(4),
        row(5, logprobs=True, top_logprobs=3),
    )
    s.prefill(msg, 2, p2[6:])  # the prompt's last chunk
    s.prefill(msg, 3, p3[5:], prefix_from=(0, 5))  # a cache hit on row 0's first 5 tokens
    s.prefill(msg, 4, p4[:5], sample=False)
    s.prefill(msg, 5, p5, prompt_targets=[*p5[1:], -1])
    s.decode(msg, [0, 1])  # contexts of 14 and 7 tokens
    yield msg
    msg = s.new()
    s.prefill(msg, 4, p4[5:])
    s.decode(msg, [0, 3, 1, 2, 5], groups=[(5, 2), (5, 0), (0, 0), (0, 0), (0, 0)])
    yield msg
    msg = s.new()
    s.decode(msg, [0, 1, 2, 3, 4, 5])  # reads the K/V the mixed steps stored
    yield msg
    msg = s.new(row(6), release=(1,))
    s.prefill(msg, 6, p6[:4], sample=False)
    s.decode(msg, [0, 2, 3, 4, 5])
    yield msg


def split(msg: shard_pb2.StepRequest) -> list[shard_pb2.StepRequest]:
    """A mixed step as the two steps it used to be: its prefill part, then its decode part."""
    if not (msg.prefill.rows and msg.decode.rows):
        return [msg]
    first = shard_pb2.StepRequest()
    first.CopyFrom(msg)
    first.ClearField("decode")
    return [first, shard_pb2.StepRequest(step_id=msg.step_id, decode=msg.decode)]


def want_logprobs(msg: shard_pb2.StepRequest, wants: dict[int, int | None]) -> None:
    """Track which rows asked logprobs (None: none) and how many top logprobs."""
    for r in msg.release_rows:
        wants.pop(r, None)
    for s in msg.admit:
        wants[s.row] = s.top_logprobs if s.logprobs else None


def assert_same_results(
    mixed: shard_pb2.StepResult, parts: list[shard_pb2.StepResult], wants: dict[int, int | None]
) -> None:
    """What the coordinator reads of a result (engine._deliver) is the same."""
    rows = [r for p in parts for r in p.rows]
    assert list(mixed.rows) == rows
    assert list(mixed.token_ids) == [t for p in parts for t in p.token_ids]
    prompt = [v for p in parts for v in p.prompt_logprobs]
    np.testing.assert_allclose(mixed.prompt_logprobs, prompt, rtol=1e-5, atol=1e-5)
    i = 0
    for p in parts:
        for j, r in enumerate(p.rows):
            k = wants.get(r)
            if k is not None:
                np.testing.assert_allclose(mixed.logprobs[i], p.logprobs[j], rtol=1e-5, atol=1e-5)
                ours = mixed.top_ids[i * mixed.top_k : i * mixed.top_k + k]
                theirs = p.top_ids[j * p.top_k : j * p.top_k + k]
                assert list(ours) == list(theirs), f"row {r}: top ids"
            i += 1


def run_parity(model_dir: Path, ops: Ops, vocab: int) -> tuple[Recorded, Recorded]:
    """Run ``scenario`` both ways, checking every step; return (merged, split) runners."""
    merged, separate = make_runners(model_dir, ops)
    wants: dict[int, int | None] = {}
    for msg in scenario(vocab):
        want_logprobs(msg, wants)
        before, before_split = len(merged.logits), len(separate.logits)
        result = merged.runner.step(msg)
        parts = [separate.runner.step(m) for m in split(msg)]
        assert_same_results(result, parts, wants)
        assert len(merged.logits) == before + 1, "one forward pass per step"
        if len(parts) == 2:
            assert merged.modes[-1] is ForwardMode.MIXED
        theirs = torch.cat(separate.logits[before_split:])
        torch.testing.assert_close(merged.logits[-1], theirs, rtol=1e-4, atol=1e-4)
    return merged, separate
