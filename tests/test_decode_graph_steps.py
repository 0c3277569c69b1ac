"""Decode steps through CudaGraphDecoder's packed inputs and greedy tail, run eagerly on CPU
(``cuda_graphs=False``: the same step functions the GPU captures), against the runner's eager
decode. The capture itself is tested on the GPU (tests/test_gpu.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightllm_grpc_kernels import RELEASE_POLICIES, _launch

from lightllm_grpc.layers.forward_batch import ForwardBatch
from lightllm_grpc.layers.ops import Ops
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.shard import decode_inputs
from lightllm_grpc.shard.cuda_graph import (
    GREEDY_IN_GRAPH_MAX,
    PDL_MAX_BATCH,
    CudaGraphDecoder,
    choose_release,
    release_candidates,
)
from lightllm_grpc.shard.sampler import Sampler
from tests.model_factory import make_tiny_model
from tests.runner_harness import CPU, MAX_ROWS, Recorded, Script, make_runners, row, scenario

VOCAB = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama3", tmp_path_factory.mktemp("graphsteps") / "llama3", vocab_size=VOCAB)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
def test_packed_inputs_pad_and_start_16_byte_aligned(size: int) -> None:
    n = max(1, size - 2)
    rows, positions, slots = np.arange(n) + 3, np.arange(n) + 10, np.arange(n) + 100
    groups = [np.full(n, 4), np.r_[n, np.zeros(n - 1, dtype=np.int64)]]
    flat = torch.zeros(decode_inputs.buffer_size(16), dtype=torch.int64)
    host = decode_inputs.pack(rows, positions, slots, groups, size, pad_row=9, pad_slot=999)
    flat[: host.size] = torch.from_numpy(host)
    v = decode_inputs.DecodeInputs.view(flat, size)
    pad = size - n
    assert v.rows.tolist() == v.rows32.tolist() == [*rows, *[9] * pad]
    assert v.positions.tolist() == [*positions, *[0] * pad]
    assert v.seq_lens.tolist() == [*(positions + 1), *[1] * pad]
    assert v.slots.tolist() == v.slots32.tolist() == [*slots, *[999] * pad]
    assert v.shared_lens.tolist() == [*groups[0], *[0] * pad]
    assert v.group_sizes.tolist() == [*groups[1], *[0] * pad]
    for t in vars(v).values():
        assert t.data_ptr() % 16 == 0, "Triton would compile another specialization"


def _graphed(rec: Recorded) -> CudaGraphDecoder:
    """The runner replays (eagerly) graphs whose capture ran on padding rows only."""
    r = rec.runner
    seen: list[tuple[list[int], list[int], list[int]]] = []
    with_pdl: list[int] = []  # the sizes captured inside programmatic_launch()

    def forward(
        ids: torch.Tensor, batch: ForwardBatch, logits_out: torch.Tensor | None = None
    ) -> torch.Tensor:
        seen.append((batch.req_rows.tolist(), batch.positions.tolist(), batch.out_slots.tolist()))
        if _launch._PDL_SCOPE.get():
            with_pdl.append(len(batch.req_rows))
        return r.forward(ids, batch, logits_out)

    graphs = CudaGraphDecoder(
        forward, r.req_to_token, r.last_token, r.pad_row, r.pad_slot, MAX_ROWS, CPU, cuda_graphs=False
    )
    graphs.capture()
    assert sorted(len(rows) for rows, _, _ in seen) == [1, *graphs.sizes]  # the probe, then each size
    for rows, positions, slots in seen:
        assert set(rows) == {r.pad_row} and set(positions) == {0} and set(slots) == {r.pad_slot}
    assert sorted(with_pdl) == [s for s in graphs.sizes if s <= PDL_MAX_BATCH]
    graphs.forward = r.forward
    r.decode_graphs = graphs
    return graphs


def _greedy_script() -> list[shard_pb2.StepRequest]:
    """Three greedy rows (prefill, then decode steps of 3 and 1 rows: graphs of 4 and 1 with
    padding), then a row asking logprobs joins (the graph's argmax is not the step's answer)."""
    gen = np.random.default_rng(3)
    s = Script()
    msg = s.new(row(0), row(1), row(2))
    for r, n in ((0, 7), (1, 4), (2, 9)):
        s.prefill(msg, r, gen.integers(3, VOCAB, n).tolist())
    steps = [msg]
    for rows in ([0, 1, 2], [2, 0, 1], [1], [0, 1, 2]):
        steps.append(s.new())
        s.decode(steps[-1], rows)
    msg = s.new(row(3, logprobs=True))
    s.prefill(msg, 3, gen.integers(3, VOCAB, 5).tolist())
    steps.append(msg)
    for _ in range(2):
        steps.append(s.new())
        s.decode(steps[-1], [0, 3, 1])
    return steps


class _CountingSampler:
    def __init__(self, sampler: Sampler) -> None:
        self.calls = 0
        self._sample = sampler.sample

    def __call__(self, *args: object) -> object:
        self.calls += 1
        return self._sample(*args)


@pytest.mark.parametrize("script", ["scenario", "greedy"])
def test_graph_decoder_steps_equal_eager_steps(model_dir: Path, script: str) -> None:
    eager, graphed = make_runners(model_dir, Ops.native())
    _graphed(graphed)
    counting = _CountingSampler(graphed.runner.sampler)
    graphed.runner.sampler.sample = counting  # type: ignore[method-assign]
    steps = list(scenario(VOCAB)) if script == "scenario" else _greedy_script()
    plain_decode_steps = 0
    for msg in steps:
        before = counting.calls
        a, b = eager.runner.step(msg), graphed.runner.step(msg)
        assert list(a.rows) == list(b.rows) and list(a.token_ids) == list(b.token_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
        assert list(a.top_ids) == list(b.top_ids)
        ours = eager.logits[-1]
        torch.testing.assert_close(ours, graphed.logits[-1][: ours.shape[0]], rtol=1e-4, atol=1e-4)
        rows = list(msg.decode.rows)
        if rows and not msg.prefill.rows and graphed.runner.sampler.plain_argmax(np.asarray(rows)):
            assert counting.calls == before, "an all-greedy step in a small graph takes the graph's argmax"
            plain_decode_steps += 1
        assert torch.equal(eager.runner.last_token[:MAX_ROWS], graphed.runner.last_token[:MAX_ROWS])
    assert plain_decode_steps == (0 if script == "scenario" else 4)
    assert MAX_ROWS <= GREEDY_IN_GRAPH_MAX


SAMPLING_THAT_IS_NOT_PLAIN = {
    "temperature": {"temperature": 0.7, "seed": 1},
    "logprobs": {"logprobs": True},
    "repetition": {"repetition_penalty": 1.3},
    "presence": {"presence_penalty": 0.5},
    "frequency": {"frequency_penalty": 0.5},
    "bias": {"logit_bias_ids": [5], "logit_bias_values": [100.0]},
    "min_new_tokens": {"min_new_tokens": 2, "suppress_ids": [7]},
}


@pytest.mark.parametrize("option", [None, *SAMPLING_THAT_IS_NOT_PLAIN])
def test_plain_argmax_is_exactly_when_sample_is_the_argmax(option: str | None) -> None:
    """The graph's argmax replaces ``sample`` only for rows that it gives the argmax to."""
    sampler = Sampler(4, 16, CPU)
    options = SAMPLING_THAT_IS_NOT_PLAIN.get(option, {}) if option else {}
    sampler.admit(row(1, penalty_prompt_ids=[7], generated_ids=[7], **options))
    sampler.admit(row(2))
    rows = np.array([2, 1])
    logits = torch.zeros(2, 16)
    logits[:, 3], logits[:, 7] = 2.9, 3.0  # the argmax is 7 (generated once): each option moves row 1 off it
    assert sampler.plain_argmax(rows) is (option is None)
    assert sampler.plain_argmax(np.array([2]))
    tokens = sampler.sample(logits.clone(), rows).tokens
    if option is None:
        assert torch.equal(tokens, logits.argmax(dim=-1))
    elif option not in ("temperature", "logprobs"):  # these two may still draw the argmax
        assert tokens[1] != 7


