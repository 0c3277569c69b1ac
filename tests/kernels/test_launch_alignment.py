"""Every Triton launch of a runner's steps sees each tensor argument with one 16-byte alignment.

Triton compiles a kernel per pointer alignment (16-byte divisibility is part of the
specialization). A tensor that is a view at a size-dependent offset into a packed buffer is
aligned for some batches and not others, so the other variant compiles under a live step, for
~0.5 s, whenever a batch of the other parity first comes: the decode rows' ``req_rows`` (11-27),
a mixed step's ``group_sizes`` and an odd prompt length's positions (11-28). This runs steps of
both parities through the CPU interpreter, with the GPU's sampler kernels, and checks each
argument's alignment never changes (it also fails with the sampler's seed/counter upload
unpadded, the 11-27 fix there).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from triton.runtime import interpreter

from lightllm_grpc.layers.ops import Ops
from lightllm_grpc.shard.warmup import mixed_step, prefill_step
from tests.model_factory import make_tiny_model
from tests.runner_harness import make_runners, scenario

VOCAB = 512
# Launched by these steps, with an index tensor from the step's packed upload each.
KERNELS = (
    "_rotary_store_kv_kernel",
    "_prefill_attention_kernel",
    "_shared_prefix_kernel",
    "_decode_stage1_kernel",
    "_sample_kernel",
)
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="hooks the interpreter's launches (CPU only)"
)


def _steps(capacity: int):
    for tokens in (3, 4):  # odd and even packed token counts
        yield prefill_step(0, tokens, capacity)
    for rows in (1, 2, 4):  # 4 divides 4 rows, not 2 (a packed int32 view b in)
        yield mixed_step(rows, capacity)
        if rows > 1:
            yield mixed_step(rows, capacity, grouped=True)


def test_each_kernel_argument_keeps_one_alignment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    aligned: dict[tuple[str, str], set[bool]] = defaultdict(set)
    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        named = [*zip(self.arg_names, args, strict=False), *kwargs.items()]
        for name, value in named:
            if isinstance(value, torch.Tensor):
                aligned[(self.fn.__name__, name)].add(value.data_ptr() % 16 == 0)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", recording_run)
    recorded, _ = make_runners(make_tiny_model("llama3", tmp_path / "llama3", vocab_size=VOCAB), Ops.triton())
    runner = recorded.runner
    runner.sampler.kernels = True  # the GPU's sampler: seeds and counters come from an upload too
    for step in _steps(runner.kv_capacity):
        runner.step(step)
        runner.reset()
    for step in scenario(VOCAB):  # decode steps, prefix groups, prompt logprobs, chunks
        runner.step(step)
    kernels = {kernel for kernel, _ in aligned}
    assert set(KERNELS) <= kernels, f"not launched: {set(KERNELS) - kernels}"
    varies = sorted(key for key, seen in aligned.items() if len(seen) > 1)
    assert not varies, f"arguments aligned in some launches and not others: {varies}"
