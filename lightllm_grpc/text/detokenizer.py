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
    # Leave special tokens (EOS, role markers) out of the text.
    skip_special_tokens: bool = True
    # When special tokens are shown: a space between each and the text beside it, as
    # Hugging Face's slow tokenizers write them; otherwise as the tokenizer decodes them.
    spaces_between_special_tokens: bool = False

    @property
    def options(self) -> tuple[bool, bool]:
        return self.skip_special_tokens, self.spaces_between_special_tokens and not self.skip_special_tokens


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._special = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    def decode(self, ids: list[int], skip_special_tokens: bool = True, spaces: bool = False) -> str:
        if spaces and not skip_special_tokens:
            return self._decode_spaced(ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_state(self, state: DetokState) -> str:
        """The whole of ``state``'s ids, decoded with its options."""
        return self.decode(state.ids, *state.options)

    def step(self, states: list[DetokState]) -> list[str]:
        """Return the new text of each state after its latest ids were appended."""
        deltas = [""] * len(states)
        groups: dict[tuple[bool, bool], list[int]] = {}
        for i, s in enumerate(states):
            groups.setdefault(s.options, []).append(i)
        for (skip, spaces), idx in groups.items():
            group = [states[i] for i in idx]
            old = self._batch([s.ids[s.prefix_offset : s.read_offset] for s in group], skip, spaces)
            new = self._batch([s.ids[s.prefix_offset :] for s in group], skip, spaces)
            for i, s, o, n in zip(idx, group, old, new):
                deltas[i] = self._advance(s, o, n)
        return deltas

    def _batch(self, windows: list[list[int]], skip: bool, spaces: bool) -> list[str]:
        if spaces:  # rare: asked for special tokens in the text, spaced out
            return [self._decode_spaced(w) for w in windows]
        return self._tok.decode_batch(windows, skip_special_tokens=skip)

    def _decode_spaced(self, ids: list[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special:
                if run:
                    parts.append(self._tok.decode(run, skip_special_tokens=False))
                    run = []
                parts.append(self._special[i])
            else:
                run.append(i)
        if run:
            parts.append(self._tok.decode(run, skip_special_tokens=False))
        return " ".join(parts)

    @staticmethod
    def _advance(state: DetokState, old: str, new: str) -> str:
        # A trailing replacement char means the last id ends mid-character: wait for more.
        if len(new) <= len(old) or new.endswith(REPLACEMENT):
            return ""
        state.prefix_offset = state.read_offset
        state.read_offset = len(state.ids)
        return new[len(old) :]
