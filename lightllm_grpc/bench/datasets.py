"""Synthetic workloads for ``bench serve``: token-id prompts drawn with a seeded generator.

Pure functions: the same arguments and seed give the same prompts, so two servers (or the
same server with and without a feature) are measured on identical traffic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Vocab:
    """Token ids a prompt may use: ``[low, high)`` minus ``excluded`` (EOS and the like)."""

    low: int
    high: int
    excluded: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError(f"empty token range [{self.low}, {self.high})")
        if self.size < 1:
            raise ValueError("every token id in the range is excluded")

    @property
    def size(self) -> int:
        """How many distinct ids a prompt may use."""
        return self.high - self.low - sum(1 for t in self.excluded if self.low <= t < self.high)

    @classmethod
    def of_model(cls, vocab_size: int, eos_ids: tuple[int, ...] = ()) -> Vocab:
        # Skip the bottom of the vocabulary, where most tokenizers keep their specials and
        # byte tokens; random ids there make prompts unlike real text for no benefit.
        return cls(min(1000, vocab_size // 4), vocab_size, frozenset(eos_ids))

    def draw(self, rng: random.Random, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            t = rng.randrange(self.low, self.high)
            if t not in self.excluded:
                out.append(t)
        return out


@dataclass(frozen=True)
class BenchRequest:
    """One request: the prompt's token ids and the number of tokens to ask for."""

    prompt: tuple[int, ...]
    output_len: int


@dataclass(frozen=True)
class Conversation:
    """A multi-turn conversation: the new tokens each turn appends, and each turn's output.

    Turn ``t``'s prompt is turn ``t-1``'s prompt + the answer the server returned + ``turns[t]``,
    so it can only be built while the benchmark runs.
    """

    turns: tuple[tuple[int, ...], ...]
    output_len: int


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise ValueError(f"{name} must be >= 1 (got {v})")


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive bounds of ``[len*(1-r), len*(1+r)]`` in whole tokens, never below 1."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1) (got {range_ratio})")
    low = max(1, int(length * (1.0 - range_ratio)))
    return low, max(low, int(length * (1.0 + range_ratio)))


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab: Vocab,
    seed: int,
) -> list[BenchRequest]:
    """Independent random prompts; input and output lengths uniform within the range ratio."""
    _check_positive(num_prompts=num_prompts, input_len=input_len, output_len=output_len)
    return uniform_requests(
        num_prompts, length_range(input_len, range_ratio), length_range(output_len, range_ratio), vocab, seed
    )


def uniform_requests(
    num_prompts: int,
    input_range: tuple[int, int],
    output_range: tuple[int, int],
    vocab: Vocab,
    seed: int,
) -> list[BenchRequest]:
    """Independent random prompts; input and output lengths each uniform over the whole
    numbers of an inclusive ``(low, high)`` range (e.g. inputs 64-1,024, outputs 32-512)."""
    _check_positive(num_prompts=num_prompts, input_min=input_range[0], output_min=output_range[0])
    for name, (lo, hi) in (("input", input_range), ("output", output_range)):
        if hi < lo:
            raise ValueError(f"{name} range is empty: ({lo}, {hi})")
    rng = random.Random(seed)
    out = []
    for _ in range(num_prompts):
        n_in, n_out = rng.randint(*input_range), rng.randint(*output_range)
        out.append(BenchRequest(tuple(vocab.draw(rng, n_in)), n_out))
    return out


def _distinct(rng: random.Random, vocab: Vocab, n: int, length: int) -> list[tuple[int, ...]]:
    # Redraw on collision: two equal suffixes would make one request a full cache hit of
    # another, which the workload does not intend (it happens with tiny vocabularies).
    if vocab.size**length < n:
        raise ValueError(f"cannot draw {n} distinct sequences of {length} tokens from {vocab.size} ids")
    seen: dict[tuple[int, ...], None] = {}  # insertion-ordered, so the seed fixes the order
    while len(seen) < n:
        seen[tuple(vocab.draw(rng, length))] = None
    return list(seen)


def shared_prefix_requests(
    groups: int,
    prompts_per_group: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    vocab: Vocab,
    seed: int,
) -> list[BenchRequest]:
    """``groups`` random prefixes, each followed by ``prompts_per_group`` distinct suffixes,
    all requests shuffled together so groups interleave as in real traffic."""
    _check_positive(
        groups=groups, prompts_per_group=prompts_per_group, prefix_len=prefix_len, output_len=output_len
    )
    if suffix_len < 0:
        raise ValueError(f"suffix_len must be >= 0 (got {suffix_len})")
    rng = random.Random(seed)
    prefixes = _distinct(rng, vocab, groups, prefix_len)
    out = []
    for prefix in prefixes:
        # suffix_len 0 gives the same prompt repeated: a valid (all-hit) workload.
        suffixes = (
            _distinct(rng, vocab, prompts_per_group, suffix_len) if suffix_len else [()] * prompts_per_group
        )
        out += [BenchRequest(prefix + s, output_len) for s in suffixes]
    rng.shuffle(out)
    return out


def multi_turn_conversations(
    num_conversations: int,
    turns: int,
    turn_input_len: int,
    output_len: int,
    vocab: Vocab,
    seed: int,
) -> list[Conversation]:
    """Conversations of ``turns`` turns, each turn adding ``turn_input_len`` new random tokens."""
    _check_positive(
        num_conversations=num_conversations, turns=turns, turn_input_len=turn_input_len, output_len=output_len
    )
    rng = random.Random(seed)
    return [
        Conversation(tuple(tuple(vocab.draw(rng, turn_input_len)) for _ in range(turns)), output_len)
        for _ in range(num_conversations)
    ]
