"""Incremental detokenization that never emits a broken UTF-8 character.

Each request keeps a small window of ids (``prefix_offset:read_offset`` already shown,
``read_offset:`` new). Decoding the window with and without the new ids and taking the
difference gives the new text, with the context a SentencePiece tokenizer needs for
its leading spaces. The windows of all requests in a step are decoded in one
``decode_batch`` call, so the per-step cost is two Rust calls rather than two per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


@dataclass
class DetokState:
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def step(self, states: list[DetokState]) -> list[str]:
        """Return the new text of each state after its latest ids were appended."""
        if not states:
            return []
        old = self._tok.decode_batch(
            [s.ids[s.prefix_offset : s.read_offset] for s in states], skip_special_tokens=self._skip
        )
        new = self._tok.decode_batch(
            [s.ids[s.prefix_offset :] for s in states], skip_special_tokens=self._skip
        )
        return [self._advance(s, o, n) for s, o, n in zip(states, old, new)]

    @staticmethod
    def _advance(state: DetokState, old: str, new: str) -> str:
        # A trailing replacement char means the last id ends mid-character: wait for more.
        if len(new) <= len(old) or new.endswith(REPLACEMENT):
            return ""
        state.prefix_offset = state.read_offset
        state.read_offset = len(state.ids)
        return new[len(old) :]
