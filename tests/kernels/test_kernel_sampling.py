"""The sorting-free sampling kernel against the torch sampler: same kept set, same seeded tokens,
same distribution; and the penalty kernel against its reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightllm_grpc_kernels.sampling import (
    apply_penalties,
    apply_penalties_ref,
    filter_ref,
    sample,
    sample_ref,
)

from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.shard import rng
from lightllm_grpc.shard.sampler import Sampler

GPU = pytest.mark.gpu


def _params(b: int, vocab: int, temp=1.0, top_k=-1, top_p=1.0, min_p=0.0, device="cpu") -> torch.Tensor:
    k = float(top_k if top_k > 0 else vocab)
    return torch.tensor([[temp, k, top_p, min_p]] * b, dtype=torch.float32, device=device)


def _kept_by_kernel(logits: torch.Tensor, params: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """The kernel's kept set of one row, probed by noise that makes token j win whenever it is kept."""
    vocab = logits.shape[1]
    probes = logits.expand(vocab, vocab).contiguous()
    u = torch.full((vocab, vocab), float(np.exp(-1.0)))  # E = 1: the race is p itself
    u.fill_diagonal_(1.0 - 1e-7)  # E ~ 1e-7: token j beats any other token
    seeds = torch.zeros(vocab, dtype=torch.int64)
    tokens = sample(
        probes, params.expand(vocab, 4).contiguous(), seeds, seeds, uniform=u, block_size=block_size
    )
    return tokens == torch.arange(vocab)


# (name, logits of one row, temperature, top_k, top_p, min_p)
TIES = torch.tensor([3.0] * 5 + [2.0] * 6 + [1.0] * 9 + [0.0] * 12)
FILTER_CASES = [
    ("top_k", None, 1.0, 5, 1.0, 0.0),
    ("top_k_1", None, 1.0, 1, 1.0, 0.0),
    ("top_p", None, 1.0, -1, 0.6, 0.0),
    ("min_p", None, 1.0, -1, 1.0, 0.2),
    ("combined", None, 0.8, 12, 0.7, 0.05),
    ("temperature", None, 0.5, -1, 0.9, 0.0),
    ("ties_top_k", TIES, 1.0, 3, 1.0, 0.0),  # keeps the 3 lowest ids of the 5 tied at the top
    ("ties_top_p", TIES, 1.0, -1, 0.5, 0.0),  # stops inside the tied group
    ("ties_min_p", TIES, 1.0, -1, 1.0, 0.3),
]


@pytest.mark.parametrize("block_size", [None, 8])
@pytest.mark.parametrize(
    "name, row, temp, top_k, top_p, min_p", FILTER_CASES, ids=[c[0] for c in FILTER_CASES]
)
def test_kept_set_matches_the_torch_filter(name, row, temp, top_k, top_p, min_p, block_size) -> None:
    logits = (torch.randn(32) * 2 if row is None else row)[None].float()
    params = _params(1, 32, temp, top_k, top_p, min_p)
    probs = torch.softmax(logits / temp, dim=-1)
    expected = filter_ref(probs, params[:, 1], params[:, 2], params[:, 3])[0] > 0
    assert torch.equal(_kept_by_kernel(logits, params, block_size), expected)


def _admit(s: Sampler, row: int, **kw) -> None:
    base = dict(
        row=row, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=row + 1
    )
    base.update(kw)
    s.admit(shard_pb2.RowSampling(**base))


ROWS = [
    dict(temperature=0.8, top_k=20, top_p=0.9, presence_penalty=0.5),
    dict(temperature=1.0),
    dict(temperature=0.0, frequency_penalty=1.5),
    dict(temperature=1.2, min_p=0.1, repetition_penalty=1.3, penalty_prompt_ids=[1, 2, 3, 2]),
    dict(temperature=0.7, top_p=0.5, logit_bias_ids=[4, 9], logit_bias_values=[5.0, -3.0]),
    dict(temperature=0.9, top_k=3, min_new_tokens=3, suppress_ids=[0, 5], generated_ids=[7]),
    dict(temperature=0.6, top_k=1),
    dict(temperature=1.0, top_p=0.3, frequency_penalty=-0.5, seed=2**64 - 1),
]


def test_kernel_path_draws_the_torch_paths_tokens() -> None:
    vocab, steps = 96, 4
    samplers = [Sampler(10, vocab, torch.device("cpu"), kernels=k) for k in (False, True)]
    rows = np.array([9, 0, 3, 1, 7, 2, 5, 4])
    for s in samplers:
        for row, kw in zip(rows.tolist(), ROWS):
            _admit(s, row, **kw)
    for _ in range(steps):
        logits = torch.randn(len(rows), vocab) * 3
        torch_path, kernel_path = (s.sample(logits.clone(), rows).tokens for s in samplers)
        assert torch.equal(torch_path, kernel_path)
    assert torch.equal(samplers[0].counts, samplers[1].counts)


def test_seeded_row_draws_the_same_alone_or_in_a_batch() -> None:
    vocab = 64
    logits = torch.randn(5, vocab) * 2
    params = _params(5, vocab, 0.8, 10, 0.9, 0.02)
    seeds = torch.tensor([11, -3, 2**62, 5, 123456789])
    for counter in range(3):
        counters = torch.full((5,), counter)
        batch = sample(logits, params, seeds, counters)
        alone = torch.cat(
            [sample(logits[i : i + 1], params[i : i + 1], seeds[i : i + 1], counters[:1]) for i in range(5)]
        )
        assert torch.equal(batch, alone)
        assert torch.equal(batch, sample_ref(logits, params, rng.uniform(seeds, counters, vocab)))


