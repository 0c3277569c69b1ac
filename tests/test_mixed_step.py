"""A step with prefill entries and decode rows is one forward pass (ForwardMode.MIXED) that
gives what the prefill part and the decode part give as two steps (tests/runner_harness.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from lightllm_grpc.layers.forward_batch import ForwardBatch, ForwardMode
from lightllm_grpc.layers.ops import Ops
from tests.model_factory import make_tiny_model
from tests.runner_harness import make_runners, run_parity, scenario

VOCAB = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama3", tmp_path_factory.mktemp("mixed") / "llama3", vocab_size=VOCAB)


def test_mixed_steps_match_separate_prefill_and_decode(model_dir: Path) -> None:
    merged, separate = run_parity(model_dir, Ops.native(), VOCAB)
    assert merged.modes.count(ForwardMode.MIXED) == 3
    assert ForwardMode.MIXED not in separate.modes
    # Decode-only steps stay decode steps (which replay CUDA graphs on GPU).
    assert merged.modes.count(ForwardMode.DECODE) == 2


class _Pending:
    def __init__(self, rows: np.ndarray, tokens: torch.Tensor) -> None:
        self.rows, self.tokens = rows.tolist(), tokens.tolist()


class RecordingGrammars:
    """Stands in for RowGrammars: records when the runner hands it decode input ids."""

    def __init__(self) -> None:
        self.forwards: list[torch.Tensor] = []
        self.events: list[tuple[str, int, object]] = []

    def pending(self, rows: np.ndarray, input_ids: Callable[[], torch.Tensor]) -> _Pending:
        pending = _Pending(rows, input_ids())
        self.events.append(("pending", len(self.forwards), pending))
        return pending

    def accept(self, pending: _Pending) -> None:
        self.events.append(("accept", len(self.forwards), pending))

    def constrained(self, rows: np.ndarray) -> np.ndarray:
        return np.empty(0, dtype=np.int64)

    def release(self, row: int) -> None:
        pass


def test_mixed_step_hands_decode_inputs_to_grammars_around_the_forward(model_dir: Path) -> None:
    grammars = RecordingGrammars()
    merged, _ = make_runners(model_dir, Ops.native(), grammars)
    grammars.forwards = merged.logits  # one entry per forward pass
    steps = list(scenario(VOCAB))
    last: dict[int, int] = {}
    for msg in steps[:3]:  # prefill, decode, then the first mixed step
        grammars.events.clear()
        result = merged.runner.step(msg)
        done = len(merged.logits)
        if msg.decode.rows:
            (kind, at, pending), (kind2, at2, accepted) = grammars.events
            assert (kind, at, kind2, at2) == (
                "pending",
                done - 1,
                "accept",
                done,
            )  # before / after the forward
            assert pending.rows == list(msg.decode.rows)
            assert pending.tokens == [last[r] for r in msg.decode.rows]  # the rows' previous tokens
            assert accepted.rows == pending.rows
        last.update(zip(result.rows, result.token_ids))
    assert merged.modes[-1] is ForwardMode.MIXED


def test_split_views_the_two_parts() -> None:
    table = torch.arange(40, dtype=torch.int32).view(4, 10)
    i32 = torch.int32
    batch = ForwardBatch(
        mode=ForwardMode.MIXED,
        positions=torch.tensor([3, 4, 5, 0, 1, 7, 2]),
        out_slots=torch.tensor([13, 14, 15, 20, 21, 7, 32]),
        req_rows=torch.tensor([1, 2, 0, 3], dtype=i32),
        seq_lens=torch.tensor([6, 2, 8, 3], dtype=i32),
        q_starts=torch.tensor([0, 3, 5, 6], dtype=i32),
        q_lens=torch.tensor([3, 2, 1, 1], dtype=i32),
        req_to_token=table,
        logits_indices=torch.tensor([2, 4, 5, 6]),
        max_q_len=3,
        max_seq_len=8,
        shared_lens=torch.tensor([0, 0], dtype=i32),
        group_sizes=torch.tensor([0, 0], dtype=i32),
        num_prefill=2,
        num_prefill_tokens=5,
    )
    prefill, decode = batch.split()
    assert batch.split()[1] is decode, "built once per forward"
    assert prefill.mode is ForwardMode.PREFILL and decode.mode is ForwardMode.DECODE
    assert prefill.positions.tolist() == [3, 4, 5, 0, 1] and prefill.logits_indices.tolist() == [2, 4]
    assert prefill.req_rows.tolist() == [1, 2] and prefill.shared_lens is None
    assert decode.positions.tolist() == [7, 2] and decode.out_slots.tolist() == [7, 32]
    assert decode.req_rows.tolist() == [0, 3] and decode.seq_lens.tolist() == [8, 3]
    assert decode.q_starts.tolist() == [0, 1] and decode.logits_indices.tolist() == [0, 1]
    assert decode.group_sizes is batch.group_sizes
    with pytest.raises(ValueError, match="prefill and decode rows"):
        ForwardBatch(**{**_fields(batch), "num_prefill": 4})


def _fields(batch: ForwardBatch) -> dict[str, object]:
    return {k: v for k, v in vars(batch).items() if not k.startswith("_")}


def test_torch_backend_checks_groups_of_mixed_decode_rows(model_dir: Path) -> None:
    """A wrong prefix group on a mixed step's decode rows is an error, as in a decode step."""
    merged, _ = make_runners(model_dir, Ops.native())
    steps = list(scenario(VOCAB))
    for msg in steps[:3]:
        merged.runner.step(msg)
    bad = steps[3]
    bad.decode.shared_lens[:] = [6, 6, 0, 0, 0]  # rows 0 and 3 share only 5 positions
    with pytest.raises(ValueError, match="does not share"):
        merged.runner.step(bad)


