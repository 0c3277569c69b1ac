"""A counter-based random stream: uniform noise as a pure function of (seed, step, token id).

Sampling with it gives each request the same tokens whether it runs alone or in any
batch, on any tensor-parallel rank, with no per-request generator objects: the noise for
a row is computed from its own seed and its own generated-token count.
"""

from __future__ import annotations

import torch

_MASK63 = (1 << 63) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_STEP = _signed(0xD1B54A32D192ED03)


def to_int64_seed(seed: int) -> int:
    """Map any uint64 seed onto torch's int64 range (bijectively)."""
    return _signed(seed & ((1 << 64) - 1))


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    # Logical shift: torch's >> on int64 is arithmetic, so clear the sign-extended bits.
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def uniform(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """Noise in (0, 1) of shape [B, vocab] from int64 seeds [B] and counters [B]."""
    base = _splitmix(seeds * _GOLDEN + counters * _STEP)
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64) * _GOLDEN
    return to_unit(_shr(_splitmix(base[:, None] + cols[None, :]), 64 - UNIT_BITS))


# Bits of the hash that make one uniform. Not 24: (2**24 - 1 + 0.5) / 2**24 rounds to 1.0 in
# float32, where -log(u) is 0 and the exponential race divides by zero (a filtered token's
# 0 / 0 = NaN won torch's argmax). With 23 bits every value is exact and in [2**-24, 1 - 2**-24].
UNIT_BITS = 23


def to_unit(bits: torch.Tensor) -> torch.Tensor:
    """The top ``UNIT_BITS`` bits of a hash (int64, non-negative) as a float32 strictly in (0, 1)."""
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << UNIT_BITS))
