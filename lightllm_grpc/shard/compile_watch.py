"""Reports Triton kernels compiled after warm-up: each one stalled a live step.

Triton compiles a kernel the first time it sees a new specialization (constexpr values,
dtypes, integer arguments equal to 1 or divisible by 16). Warm-up runs the shapes the
coordinator will send so serving never waits for that; a specialization it missed costs
the step that needs it a compile (0.1-1 s, longer when the on-disk cache is cold), which
shows only as an unexplained latency spike. Once armed (at the end of warm-up), this watch
logs every such compile with its kernel, specialization and duration, and counts them.

It uses Triton's JIT hooks (``triton.knobs.runtime.jit_cache_hook``, called before a
compile, and ``jit_post_compile_hook``, after it), chaining to any hooks already set. In
Triton's interpreter (CPU) nothing compiles, so nothing is reported there.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class CompileWatch:
    """Counts and logs JIT compiles; ``armed`` decides whether a compile is worth a warning."""

    armed: bool = False
    compiles: int = 0  # after arming
    seconds: float = 0.0  # their total compile time
    _started: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def arm(self) -> None:
        """From now on every compile is one a live step waited for."""
        self.armed = True

    def disarm(self) -> None:
        """A warm-up runs: its compiles are expected (another shard built in this process, as
        tests and benchmarks do, armed the watch with its own warm-up)."""
        self.armed = False

    def before(self, key: Any) -> None:
        with self._lock:
            self._started[str(key)] = time.perf_counter()

    def after(self, key: Any, name: str, specialization: str) -> None:
        with self._lock:
            started = self._started.pop(str(key), None)
            took = time.perf_counter() - started if started is not None else 0.0
            if not self.armed:
                return
            self.compiles += 1
            self.seconds += took
        log.warning(
            "Triton compiled %s after warm-up in %.2f s (a specialization warm-up did not run; "
            "the step that needed it waited): %s", name, took, specialization,
        )  # fmt: skip


_watch: CompileWatch | None = None


def install() -> CompileWatch:
    """The process's watch, installed into Triton's hooks on the first call (idempotent)."""
    global _watch
    if _watch is not None:
        return _watch
    watch = CompileWatch()
    try:
        from triton import knobs
    except ImportError:  # no Triton (or one without knobs): nothing compiles that we could see
        _watch = watch
        return watch
    prev_before, prev_after = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook

    def before(**kw: Any) -> bool | None:
        watch.before(kw["key"])
        return prev_before(**kw) if prev_before else None

    def after(**kw: Any) -> bool | None:
        fn = kw.get("fn")
        watch.after(kw["key"], getattr(fn, "name", "kernel"), _describe(kw))
        return prev_after(**kw) if prev_after else None

    knobs.runtime.jit_cache_hook = before
    knobs.runtime.jit_post_compile_hook = after
    _watch = watch
    return watch


def _describe(kw: dict[str, Any]) -> str:
    """The compile's constexpr values by parameter name and its specialization attributes
    (pointer alignment, integers equal to 1 or divisible by 16): what a warm-up must match."""
    info = kw.get("compile") or {}
    fn = getattr(kw.get("fn"), "jit_function", None)
    names = list(getattr(fn, "arg_names", []) or [])

    def name(path: Any) -> str:
        i = path[0] if isinstance(path, tuple) and path else path
        return names[i] if isinstance(i, int) and i < len(names) else str(path)

    consts = ", ".join(f"{name(k)}={v}" for k, v in (info.get("constants") or {}).items())
    attrs = "; ".join(
        f"{name(k)}: {v}" for config in info.get("configs") or () for k, v in dict(config).items()
    )
    return f"constexprs ({consts}); attributes ({attrs})"[:1500]
