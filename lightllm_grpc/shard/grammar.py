"""Output constraints on the shard: compiled grammars, one matcher per row, token bitmasks.

Matchers live where the logits are, so a constrained row's mask never waits for a round
trip to the coordinator. A row's mask for step N+1 depends on its token from step N, which
the overlap scheduler has not brought to the host when step N+1 is launched: the runner
copies those tokens out *before* launching step N+1's forward and reads them after it (the
copy completes as soon as step N does, while N+1's forward runs), so masks are computed
while the device is busy (docs/structured-output.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lightllm_grpc.proto import shard_pb2

if TYPE_CHECKING:
    import xgrammar

log = logging.getLogger(__name__)
Kind = shard_pb2.Constraint.Kind
# Compiled grammars kept by content; a JSON schema over a 128k vocabulary is ~0.1-5 MB.
CACHE_LIMIT_BYTES = 512 << 20
# Whitespace characters allowed between JSON elements: a model that keeps choosing
# whitespace (small or undertrained ones do) would otherwise never finish the value.
JSON_MAX_WHITESPACE = 32
# xgrammar prefixes its errors with "[time] /path/file.cc:line: "; a caller wants the rest.
_ERROR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class ConstraintError(ValueError):
    """The constraint cannot be compiled; the message says why, for the caller."""


def _clean(exc: Exception) -> str:
    return _ERROR_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))


class GrammarCompiler:
    """Compiles constraints for one model's vocabulary, caching results by content (LRU).

    The tokenizer is read on first use, so shards that never see a constraint pay nothing.
    Thread-safe: compilation runs on the service's threads and, on a cache miss, on the
    step path.
    """

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_ids: tuple[int, ...]) -> None:
        self.model_dir = str(model_dir)
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._lock = threading.Lock()

    def _get(self) -> xgrammar.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                self._compiler = self._build()
            return self._compiler

    def _build(self) -> xgrammar.GrammarCompiler:
        try:
            import xgrammar as xgr
        except ImportError as exc:
            raise ConstraintError("structured output needs the xgrammar package on the shard") from exc
        from transformers import AutoTokenizer

        started = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(self.model_dir)
        info = xgr.TokenizerInfo.from_huggingface(
            tok, vocab_size=self.vocab_size, stop_token_ids=self.eos_ids
        )
        threads = max(1, min(8, (os.cpu_count() or 2) // 2))
        compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_limit_bytes=CACHE_LIMIT_BYTES)
        log.info("grammar compiler ready in %.2fs (%s)", time.perf_counter() - started, info.vocab_type)
        return compiler

    def compile(self, c: shard_pb2.Constraint) -> xgrammar.CompiledGrammar:
        compiler = self._get()
        try:
            if c.kind == Kind.KIND_JSON_SCHEMA:
                return compiler.compile_json_schema(_bounded_strings(c.spec), **_whitespace(c))
            if c.kind == Kind.KIND_JSON_OBJECT:
                return compiler.compile_json_schema('{"type": "object"}', **_whitespace(c))
            if c.kind == Kind.KIND_REGEX:
                return compiler.compile_regex(c.spec)
            if c.kind == Kind.KIND_EBNF:
                return compiler.compile_grammar(c.spec)
        except RuntimeError as exc:
            raise ConstraintError(f"{_KIND_NAMES.get(c.kind, 'constraint')}: {_clean(exc)}") from None
        raise ConstraintError(f"unknown constraint kind {c.kind}")


# Schema keys whose values are data, not subschemas, and keys whose values map names to subschemas.
_DATA_KEYS = frozenset({"enum", "const", "default", "examples"})
_NAMED = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_STRING_CHAR = r'[^"\\\x00-\x1f]'  # a JSON string character that needs no escape


def _bounded_strings(spec: str) -> str:
    """``spec`` with each length-bounded string schema spelled as a pattern.

    xgrammar 0.2.8 compiles minLength/maxLength strings to a character class that admits raw
    control characters (invalid JSON); a pattern of the characters that need no escape keeps
    the output valid and its length exact.
    """
    try:
        schema = json.loads(spec)
    except ValueError:
        return spec  # the compiler names the problem
    return json.dumps(_rewrite(schema))


def _rewrite(node: object) -> object:
    if isinstance(node, list):
        return [_rewrite(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: v if k in _DATA_KEYS else _rewrite_named(v) if k in _NAMED else _rewrite(v)
        for k, v in node.items()
    }
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and not ({"pattern", "format"} & out.keys()):
        low, high = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        out["pattern"] = f"^{_STRING_CHAR}{{{low},{'' if high is None else int(high)}}}$"
    return out


def _rewrite_named(node: object) -> object:
    return {k: _rewrite(v) for k, v in node.items()} if isinstance(node, dict) else node


def _whitespace(c: shard_pb2.Constraint) -> dict:
    if c.compact_json:
        return {"any_whitespace": False}
    return {"any_whitespace": True, "max_whitespace_cnt": JSON_MAX_WHITESPACE}


_KIND_NAMES = {
    Kind.KIND_JSON_SCHEMA: "json_schema",
    Kind.KIND_JSON_OBJECT: "json_object",
    Kind.KIND_REGEX: "regex",
    Kind.KIND_EBNF: "ebnf",
}


class PendingTokens:
    """A decode batch's input tokens (the previous step's samples) on their way to the host;
    ``positions`` are those of the constrained rows, ``rows`` their row ids."""

    def __init__(self, positions: np.ndarray, rows: np.ndarray, tokens: torch.Tensor) -> None:
        self.positions = positions
        self.rows = rows
        self.tokens = tokens
        self.event: torch.cuda.Event | None = None
        if tokens.is_cuda:
            # The whole batch's ids, in one pinned copy queued behind the previous step:
            # nothing here waits for the device.
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.tokens = host.copy_(tokens, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def values(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.tokens.numpy()[self.positions].tolist()


class RowGrammars:
    """One grammar matcher per constrained row, and the bitmask they fill each step."""

    def __init__(
        self, compiler: GrammarCompiler, max_rows: int, vocab_size: int, device: torch.device
    ) -> None:
        self.compiler = compiler
        self.vocab = vocab_size
        self.device = device
        self.max_rows = max_rows
        self.matchers: dict[int, xgrammar.GrammarMatcher] = {}
        # Rows whose last sampled token their matcher has not accepted yet.
        self.unaccepted = np.zeros(max_rows, dtype=bool)
        self._host_mask: torch.Tensor | None = None  # CPU: the mask itself
        self._dev_mask: torch.Tensor | None = None  # GPU: where each step's pinned mask goes
        self._batch: xgrammar.BatchGrammarMatcher | None = None
        self._stop_only: torch.Tensor | None = None

    def admit(self, row: int, c: shard_pb2.Constraint, generated_ids: list[int]) -> None:
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(self.compiler.compile(c), max_rollback_tokens=0)
        for i, token in enumerate(generated_ids):  # a resumed request: replay its output
            if not matcher.accept_token(token):
                log.warning("row %d: resumed token %d at %d breaks its constraint", row, token, i)
                break
        self.matchers[row] = matcher
        self.unaccepted[row] = False

    def release(self, row: int) -> None:
        self.matchers.pop(row, None)
        self.unaccepted[row] = False

    def pending(self, rows: np.ndarray, input_ids: Callable[[], torch.Tensor]) -> PendingTokens | None:
        """Start copying a decode batch's input ids (``input_ids()`` gives them, on the device) to
        the host when some of ``rows`` have matchers that still need their previous token (call
        before queueing the forward)."""
        if not self.matchers:
            return None
        want = self.unaccepted[rows]
        if not want.any():
            return None
        idx = np.flatnonzero(want)
        return PendingTokens(idx, rows[idx], input_ids())

    def accept(self, pending: PendingTokens) -> None:
        for row, token in zip(pending.rows.tolist(), pending.values()):
            matcher = self.matchers.get(row)
            self.unaccepted[row] = False
            if matcher is not None and not matcher.is_terminated() and not matcher.accept_token(token):
                log.warning("row %d: token %d was not allowed by its constraint", row, token)

    def constrained(self, rows: np.ndarray) -> np.ndarray:
        """Positions in ``rows`` of constrained rows."""
        if not self.matchers:
            return np.empty(0, dtype=np.int64)
        return np.flatnonzero([r in self.matchers for r in rows.tolist()])

    def apply(self, logits: torch.Tensor, rows: np.ndarray, positions: np.ndarray) -> None:
        """Mask ``logits`` rows at ``positions`` to the tokens their constraints allow next."""
        import xgrammar as xgr

        n = int(positions.max()) + 1
        host, dev = self._buffers(n)
        live, done = [], []
        for i in positions.tolist():
            matcher = self.matchers[int(rows[i])]
            (done if matcher.is_terminated() else live).append((i, matcher))
        if live:
            self._batch_matcher().batch_fill_next_token_bitmask(
                [m for _, m in live], host, indices=[i for i, _ in live]
            )
        for i, _ in done:  # only a stop token may follow; its token is void at the coordinator
            host[i] = self._stop_mask(host.shape[1])
        index = torch.from_numpy(positions.astype(np.int32))
        if dev.is_cuda:
            # Pinned sources and non-blocking copies: queued behind the forward, never waiting
            # for it. The caching host allocator keeps each pinned block until its copy ran.
            dev.copy_(host, non_blocking=True)
            index = index.pin_memory().to(self.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, dev, vocab_size=self.vocab, indices=index)
        self.unaccepted[rows[positions]] = True

    def _buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A host mask for ``n`` rows and the device rows it goes to (the same on CPU)."""
        import xgrammar as xgr

        shape = xgr.get_bitmask_shape(self.max_rows, self.vocab)
        if self.device.type != "cuda":
            if self._host_mask is None:
                self._host_mask = torch.zeros(shape, dtype=torch.int32)
            return self._host_mask[:n], self._host_mask[:n]
        if self._dev_mask is None:
            self._dev_mask = torch.zeros(shape, dtype=torch.int32, device=self.device)
        return torch.empty((n, shape[1]), dtype=torch.int32, pin_memory=True), self._dev_mask[:n]

    def _batch_matcher(self) -> xgrammar.BatchGrammarMatcher:
        if self._batch is None:
            import xgrammar as xgr

            self._batch = xgr.BatchGrammarMatcher(max(1, min(8, (os.cpu_count() or 2) // 2)))
        return self._batch

    def _stop_mask(self, words: int) -> torch.Tensor:
        if self._stop_only is None:
            mask = np.zeros(words, dtype=np.uint32)
            for token in self.compiler.eos_ids:
                mask[token // 32] |= np.uint32(1 << (token % 32))
            self._stop_only = torch.from_numpy(mask.view(np.int32))
        return self._stop_only
