"""The piecewise graphs' pieces with the Triton kernels (interpreted on CPU): the add+RMSNorm
that updates the residual buffer in place, rotary in place on the q/k/v projection, the KV
store kernel inside a piece, and the prefill and decode attention kernels writing into the
static attention buffer between pieces."""

from __future__ import annotations

import pytest
import torch

from lightllm_grpc.layers.ops import Ops
from tests.model_factory import make_tiny_model
from tests.test_piecewise_graph import VOCAB, assert_pools, load, make_batch, random_pool, run_both

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU check; tests/test_gpu.py replays real graphs"
)


def test_pieces_with_triton_kernels_are_the_forward(tmp_path) -> None:
    model = load(make_tiny_model("qwen3", tmp_path / "qwen3", vocab_size=VOCAB), Ops.triton())
    table, kv = random_pool(model)
    # MIXED at a bucket (16 tokens): bit for bit.
    ref, eager_kv, out, pieces_kv, _ = run_both(
        model, table, kv, ([(0, 0, 7), (1, 9, 5)], [(2, 30), (3, 1), (4, 12), (5, 62)]), 16
    )
    assert torch.equal(out, ref)
    assert_pools(pieces_kv, eager_kv, exact=True)
    # PREFILL of two prompts padded from 11 to 16 tokens, and a padded MIXED batch.
    for case in (([(6, 4, 6), (7, 0, 5)], []), ([(1, 14, 3)], [(0, 33), (6, 50)])):
        ref, eager_kv, out, pieces_kv, graphs = run_both(model, table, kv, case, 16)
        assert graphs.pad(*make_batch(table, *case)) == 16
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert_pools(pieces_kv, eager_kv, exact=False)
