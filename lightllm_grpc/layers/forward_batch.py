"""Per-forward metadata: one object that every layer reads instead of many tensors."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class ForwardMode(Enum):
    PREFILL = "prefill"  # variable number of new tokens per sequence, possibly after a cached prefix
    DECODE = "decode"  # exactly one new token per sequence


@dataclass
class ForwardBatch:
    """Everything a forward pass needs besides the token ids.

    Tokens of all sequences are packed along one axis of length T. Sequence b owns the
    packed range ``[q_starts[b], q_starts[b] + q_lens[b])``; its K/V live in the pool at
    the slots ``req_to_token[req_rows[b], :seq_lens[b]]``, where the last ``q_lens[b]``
    of those are the new tokens (their slots are also ``out_slots`` of the packed range).
    The attention backend stores the new K/V at ``out_slots`` before attending, so a
    query at position p sees keys 0..p of its own sequence (causal).

    All tensors live on the model's device. Integer tensors are int32 except
    ``positions`` and ``out_slots`` (int64, used for indexing). In DECODE mode
    ``q_lens`` is all ones and T == B.
    """

    mode: ForwardMode
    positions: torch.Tensor  # [T] int64 absolute position of each new token
    out_slots: torch.Tensor  # [T] int64 KV-pool slot where each new token's K/V goes
    req_rows: torch.Tensor  # [B] int32 row of each sequence in req_to_token
    seq_lens: torch.Tensor  # [B] int32 K/V length of each sequence including the new tokens
    q_starts: torch.Tensor  # [B] int32 offset of each sequence's first new token in T
    q_lens: torch.Tensor  # [B] int32 number of new tokens of each sequence
    req_to_token: torch.Tensor  # [max_rows, max_context] int32 slot id of each (row, position)
    logits_indices: torch.Tensor  # [B] int64 index in T of each sequence's last new token
    max_q_len: int  # host-side max of q_lens (sizes prefill grids without a device sync)
    max_seq_len: int  # host-side max of seq_lens (an upper bound is fine)
    # DECODE only, optional: rows b .. b + group_sizes[b] - 1 share K/V positions
    # [0, shared_lens[b]) (see DecodeBatch in shard.proto); backends may read them once.
    shared_lens: torch.Tensor | None = None  # [B] int32
    group_sizes: torch.Tensor | None = None  # [B] int32

    @property
    def batch_size(self) -> int:
        return int(self.req_rows.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def prefix_lens(self) -> torch.Tensor:
        return self.seq_lens - self.q_lens
