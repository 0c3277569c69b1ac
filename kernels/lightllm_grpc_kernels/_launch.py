"""Checks, block-size choices and the programmatic-dependent-launch switch shared by the launchers."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

# LIGHTLLM_GRPC_PDL=0 launches every kernel without programmatic dependent launch; a policy's
# name (see RELEASE_POLICIES) forces that policy instead of the per-graph choice.
PDL_ENV = "LIGHTLLM_GRPC_PDL"
_PDL_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("lightllm_grpc_pdl", default=None)

# When a kernel lets the next one in the stream be scheduled (``griddepcontrol.launch_dependents``):
# "wait": at its exit (the default trigger), "gemv": the one-token GEMVs at their start, the
# rest at exit, "all": every kernel at its start. Releasing early lets the next kernel's
# programs take the SMs the current one leaves idle in its last wave (a GEMV's tail) and hides
# its launch, but the waiting programs also hold SM slots: which policy wins depends on the
# graph (H200, batch-1 decode: "all" -3.8% for FP8 weights and +1% for bf16, "gemv" -1% for
# bf16; BENCHMARKS.md), so decode graphs are captured with each and keep the fastest.
RELEASE_POLICIES = ("wait", "gemv", "all")
# The PDL constexpr of a kernel: 0 launched normally, WAIT_ONLY wait at the start, RELEASE_EARLY
# release the next kernel at the start, then wait.
WAIT_ONLY, RELEASE_EARLY = 1, 2
_RELEASE_EARLY = tl.constexpr(RELEASE_EARLY)


def on_gpu(t: torch.Tensor) -> bool:
    """True when kernels run compiled; on CPU they run in Triton's (slow) interpreter."""
    return t.is_cuda


@functools.cache
def _sm90_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def hopper_or_newer(t: torch.Tensor) -> bool:
    """Whether ``t`` is on a CUDA device of compute capability 9 or newer (programmatic
    dependent launch, TMA tensor descriptors)."""
    if not t.is_cuda:
        return False
    return _sm90_or_newer(t.device.index if t.device.index is not None else torch.cuda.current_device())


@contextlib.contextmanager
def programmatic_launch(release: str = "wait") -> Iterator[None]:
    """Launches inside use programmatic dependent launch where the device has it (see ``pdl``),
    and let their successors be scheduled as ``release`` (one of ``RELEASE_POLICIES``) says.

    Scoped, not global: it pays where a step is a chain of these kernels (decode graphs of up
    to 8 rows) and measured slower where they alternate with cuBLAS GEMMs (32 rows and more).
    """
    assert release in RELEASE_POLICIES, f"release must be one of {RELEASE_POLICIES}, got {release!r}"
    token = _PDL_SCOPE.set(release)
    try:
        yield
    finally:
        _PDL_SCOPE.reset(token)


def forced_release() -> str | None:
    """The release policy ``LIGHTLLM_GRPC_PDL`` forces, or None (choose per graph). With "0" no
    kernel uses PDL (``pdl``), so the policy is moot: "wait", and one capture does."""
    value = os.environ.get(PDL_ENV, "")
    if value == "0":
        return "wait"
    return value if value in RELEASE_POLICIES else None