@pytest.mark.parametrize("num_prefill", [1, 2, 3, 4])
def test_decode_part_index_tensors_start_16_byte_aligned(num_prefill: int) -> None:
    """Triton compiles a kernel per pointer alignment: views p int32s into the batch's tensors
    would give mixed steps decode kernels that warm-up never compiled."""
    n = num_prefill + 3
    i32 = torch.arange(n, dtype=torch.int32)
    batch = ForwardBatch(
        mode=ForwardMode.MIXED, positions=torch.arange(n), out_slots=torch.arange(n),
        req_rows=i32.clone(), seq_lens=i32 + 1, q_starts=i32.clone(), q_lens=torch.ones(n, dtype=torch.int32),
        req_to_token=torch.zeros(n, 8, dtype=torch.int32), logits_indices=torch.arange(n), max_q_len=1,
        max_seq_len=n + 1, num_prefill=num_prefill, num_prefill_tokens=num_prefill,
    )  # fmt: skip
    _, decode = batch.split()
    for name in ("req_rows", "seq_lens"):
        t = getattr(decode, name)
        assert t.data_ptr() % 16 == 0, f"{name} starts {t.data_ptr() % 16} bytes off"
        assert t.tolist() == getattr(batch, name)[num_prefill:].tolist()


@pytest.mark.parametrize("rows", [2, 5, 9])
def test_mixed_steps_prefix_groups_start_16_byte_aligned(rows: int, tmp_path: Path) -> None:
    """The same for a mixed step's prefix groups: a view of group_sizes b int32s into one
    buffer compiled the cascade kernels again on GPU for every b that 4 does not divide."""
    from lightllm_grpc.config import ShardConfig
    from lightllm_grpc.shard.warmup import mixed_step
    from lightllm_grpc.shard.worker import build_shard

    model = make_tiny_model("llama3", tmp_path / "llama3")
    cfg = ShardConfig(model=model, device="cpu", max_total_tokens=128, max_rows=16, max_context=32)
    runner = build_shard(cfg, rank=0, world_size=1, init_method=None).runner
    seen: list[ForwardBatch] = []
    forward = runner.mixed_forward
    runner.mixed_forward = lambda ids, batch: (seen.append(batch), forward(ids, batch))[1]
    runner.step(mixed_step(rows, runner.kv_capacity, grouped=True))
    (batch,) = seen
    assert batch.shared_lens is not None and batch.group_sizes is not None
    for name in ("shared_lens", "group_sizes"):
        t = getattr(batch, name)
        assert t.data_ptr() % 16 == 0, f"{name} starts {t.data_ptr() % 16} bytes off"
    assert batch.group_sizes.tolist() == [2 if r % 2 == 0 and r + 1 < rows else 0 for r in range(rows)]
