"""Kernel tests run compiled on a GPU and in Triton's interpreter elsewhere.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so this happens
when pytest loads this conftest, before the test modules import the kernels.
"""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_KERNELS_ROOT = Path(__file__).resolve().parents[2] / "kernels"
if str(_KERNELS_ROOT) not in sys.path:
    sys.path.insert(0, str(_KERNELS_ROOT))


def _index_scalar_with_numpy_2_4() -> None:
    """Lets the interpreter use loaded scalars as loop bounds (``range(0, seq_len, BLOCK)``).

    The interpreter keeps scalars as 1-element arrays and converts them with ``int(array)``,
    which NumPy 2.4 rejects (triton-lang/triton#9171, fixed upstream after Triton 3.6 by
    #9172 the same way: squeeze first). Only the interpreter is patched; compiled kernels are
    unaffected.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_squeezes_index", False):
        return

    def patch(tensor: type, scope: interpreter._LangPatchScope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch._squeezes_index = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch


def _round_to_e4m3_as_the_gpu_does() -> None:
    """Makes the interpreter's float -> e4m3 (``float8e4nv``) conversion round as the GPU does.

    Triton 3.6's interpreter converts bit by bit and gets e4m3 wrong: it rounds half up
    without carrying a mantissa overflow into the exponent (wrong values near powers of two)
    and flushes values below the smallest normal to zero instead of rounding to subnormals.
    Compiled kernels convert with ``cvt.rn.satfinite`` (round to nearest even), which is what
    torch's conversion does, so the interpreter gets torch's. Loads and conversions from
    e4m3 are exact in the interpreter and are left alone. Only the interpreter is patched.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float
    if getattr(original, "_torch_e4m3", False):
        return

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if output_dtype != tl.float8e4nv or input_dtype.primitive_bitwidth <= 8:
            return original(input, input_dtype, output_dtype, rounding_mode)
        if input_dtype == tl.bfloat16:  # held as its uint16 bits
            values = (np.asarray(input).astype(np.uint32) << 16).view(np.float32)
        else:
            values = np.asarray(input).astype(np.float32)
        out = torch.from_numpy(np.ascontiguousarray(values)).to(torch.float8_e4m3fn)
        return out.view(torch.uint8).numpy().reshape(np.shape(input))

    convert._torch_e4m3 = True  # type: ignore[attr-defined]
    interpreter._convert_float = convert


if os.environ.get("TRITON_INTERPRET") == "1":
    _index_scalar_with_numpy_2_4()
    _round_to_e4m3_as_the_gpu_does()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips this directory's tests marked ``gpu`` where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    here = Path(__file__).parent
    for item in items:
        if "gpu" in item.keywords and here in item.path.parents:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """Fresh inputs per test case, reproducible from the test id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class PagedKV:
    """A KV pool with several sequences at scattered slots, as ForwardBatch describes them.

    Slots are a random permutation of the pool; slots no sequence owns hold NaN and fill
    req_to_token past each seq_len, so a kernel that reads past a sequence's end produces NaN.
    """

    k_buf: torch.Tensor  # [S, Hkv, D]
    v_buf: torch.Tensor
    req_to_token: torch.Tensor  # [rows, max_context] int32
    req_rows: torch.Tensor  # [B] int32
    seq_lens: torch.Tensor  # [B] int32
    q_starts: torch.Tensor  # [B] int32
    q_lens: torch.Tensor  # [B] int32
    out_slots: torch.Tensor  # [T] int64 slots of the new tokens, packed
    positions: torch.Tensor  # [T] int64

    @property
    def max_q_len(self) -> int:
        return int(self.q_lens.max())

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max())


def _int32(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def make_paged_kv(
    prefix_lens: list[int],
    q_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    spare_slots: int = 7,
) -> PagedKV:
    """Random K/V for sequences of ``prefix_len + q_len`` tokens, all of them already in the pool."""
    seq_lens = [p + q for p, q in zip(prefix_lens, q_lens, strict=True)]
    batch, num_slots = len(seq_lens), sum(seq_lens) + spare_slots
    k_buf = torch.randn(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_buf = torch.randn_like(k_buf)
    perm = torch.randperm(num_slots, device=device)
    spare = perm[sum(seq_lens) :]
    k_buf[spare] = float("nan")
    v_buf[spare] = float("nan")
    # More rows than sequences, used in shuffled order, like a live req_to_token table.
    rows = torch.randperm(batch + 2, device=device)[:batch]
    max_context = max(seq_lens) + 3
    table = spare[torch.randint(0, spare_slots, (batch + 2, max_context), device=device)]
    table = table.to(torch.int32)
    out_slots, positions, start = [], [], 0
    for b, (seq_len, q_len) in enumerate(zip(seq_lens, q_lens, strict=True)):
        own = perm[start : start + seq_len]
        start += seq_len
        table[rows[b], :seq_len] = own.to(torch.int32)
        out_slots.append(own[seq_len - q_len :])
        positions.append(torch.arange(seq_len - q_len, seq_len, device=device))
    q_starts = [sum(q_lens[:b]) for b in range(batch)]
    return PagedKV(
        k_buf=k_buf,
        v_buf=v_buf,
        req_to_token=table,
        req_rows=rows.to(torch.int32),
        seq_lens=_int32(seq_lens, device),
        q_starts=_int32(q_starts, device),
        q_lens=_int32(q_lens, device),
        out_slots=torch.cat(out_slots).to(torch.int64),
        positions=torch.cat(positions).to(torch.int64),
    )


@pytest.fixture
def paged_kv() -> Callable[..., PagedKV]:
    return make_paged_kv


FP8 = torch.float8_e4m3fn


def make_fp8_pool(
    paged: PagedKV, k_scale: float = 0.05, v_scale: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``paged``'s pool stored in e4m3 with these scales, as the FP8 store writes it (NaN stays
    NaN): ``(k_buf, v_buf, k_scale, v_scale)``. The scales put the values well inside e4m3's
    range, but not at 1.0, so a kernel that forgets one is far off."""
    device = paged.k_buf.device
    ks = torch.tensor(k_scale, dtype=torch.float32, device=device)
    vs = torch.tensor(v_scale, dtype=torch.float32, device=device)
    k_buf = (paged.k_buf.float() / ks).clamp(-448, 448).to(FP8)
    v_buf = (paged.v_buf.float() / vs).clamp(-448, 448).to(FP8)
    return k_buf, v_buf, ks, vs


@pytest.fixture
def fp8_pool() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    return make_fp8_pool