def pdl(t: torch.Tensor, gemv: bool = False) -> dict[str, int | bool]:
    """Launch keywords for a kernel that starts with ``wait_for_predecessor(PDL)``; ``gemv``:
    the kernel is a one-token GEMV (the "gemv" release policy).

    On Hopper (and newer) a kernel launched with programmatic dependent launch is scheduled
    while the kernel before it in the stream is still finishing, and waits for it in-kernel
    (``gdc_wait``: its completion and memory flush) before touching memory, which hides part
    of a boundary's launch latency (~0.2 µs a kernel in a batch-1 decode graph). Only inside
    ``programmatic_launch()``, unless ``LIGHTLLM_GRPC_PDL=0``. The launch attribute and the
    kernel's wait come from this one place, so no kernel is launched early without waiting.
    """
    scope = _PDL_SCOPE.get()
    if scope is None or os.environ.get(PDL_ENV) == "0" or not hopper_or_newer(t):
        return {"PDL": False}
    release = forced_release() or scope
    early = release == "all" or (release == "gemv" and gemv)
    return {"PDL": RELEASE_EARLY if early else WAIT_ONLY, "launch_pdl": True}


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):
    """First statement of every kernel here: with PDL, wait until the previous kernel in the
    stream has finished and its writes are visible (a no-op when launched without PDL).

    ``PDL == RELEASE_EARLY`` first lets the next kernel be scheduled: safe, because that one
    too waits for this one's completion before it reads or writes anything, and this one's
    completion includes its own wait."""
    if PDL:
        if PDL == _RELEASE_EARLY:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


def check_rows(t: torch.Tensor, name: str, ndim: int, dtype: torch.dtype | None = None) -> None:
    """Asserts rank, dtype and a unit stride on the last dim (kernels pass the other strides)."""
    assert t.dim() == ndim, f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}"
    assert t.stride(-1) == 1, f"{name}: last dim must be contiguous, strides {t.stride()}"
    if dtype is not None:
        assert t.dtype == dtype, f"{name}: expected {dtype}, got {t.dtype}"


def check_index(t: torch.Tensor, name: str, length: int, dtype: torch.dtype) -> None:
    """Asserts a contiguous 1-D index tensor of the given length and dtype."""
    assert t.shape == (length,), f"{name}: expected shape ({length},), got {tuple(t.shape)}"
    assert t.dtype == dtype, f"{name}: expected {dtype}, got {t.dtype}"
    assert t.is_contiguous(), f"{name} must be contiguous"


def block(n: int) -> int:
    """The power-of-two block that covers ``n`` elements (tl.arange needs a power of two)."""
    return triton.next_power_of_2(n)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact IEEE for fp32 inputs; the TF32 setting is moot for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


# An FP8 KV cache stores e4m3 (``torch.float8_e4m3fn``) with one fp32 scale per layer for K
# and one for V: stored = clamp(x / scale, -448, 448), read = stored * scale.
FP8_KV = torch.float8_e4m3fn
FP8_KV_MAX = float(torch.finfo(FP8_KV).max)  # 448


def check_kv_cache(
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    dtype: torch.dtype,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> bool:
    """Asserts a contiguous K/V pool pair ``[S, Hkv, D]`` in ``dtype``, or in e4m3 with both
    scales given (one fp32 element each, on the pool's device); returns whether it is FP8."""
    fp8 = k_buf.dtype == FP8_KV
    for name, buf in (("k_buf", k_buf), ("v_buf", v_buf)):
        check_rows(buf, name, 3, FP8_KV if fp8 else dtype)
        assert buf.is_contiguous(), f"{name} must be contiguous"
    assert k_buf.shape == v_buf.shape, f"k_buf {tuple(k_buf.shape)} != v_buf {tuple(v_buf.shape)}"
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not fp8:
            assert scale is None, f"{name} is for an FP8 ({FP8_KV}) cache; this one is {k_buf.dtype}"
            continue
        assert scale is not None, f"an FP8 cache needs {name}"
        assert scale.dtype == torch.float32 and scale.numel() == 1, f"{name}: one fp32 element"
        assert scale.device == k_buf.device, f"{name} on {scale.device}, cache on {k_buf.device}"
    return fp8


def quantize_kv_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Torch reference of the FP8 store: ``x / scale`` in fp32, clamped to ±448, rounded to e4m3."""
    return (x.float() / scale.float()).clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV)


def dequantize_kv_ref(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A cache's rows in fp32: FP8 ones times their scale (``scale`` None: as stored)."""
    return x.float() if scale is None else x.float() * scale.float()
