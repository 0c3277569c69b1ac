"""Stop-string matching on streamed text, holding back what could be a partial match."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopMatch:
    text_end: int  # where the output text ends (the stop string trimmed or kept)
    stop: str


class StopStringMatcher:
    def __init__(self, stops: list[str], include_in_output: bool) -> None:
        self._stops = [s for s in stops if s]
        self._include = include_in_output
        self.hold = max((len(s) for s in self._stops), default=1) - 1

    def find(self, text: str, new_from: int) -> StopMatch | None:
        """Find the earliest stop string that ends at or after ``new_from`` in ``text``."""
        if not self._stops:
            return None
        start = max(0, new_from - self.hold)
        best: StopMatch | None = None
        for stop in self._stops:
            idx = text.find(stop, start)
            if idx >= 0 and (best is None or idx < best.text_end):
                best = StopMatch(idx, stop)
        if best is not None and self._include:
            best.text_end += len(best.stop)
        return best

    def safe_end(self, text: str) -> int:
        """How much of ``text`` can be streamed without exposing a partial stop string."""
        return len(text) - self.hold if self._stops else len(text)
