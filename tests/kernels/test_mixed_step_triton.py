"""Mixed steps on the Triton attention backend and Triton ops (the interpreter on CPU, fp32):
the runner's one MIXED forward gives what its prefill and decode parts give as two steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightllm_grpc.layers.forward_batch import ForwardMode
from lightllm_grpc.layers.ops import Ops
from tests.model_factory import make_tiny_model
from tests.runner_harness import run_parity

VOCAB = 512


@pytest.mark.skipif(torch.cuda.is_available(), reason="the harness runs the model on CPU")
def test_triton_mixed_steps_match_separate_prefill_and_decode(tmp_path: Path) -> None:
    model_dir = make_tiny_model("llama3", tmp_path / "llama3", vocab_size=VOCAB)
    merged, _ = run_parity(model_dir, Ops.triton(), VOCAB)
    assert merged.modes.count(ForwardMode.MIXED) == 3
