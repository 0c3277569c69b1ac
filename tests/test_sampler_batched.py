"""The sampler's batched state: penalty counts in one device table, bias and suppression applied
to the whole batch at once, and the start-up profile of a full sampled batch."""

from __future__ import annotations

import numpy as np
import torch

from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.server.request_builder import MAX_TOP_LOGPROBS
from lightllm_grpc.shard.sampler import Sampler
from lightllm_grpc.shard.worker import PROFILE_TOP_LOGPROBS, profile_row, profile_sampling

V = 40


def _admit(s: Sampler, row: int, **kw) -> None:
    base = dict(row=row, temperature=0.0, top_k=-1, top_p=1.0, repetition_penalty=1.0, seed=row)
    base.update(kw)
    s.admit(shard_pb2.RowSampling(**base))


def _per_row(
    logits: torch.Tensor, rep: float, presence: float, frequency: float, seen, counts
) -> torch.Tensor:
    """The per-row penalty of the sampler before it was batched."""
    if rep != 1.0:
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    if presence or frequency:
        logits = logits - frequency * counts - presence * (counts > 0).float()
    return logits


def test_batched_processing_equals_the_per_row_rules() -> None:
    s = Sampler(6, V, torch.device("cpu"))
    rows = np.array([4, 1, 0, 5])
    _admit(s, 4, repetition_penalty=1.5, penalty_prompt_ids=[3, 3, 7], generated_ids=[7, 8, 8])
    _admit(s, 1, presence_penalty=0.7, frequency_penalty=0.3, generated_ids=[2, 2, 5])
    _admit(s, 0, logit_bias_ids=[6, 9], logit_bias_values=[2.5, -1.0], min_new_tokens=5, suppress_ids=[1, 2])
    _admit(s, 5)
    logits = torch.randn(4, V) * 3
    out = s._process(logits.clone(), rows, s.penalized[rows], s._step(rows))

    seen = torch.zeros(V, dtype=torch.bool)
    seen[[3, 7, 8]] = True
    counts = torch.zeros(V)
    counts[7], counts[8] = 1, 2
    expected = logits.clone()
    expected[0] = _per_row(logits[0], 1.5, 0.0, 0.0, seen, counts)
    counts = torch.zeros(V)
    counts[2], counts[5] = 2, 1
    expected[1] = _per_row(logits[1], 1.0, 0.7, 0.3, counts > 0, counts)
    expected[2, 6] += 2.5
    expected[2, 9] -= 1.0
    expected[2, [1, 2]] = float("-inf")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_counts_follow_the_sampled_tokens_and_reset_on_admit() -> None:
    s = Sampler(3, V, torch.device("cpu"))
    _admit(s, 2, frequency_penalty=1.0, penalty_prompt_ids=[0])
    _admit(s, 1)  # no penalties: its counts row is never read
    logits = torch.full((2, V), -5.0)
    logits[:, 11] = 5.0
    s.sample(logits.clone(), np.array([2, 1]))
    assert s.counts[2, 11].item() == 2 and s.counts[2, 0].item() == 1
    assert s.counts[1].abs().sum().item() == 0
    _admit(s, 2, presence_penalty=0.5)
    assert s.counts[2].abs().sum().item() == 0


def test_profile_row_asks_for_the_most_a_request_may() -> None:
    assert PROFILE_TOP_LOGPROBS == MAX_TOP_LOGPROBS
    row = profile_row(0)
    assert row.temperature > 0 and row.presence_penalty and row.logprobs and row.logit_bias_ids


def test_profile_sampling_leaves_no_row_state() -> None:
    s = Sampler(5, V, torch.device("cpu"))
    profile_sampling(s, 4, V, torch.bfloat16, torch.device("cpu"))
    assert not s.penalized.any() and not s.bias and not s.suppress and not s.has_bias.any()


def test_step_state_starts_16_byte_aligned_for_any_batch() -> None:
    """Triton specializes on 16-byte pointer alignment: the seeds, counters and rows of an odd
    batch (views of one copy) must start aligned, or the sampling kernels compile again after
    warm-up (seen on an H100: 1.07 s for the first sampled batch of an odd size)."""
    s = Sampler(8, V, torch.device("cpu"))
    for row in range(8):
        _admit(s, row, temperature=0.8, seed=100 + row)
    for b in (1, 3, 5, 8):
        rows = np.arange(b)
        step = s._step(rows)
        for t in (step.seeds, step.counters, step.rows):
            assert t.data_ptr() % 16 == 0 and t.shape == (b,) and t.is_contiguous()
        assert step.seeds.tolist() == [100 + r for r in range(b)] and step.rows.tolist() == rows.tolist()
        assert step.counters.tolist() == s.generated[rows].tolist()
