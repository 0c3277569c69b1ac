"""The prefill graphs' padding with the Triton kernels (interpreted on CPU): the attention
grid is sized by the bucket, and its programs past the real tokens must change nothing."""

from __future__ import annotations

import pytest
import torch

from lightllm_grpc.layers.ops import Ops
from tests.model_factory import make_tiny_model
from tests.test_prefill_graph import VOCAB, check_padding, load


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU check; tests/test_gpu.py replays real graphs")
def test_padded_prefill_equals_the_unpadded_one_with_triton_kernels(tmp_path) -> None:
    model_dir = make_tiny_model("llama3", tmp_path / "llama3", vocab_size=VOCAB)
    check_padding(load(model_dir, Ops.triton()), [(0, 5, 16), (9, 23, 32), (0, 16, 16)], 32)
