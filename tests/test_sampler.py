from __future__ import annotations

import numpy as np
import torch
from lightllm_grpc_kernels.sampling import filter_ref as _filter

from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.shard import rng
from lightllm_grpc.shard.sampler import Sampler, kernels_by_default

V = 50


def _admit(s: Sampler, row: int, **kw) -> None:
    base = dict(row=row, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=7)
    base.update(kw)
    s.admit(shard_pb2.RowSampling(**base))


def test_uniform_is_deterministic_and_in_range() -> None:
    seeds = torch.tensor([1, 2, rng.to_int64_seed(2**64 - 1)])
    counters = torch.tensor([0, 5, 9])
    u = rng.uniform(seeds, counters, 1000)
    assert torch.equal(u, rng.uniform(seeds, counters, 1000))
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.03
    assert not torch.equal(u[0], u[1])


def test_the_kernel_path_is_the_default_on_cuda_only() -> None:
    assert kernels_by_default(torch.device("cuda")) and kernels_by_default(torch.device("cuda", 1))
    assert not kernels_by_default(torch.device("cpu"))
    assert not Sampler(2, V, torch.device("cpu")).kernels


def test_unit_noise_never_reaches_one() -> None:
    # -log(1.0) = 0 made the race divide by zero: torch's argmax then took a filtered token (NaN).
    extremes = rng.to_unit(torch.tensor([0, (1 << rng.UNIT_BITS) - 1]))
    assert (extremes > 0).all() and (extremes < 1).all()
    assert (-torch.log(extremes) > 0).all()


def test_seeded_rows_sample_the_same_alone_or_batched() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, V)
    alone = Sampler(4, V, torch.device("cpu"))
    _admit(alone, 2, seed=123)
    batched = Sampler(4, V, torch.device("cpu"))
    for row, seed in ((0, 5), (1, 9), (2, 123)):
        _admit(batched, row, seed=seed)
    a = [alone.sample(logits[2:3].clone(), np.array([2])).tokens.item() for _ in range(20)]
    b = [batched.sample(logits.clone(), np.array([0, 1, 2])).tokens[2].item() for _ in range(20)]
    assert a == b
    assert len(set(a)) > 1  # the counter advances, so draws differ step to step


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.7, 0.2, 0.1] + [0.0] * (V - 3))
    logits = torch.log(probs.clamp_min(1e-30))[None]
    s = Sampler(1, V, torch.device("cpu"))
    _admit(s, 0)
    counts = np.bincount(
        [s.sample(logits.clone(), np.array([0])).tokens.item() for _ in range(2000)], minlength=V
    )
    assert abs(counts[0] / 2000 - 0.7) < 0.05 and abs(counts[2] / 2000 - 0.1) < 0.03
    assert counts[3:].sum() == 0


def test_greedy_and_filters() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0] + [-5.0] * (V - 4)])
    s = Sampler(2, V, torch.device("cpu"))
    _admit(s, 0, temperature=0.0)
    assert s.sample(logits.clone(), np.array([0])).tokens.item() == 1
    probs = torch.softmax(logits, -1)
    one = torch.ones(1)
    kept = _filter(probs, torch.tensor([2.0]), one, torch.zeros(1))
    assert set(torch.nonzero(kept[0]).flatten().tolist()) == {1, 2}
    kept = _filter(probs, torch.tensor([float(V)]), torch.tensor([0.5]), torch.zeros(1))
    assert set(torch.nonzero(kept[0]).flatten().tolist()) == {1}
    kept = _filter(probs, torch.tensor([float(V)]), one, torch.tensor([0.3]))
    assert set(torch.nonzero(kept[0]).flatten().tolist()) == {1, 2}


def test_penalties_and_min_tokens_suppression() -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0] + [-5.0] * (V - 3)])
    s = Sampler(1, V, torch.device("cpu"))
    _admit(s, 0, temperature=0.0, repetition_penalty=2.0, penalty_prompt_ids=[0])
    assert s.sample(logits.clone(), np.array([0])).tokens.item() == 1  # 5/2 < 4
    s2 = Sampler(1, V, torch.device("cpu"))
    _admit(s2, 0, temperature=0.0, min_new_tokens=2, suppress_ids=[0, 1])
    assert s2.sample(logits.clone(), np.array([0])).tokens.item() == 2
    assert s2.sample(logits.clone(), np.array([0])).tokens.item() == 2
    assert s2.sample(logits.clone(), np.array([0])).tokens.item() == 0  # min reached
    s3 = Sampler(1, V, torch.device("cpu"))
    _admit(s3, 0, temperature=0.0, frequency_penalty=2.0)
    toks = [s3.sample(logits.clone(), np.array([0])).tokens.item() for _ in range(3)]
    assert toks[:2] == [0, 1]


def test_logprobs_and_top() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0] + [-9.0] * (V - 3)])
    s = Sampler(1, V, torch.device("cpu"))
    _admit(s, 0, temperature=0.0, logprobs=True, top_logprobs=2)
    out = s.sample(logits.clone(), np.array([0]))
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, ref[:, 0])
    assert out.top_ids.tolist() == [[0, 1]]
