"""The compile watch: Triton compiles after warm-up are counted and logged, earlier ones are not."""

from __future__ import annotations

import logging

import pytest
import torch

from lightllm_grpc.shard import compile_watch
from lightllm_grpc.shard.compile_watch import CompileWatch


def test_compiles_count_only_once_armed(caplog: pytest.LogCaptureFixture) -> None:
    watch = CompileWatch()
    watch.before("k1")
    watch.after("k1", "warm_kernel", "warm_kernel[num_warps=4](x: *bf16)")
    assert watch.compiles == 0
    watch.arm()
    with caplog.at_level(logging.WARNING, logger="lightllm_grpc.shard.compile_watch"):
        watch.before("k2")
        watch.after("k2", "late_kernel", "late_kernel[num_warps=4](n: i32)")
    assert watch.compiles == 1 and watch.seconds >= 0
    assert "late_kernel after warm-up" in caplog.text
    assert "warm_kernel" not in caplog.text


@pytest.fixture
def fresh_hooks(monkeypatch: pytest.MonkeyPatch):
    from triton import knobs

    calls: list[str] = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: calls.append("before") or None)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: calls.append("after") or None)
    monkeypatch.setattr(compile_watch, "_watch", None)
    return knobs, calls


def test_install_chains_to_hooks_already_set(fresh_hooks) -> None:
    knobs, calls = fresh_hooks
    watch = compile_watch.install()
    assert compile_watch.install() is watch  # idempotent: one watch per process
    watch.arm()

    class Fn:
        name = "some_kernel"

    assert knobs.runtime.jit_cache_hook(key="k", repr="r", fn=Fn()) is None  # None: do compile
    knobs.runtime.jit_post_compile_hook(key="k", repr="r", fn=Fn())
    assert calls == ["before", "after"]
    assert watch.compiles == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_compile_after_arming_is_seen(fresh_hooks) -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

    watch = compile_watch.install()
    x = torch.zeros(8, device="cuda")
    _add_one[(1,)](x, 8, BLOCK=8)
    assert watch.compiles == 0  # before arming: a warm-up compile
    watch.arm()
    _add_one[(1,)](x, 8, BLOCK=8)  # cached: no compile
    assert watch.compiles == 0
    _add_one[(1,)](x, 8, BLOCK=16)  # a new specialization
    assert watch.compiles == 1
    assert x.sum().item() == 24


def test_warmup_arms_the_watch_once_its_own_passes_are_done(fresh_hooks, tmp_path) -> None:
    from lightllm_grpc.config import ShardConfig
    from lightllm_grpc.shard.warmup import warmup
    from lightllm_grpc.shard.worker import build_shard
    from tests.model_factory import make_tiny_model

    model_dir = make_tiny_model("llama3", tmp_path / "llama3")
    cfg = ShardConfig(model=model_dir, device="cpu", max_total_tokens=256, max_rows=4, max_context=64)
    shard = build_shard(cfg, rank=0, world_size=1, init_method=None)
    watch = compile_watch.install()
    assert not watch.armed
    warmup(shard, max_prefill_tokens=16, max_batch_size=4)
    assert watch.armed

    # A second shard's warm-up in the same process (tests, benchmarks): its compiles are its own.
    armed_during = []
    step = shard.runner.step
    shard.runner.step = lambda msg: (armed_during.append(watch.armed), step(msg))[1]
    warmup(shard, max_prefill_tokens=16, max_batch_size=4)
    assert armed_during and not any(armed_during)
    assert watch.armed


def test_warmup_runs_a_long_and_a_short_prefill(tmp_path) -> None:
    """Prefill attention compiles one variant for long chunks (TMA on Hopper) and one for short
    ones (pointers): warm-up runs a prefill of each size, so neither compiles under a request."""
    from lightllm_grpc.config import ShardConfig
    from lightllm_grpc.shard.warmup import SHORT_PREFILL, warmup
    from lightllm_grpc.shard.worker import build_shard
    from tests.model_factory import make_tiny_model

    model_dir = make_tiny_model("llama3", tmp_path / "llama3")
    cfg = ShardConfig(model=model_dir, device="cpu", max_total_tokens=256, max_rows=4, max_context=64)
    shard = build_shard(cfg, rank=0, world_size=1, init_method=None)
    prefills: list[int] = []
    step = shard.runner.step
    shard.runner.step = lambda msg: (prefills.append(len(msg.prefill.slots)), step(msg))[1]
    warmup(shard, max_prefill_tokens=48, max_batch_size=4)
    assert [n for n in prefills if n] == [48, SHORT_PREFILL]


def test_mixed_decode_rows_give_every_split_count_once() -> None:
    """Warm-up runs one mixed step per split count of the decode attention, with the fewest rows
    that get it: every count a batch of up to N rows can use, none twice."""
    from lightllm_grpc_kernels.decode_attention import decode_num_splits

    from lightllm_grpc.shard.warmup import mixed_decode_rows

    for n in (1, 3, 8, 40, 512):
        rows = mixed_decode_rows(n)
        splits = [decode_num_splits(b) for b in rows]
        assert sorted(set(splits)) == sorted({decode_num_splits(b) for b in range(1, n + 1)})
        assert len(splits) == len(set(splits)) and max(rows) <= n
        assert all(decode_num_splits(b - 1) != decode_num_splits(b) for b in rows if b > 1)


def test_mixed_warmup_steps_run_a_prompt_beside_each_row_count(tmp_path) -> None:
    """The steps themselves (on GPU only in warm-up) are valid mixed steps for the runner."""
    from lightllm_grpc.config import ShardConfig
    from lightllm_grpc.shard import warmup as warm
    from lightllm_grpc.shard.worker import build_shard
    from tests.model_factory import make_tiny_model

    model_dir = make_tiny_model("llama3", tmp_path / "llama3")
    cfg = ShardConfig(model=model_dir, device="cpu", max_total_tokens=256, max_rows=40, max_context=64)
    runner = build_shard(cfg, rank=0, world_size=1, init_method=None).runner
    seen: list[tuple[int, int, list[int]]] = []
    step = runner.step
    runner.step = lambda msg: (
        seen.append((len(msg.decode.rows), len(msg.prefill.slots), list(msg.decode.group_sizes))),
        step(msg),
    )[1]
    warm._mixed_steps(runner, batch=40)
    want = []
    for rows in warm.mixed_decode_rows(39):
        want.append((rows, warm.SHORT_PREFILL, []))
        # then in prefix groups of two (an odd last row alone); 1 row's split count as 2 rows
        n = max(rows, 2)
        want.append((n, warm.SHORT_PREFILL, [2, 0] * (n // 2) + [0] * (n % 2)))
    assert seen == want
    assert runner.live_rows() == 0  # each step's rows released after it