def test_sampled_distribution_is_the_filtered_softmax() -> None:
    vocab, n = 8, 600
    logits = torch.tensor([[2.0, 1.5, 1.4, 1.0, 0.3, 0.0, -1.0, -2.0]])
    params = _params(n, vocab, 0.8, 6, 0.95, 0.05)
    seeds = torch.arange(n, dtype=torch.int64) * 7919 + 1
    tokens = sample(logits.expand(n, vocab), params, seeds, torch.zeros(n, dtype=torch.int64))
    probs = filter_ref(torch.softmax(logits / 0.8, -1), params[:1, 1], params[:1, 2], params[:1, 3])[0]
    expected = (probs / probs.sum()).double()
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[expected == 0].sum() == 0
    keep = expected > 0
    chi2 = (((counts - n * expected)[keep] ** 2) / (n * expected[keep])).sum().item()
    assert chi2 < 20.5, chi2  # p = 0.001 at 5 degrees of freedom
    assert 0.5 * (counts / n - expected).abs().sum().item() < 0.06


def test_penalties_match_reference() -> None:
    rows_total, vocab, b = 6, 300, 4
    counts = torch.randint(0, 3, (rows_total, vocab), dtype=torch.int32) * torch.randint(
        0, 2, (rows_total, vocab), dtype=torch.int32
    )
    logits = torch.randn(b, vocab) * 4
    rows = torch.tensor([5, 0, 2, 3])
    params = torch.tensor([[1.3, 0.5, 0.2], [1.0, 0.0, 0.0], [0.7, 0.0, 1.1], [1.0, -1.0, 0.0]])
    expected = apply_penalties_ref(logits, counts, rows, params)
    out = apply_penalties(logits.clone(), counts, rows, params)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# --- realistic shapes, compiled (GPU) ---

BIG_VOCAB = 128256


def _big_logits(b: int, dtype: torch.dtype) -> torch.Tensor:
    # A model-like spread: a few strong tokens over a long flat tail, rounded as the model's dtype.
    logits = torch.randn(b, BIG_VOCAB, device="cuda") * 2
    logits[:, :64] += torch.randn(b, 64, device="cuda") * 4 + 6
    return logits.to(dtype).float()


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "temp, top_k, top_p, min_p",
    [(0.8, 50, 0.9, 0.0), (1.0, -1, 0.95, 0.0), (0.7, -1, 1.0, 0.05), (1.0, -1, 1.0, 0.0)],
)
def test_gpu_tokens_match_reference_at_full_vocab(dtype, temp, top_k, top_p, min_p) -> None:
    b = 512
    logits = _big_logits(b, dtype)
    params = _params(b, BIG_VOCAB, temp, top_k, top_p, min_p, device="cuda")
    seeds = torch.randint(-(2**62), 2**62, (b,), device="cuda")
    counters = torch.randint(0, 1000, (b,), device="cuda")
    tokens = sample(logits, params, seeds, counters)
    expected = sample_ref(logits, params, rng.uniform(seeds, counters, BIG_VOCAB))
    # Compiled exp/log round differently from torch's: only near-ties of the race may differ.
    assert (tokens != expected).sum().item() <= 2


@GPU
def test_gpu_distribution_at_full_vocab() -> None:
    n = 40000
    logits = _big_logits(1, torch.bfloat16)
    params = _params(n, BIG_VOCAB, 0.8, 50, 0.9, 0.0, device="cuda")
    seeds = torch.arange(n, device="cuda", dtype=torch.int64) * 1000003 + 17
    tokens = sample(
        logits.expand(n, BIG_VOCAB), params, seeds, torch.zeros(n, dtype=torch.int64, device="cuda")
    )
    probs = filter_ref(torch.softmax(logits / 0.8, -1), params[:1, 1], params[:1, 2], params[:1, 3])[
        0
    ].double()
    expected = probs / probs.sum()
    counts = torch.bincount(tokens, minlength=BIG_VOCAB).double()
    assert counts[expected == 0].sum() == 0
    assert 0.5 * (counts / n - expected).abs().sum().item() < 0.03


@GPU
def test_gpu_penalties_match_reference_at_full_vocab() -> None:
    b = 512
    counts = torch.randint(0, 4, (b + 1, BIG_VOCAB), dtype=torch.int32, device="cuda")
    logits = torch.randn(b, BIG_VOCAB, device="cuda") * 4
    rows = torch.randperm(b + 1, device="cuda")[:b]
    params = torch.rand(b, 3, device="cuda") + torch.tensor([0.5, -0.5, -0.5], device="cuda")
    params[::3] = torch.tensor([1.0, 0.0, 0.0], device="cuda")  # rows with penalties off
    expected = apply_penalties_ref(logits, counts, rows, params)
    torch.testing.assert_close(
        apply_penalties(logits.clone(), counts, rows, params), expected, rtol=0, atol=0
    )


@GPU
def test_gpu_sampler_paths_agree_at_full_vocab() -> None:
    b, steps = 512, 3
    device = torch.device("cuda")
    samplers = [Sampler(b + 1, BIG_VOCAB, device, kernels=k) for k in (False, True)]
    rows = np.random.default_rng(0).permutation(b + 1)[:b]
    for s in samplers:
        for i, row in enumerate(rows.tolist()):
            _admit(s, row, **{**ROWS[i % len(ROWS)], "seed": 1000 + i})
    for _ in range(steps):
        logits = _big_logits(b, torch.bfloat16)
        torch_path, kernel_path = (s.sample(logits.clone(), rows).tokens for s in samplers)
        assert (torch_path != kernel_path).sum().item() <= 2
