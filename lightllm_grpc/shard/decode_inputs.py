"""A decode step's inputs as one int64 buffer: one copy to the device, then views of it there.

The runner used to upload a step's rows, positions and slots and then convert and copy them
on the device: about fifteen tiny launches around a batch-1 decode graph, ~0.1 ms of a 3.6 ms
FP8 step. Packed here on the host (padding included), they take one copy; ``prepare``'s few
device ops (the req_to_token write, the gather of each row's last token) run inside the
decode CUDA graph, or eagerly where no graph fits.

Layout for a width ``w`` (the batch rounded up to a multiple of 4, so every row below starts
16-byte aligned: Triton compiles a kernel per pointer alignment):

- int64 ``[3, w]``: rows, positions, slots;
- int32 ``[6, w]`` (the next three int64 rows): rows, seq_lens, slots, shared_lens,
  group_sizes, and one unused row.

Entries past the batch are padding: the padding row, position 0, the padding slot, length 1,
in no prefix group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lightllm_grpc.layers.forward_batch import ForwardBatch, ForwardMode

_I64_ROWS, _I32_ROWS = 3, 6
ROWS = _I64_ROWS + _I32_ROWS // 2  # int64 rows of the buffer


def width(batch: int) -> int:
    return max(4, -(-batch // 4) * 4)


def buffer_size(batch: int) -> int:
    """int64 elements of a packed batch of ``batch`` entries (padding included)."""
    return ROWS * width(batch)


def pack(
    rows: np.ndarray,
    positions: np.ndarray,
    slots: np.ndarray,
    groups: list[np.ndarray],
    size: int,
    pad_row: int,
    pad_slot: int,
) -> np.ndarray:
    """The flat int64 buffer of a decode batch padded to ``size`` entries. ``positions`` are the
    new tokens' (each row's length before the step); ``groups`` is ``[shared_lens, group_sizes]``
    or empty."""
    n, w = rows.size, width(size)
    buf = np.empty((ROWS, w), dtype=np.int64)
    i64, i32 = buf[:_I64_ROWS], buf[_I64_ROWS:].view(np.int32).reshape(_I32_ROWS, w)
    i64[0], i64[1], i64[2] = pad_row, 0, pad_slot
    i64[0, :n], i64[1, :n], i64[2, :n] = rows, positions, slots
    i32[0], i32[1], i32[2] = i64[0], i64[1] + 1, i64[2]
    i32[3:] = 0
    if groups:
        i32[3, :n], i32[4, :n] = groups
    return buf.reshape(-1)


@dataclass(frozen=True)
class DecodeInputs:
    """Device views of a packed buffer, each of ``size`` entries."""

    rows: torch.Tensor  # int64: indexes req_to_token and the last-token table
    positions: torch.Tensor  # int64
    slots: torch.Tensor  # int64
    rows32: torch.Tensor
    seq_lens: torch.Tensor  # int32
    slots32: torch.Tensor
    shared_lens: torch.Tensor  # int32
    group_sizes: torch.Tensor  # int32

    @classmethod
    def view(cls, flat: torch.Tensor, size: int) -> DecodeInputs:
        """Views of the first ``buffer_size(size)`` elements of ``flat`` (int64, contiguous)."""
        w = width(size)
        buf = flat[: ROWS * w].view(ROWS, w)
        i64 = buf[:_I64_ROWS, :size]
        i32 = buf[_I64_ROWS:].view(torch.int32).view(_I32_ROWS, w)[:, :size]
        return cls(i64[0], i64[1], i64[2], i32[0], i32[1], i32[2], i32[3], i32[4])


@dataclass(frozen=True)
class DecodeConstants:
    """What every decode batch of ``size`` rows shares: one token per row, row b's at index b."""

    arange32: torch.Tensor
    arange64: torch.Tensor
    ones32: torch.Tensor

    @classmethod
    def make(cls, size: int, device: torch.device | str) -> DecodeConstants:
        arange64 = torch.arange(size, dtype=torch.int64, device=device)
        return cls(arange64.to(torch.int32), arange64, torch.ones(size, dtype=torch.int32, device=device))


def prepare(
    inputs: DecodeInputs,
    consts: DecodeConstants,
    req_to_token: torch.Tensor,
    last_token: torch.Tensor,
    max_seq_len: int,
    groups: bool,
) -> tuple[torch.Tensor, ForwardBatch]:
    """Write the new tokens' slots into ``req_to_token`` and gather each row's last sampled token:
    the forward's input ids and batch (with the prefix groups when ``groups``)."""
    b = inputs.rows.shape[0]
    req_to_token[inputs.rows, inputs.positions] = inputs.slots32
    batch = ForwardBatch(
        mode=ForwardMode.DECODE,
        positions=inputs.positions,
        out_slots=inputs.slots,
        req_rows=inputs.rows32,
        seq_lens=inputs.seq_lens,
        q_starts=consts.arange32[:b],
        q_lens=consts.ones32[:b],
        req_to_token=req_to_token,
        logits_indices=consts.arange64[:b],
        max_q_len=1,
        max_seq_len=max_seq_len,
    )
    if groups:
        batch.shared_lens, batch.group_sizes = inputs.shared_lens, inputs.group_sizes
    return last_token.index_select(0, inputs.rows), batch
