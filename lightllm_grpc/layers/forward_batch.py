"""Per-forward metadata: one object that every layer reads instead of many tensors."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from functools import cached_property

import torch


class ForwardMode(Enum):
    PREFILL = "prefill"  # variable number of new tokens per sequence, possibly after a cached prefix
    DECODE = "decode"  # exactly one new token per sequence
    MIXED = "mixed"  # prefill entries first, then decode rows (one token each), in one pass


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

    In MIXED mode sequences ``[0, num_prefill)`` are prefill entries owning tokens
    ``[0, num_prefill_tokens)`` and sequences ``[num_prefill, B)`` are decode rows owning one
    token each, in order, at ``[num_prefill_tokens, T)``; both parts are non-empty. Every
    field still describes all B sequences on the one token axis (the model's linear layers
    see one ``[T, hidden]`` activation); attention backends call ``split`` to run each part
    with its own kernel. ``shared_lens``/``group_sizes`` describe the decode rows only.
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
    # Decode rows only (DECODE: all B; MIXED: the last B - num_prefill), optional: decode rows
    # r .. r + group_sizes[r] - 1 share K/V positions [0, shared_lens[r]) (see DecodeBatch in
    # shard.proto); backends may read them once.
    shared_lens: torch.Tensor | None = None  # [decode rows] int32
    group_sizes: torch.Tensor | None = None  # [decode rows] int32
    num_prefill: int = 0  # MIXED only: leading sequences that are prefill entries
    num_prefill_tokens: int = 0  # MIXED only: the tokens they own, at the start of T

    def __post_init__(self) -> None:
        if self.mode is ForwardMode.MIXED and not 0 < self.num_prefill < self.batch_size:
            raise ValueError(
                f"a mixed batch needs prefill and decode rows: {self.num_prefill} of {self.batch_size}"
            )

    @property
    def batch_size(self) -> int:
        return int(self.req_rows.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def prefix_lens(self) -> torch.Tensor:
        return self.seq_lens - self.q_lens

    def split(self) -> tuple[ForwardBatch, ForwardBatch]:
        """MIXED only: the prefill entries as a PREFILL batch over tokens ``[0, num_prefill_tokens)``
        and the decode rows as a DECODE batch over ``[num_prefill_tokens, T)`` (its own token
        axis: query i of ``q[num_prefill_tokens:]`` is decode row i).

        Views of this batch's tensors (plus one ``arange``, and copies of the decode rows'
        ``req_rows``/``seq_lens``: see ``_parts``), built on the first call and kept: every layer
        of a forward reads the same parts.
        """
        assert self.mode is ForwardMode.MIXED, f"split() is for MIXED batches, not {self.mode}"
        return self._parts

    @cached_property
    def _parts(self) -> tuple[ForwardBatch, ForwardBatch]:
        # In the instance's __dict__ from the first use on; not a field, so replace() drops it.
        p, tp = self.num_prefill, self.num_prefill_tokens
        prefill = replace(
            self,
            mode=ForwardMode.PREFILL,
            positions=self.positions[:tp],
            out_slots=self.out_slots[:tp],
            req_rows=self.req_rows[:p],
            seq_lens=self.seq_lens[:p],
            q_starts=self.q_starts[:p],
            q_lens=self.q_lens[:p],
            logits_indices=(self.q_starts[:p] + self.q_lens[:p] - 1).long(),
            shared_lens=None,
            group_sizes=None,
            num_prefill=0,
            num_prefill_tokens=0,
        )
        rows = torch.arange(self.batch_size - p, device=self.positions.device)
        decode = replace(
            self,
            mode=ForwardMode.DECODE,
            positions=self.positions[tp:],
            out_slots=self.out_slots[tp:],
            # Copies, not views: Triton specializes kernels on 16-byte pointer alignment, so a
            # view starting p int32s in would compile a second decode kernel per split count on
            # first use (seen: 6 compiles of ~0.5 s each, stalling live steps, under load).
            req_rows=self.req_rows[p:].clone(),
            seq_lens=self.seq_lens[p:].clone(),
            q_starts=rows.to(torch.int32),
            q_lens=self.q_lens[p:],
            logits_indices=rows,
            max_q_len=1,
            num_prefill=0,
            num_prefill_tokens=0,
        )
        return prefill, decode