def test_small_graphs_try_every_release_policy_whatever_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank captures and times as many graphs as the others, whatever its environment
    (their collectives must pair up); a forced policy only decides which one is kept."""
    for value in ("", "0", "gemv"):
        monkeypatch.setenv(_launch.PDL_ENV, value)
        assert release_candidates(1) == release_candidates(PDL_MAX_BATCH) == RELEASE_POLICIES
        assert release_candidates(PDL_MAX_BATCH + 1) == ("wait",)  # launched without PDL: one capture


def test_the_fastest_policy_is_kept_unless_one_is_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_launch.PDL_ENV, raising=False)
    assert choose_release({"wait": 2.78, "gemv": 2.72, "all": 2.67}) == "all"
    assert choose_release({"wait": 4.28, "gemv": 4.25, "all": 4.34}) == "gemv"
    assert choose_release({"wait": 1.0, "gemv": 1.0, "all": 1.0}) == "wait"  # a tie keeps the first
    monkeypatch.setenv(_launch.PDL_ENV, "gemv")
    assert choose_release({"wait": 2.78, "gemv": 2.72, "all": 2.67}) == "gemv"
    monkeypatch.setenv(_launch.PDL_ENV, "0")  # no PDL: the graphs are alike, "wait" names them
    assert choose_release({"wait": 2.78, "gemv": 2.72, "all": 2.67}) == "wait"


def test_the_capture_log_names_each_small_graphs_policy_and_times() -> None:
    graphs = CudaGraphDecoder.__new__(CudaGraphDecoder)  # the formatter alone: no model, no capture
    graphs.release, graphs.release_times = {}, {}
    assert graphs._describe_release() == f"none (no graph of up to {PDL_MAX_BATCH} rows)"
    graphs.release = {2: "wait", 1: "all"}
    graphs.release_times = {
        1: {"wait": 2.74, "gemv": 2.684, "all": 2.6241},
        2: {"wait": 4.3, "gemv": 4.31, "all": 4.8},
    }
    assert graphs._describe_release() == (
        "1: all (wait 2.740, gemv 2.684, all 2.624 ms); 2: wait (wait 4.300, gemv 4.310, all 4.800 ms)"
    )
