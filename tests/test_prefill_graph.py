"""Prefill CUDA graphs on the CPU: buckets, eligibility, and the padding a graph replays.

``EagerReplay`` is ``CudaGraphPrefill`` with the replay swapped for an eager forward on the
same static buffers: everything the graph path does but the capture. Padded and unpadded
forwards must give the same logits and the same K/V in every slot but the padding one.
The graphs themselves are checked on a GPU (tests/test_gpu.py).
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lightllm_grpc.cli import build_parser, server_config, shard_config
from lightllm_grpc.config import ShardConfig
from lightllm_grpc.layers.attention.base import KVCache
from lightllm_grpc.layers.attention.torch_backend import TorchAttentionBackend
from lightllm_grpc.layers.forward_batch import ForwardMode
from lightllm_grpc.layers.ops import Ops
from lightllm_grpc.models.config import ModelConfig
from lightllm_grpc.models.loader import load_model
from lightllm_grpc.proto import shard_pb2
from lightllm_grpc.shard.prefill_graph import CudaGraphPrefill, prefill_graph_sizes
from lightllm_grpc.shard.runner import ModelRunner
from lightllm_grpc.shard.worker import prefill_graph_tokens
from tests.model_factory import build_batch, make_tiny_model

VOCAB = 512
ROWS, CONTEXT = 4, 96


class EagerReplay(CudaGraphPrefill):
    """The graph path without a GPU: pad into the static buffers, then run what the graph holds."""

    def replay(self, size: int) -> torch.Tensor:
        return self.run(size)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model("llama3", tmp_path_factory.mktemp("model") / "llama3", vocab_size=VOCAB)


def load(model_dir: Path, ops: Ops | None = None) -> torch.nn.Module:
    if ops is None:
        return load_model(model_dir, device="cpu", dtype="float32", attn_backend=TorchAttentionBackend())
    cfg = ModelConfig.from_pretrained(model_dir)
    backend = ops.attention(ROWS + 1, cfg.num_heads, cfg.head_dim, "cpu", torch.float32)
    return load_model(model_dir, device="cpu", dtype="float32", attn_backend=backend, ops=ops)


def test_buckets_end_at_the_maximum_and_pad_by_at_most_half() -> None:
    assert prefill_graph_sizes(512) == [16, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    assert prefill_graph_sizes(100) == [16, 32, 48, 64, 96, 100]
    assert prefill_graph_sizes(40) == [16, 32, 40]
    assert prefill_graph_sizes(16) == [16]
    assert prefill_graph_sizes(5) == [5]
    assert prefill_graph_sizes(0) == []
    for top in (1, 17, 300, 512, 2048):
        sizes = prefill_graph_sizes(top)
        assert sizes == sorted(set(sizes)) and sizes[-1] == top
        for t in range(1, top + 1):
            size = min(s for s in sizes if s >= t)
            assert size <= max(32, t * 3 // 2 + 1), (top, t, size)


def _graph(forward, table: torch.Tensor, max_tokens: int, pad_slot: int) -> EagerReplay:
    return EagerReplay(forward, table, table.shape[0] - 1, pad_slot, max_tokens, torch.device("cpu"))


def test_only_one_sequence_prefills_up_to_the_maximum_fit() -> None:
    table = torch.zeros(ROWS + 1, CONTEXT, dtype=torch.int32)
    table[:ROWS] = torch.arange(ROWS * CONTEXT, dtype=torch.int32).view(ROWS, CONTEXT)
    calls = []
    graph = _graph(lambda ids, b: calls.append(b.num_tokens), table, 40, ROWS * CONTEXT)

    def fits(mode: ForwardMode, tokens: list[list[int]]) -> bool:
        return graph.fits(build_batch(mode, tokens, [0] * len(tokens), list(range(len(tokens))), table)[1])

    assert fits(ForwardMode.PREFILL, [[1] * 40]) and fits(ForwardMode.PREFILL, [[1]])
    assert not fits(ForwardMode.PREFILL, [[1] * 41])
    assert not fits(ForwardMode.PREFILL, [[1] * 3, [2] * 3])
    assert not fits(ForwardMode.DECODE, [[1]])
    ids, batch = build_batch(ForwardMode.PREFILL, [[1] * 8], [0], [0], table)
    batch.logits_indices = torch.arange(8)  # prompt logprobs: logits at every token
    assert not graph.fits(batch)
    graph(ids, batch)  # runs eagerly, unpadded
    assert calls == [8] and graph.replays == 0


def _kv_copy(kv: KVCache) -> KVCache:
    clone = copy.copy(kv)  # the same dtype and scales, its own K/V tensors
    clone.k, clone.v = [t.clone() for t in kv.k], [t.clone() for t in kv.v]
    return clone


def check_padding(model: torch.nn.Module, cases: list[tuple[int, int, int]], max_tokens: int) -> None:
    """For each ``(prefix_len, num_tokens, bucket)``: a prompt whose first ``prefix_len`` tokens
    are already cached (on row 1) is prefilled padded to ``bucket`` through ``EagerReplay`` and
    unpadded; logits and every K/V slot but the padding one must match."""
    rng = random.Random(7)
    pool = ROWS * CONTEXT
    table = torch.zeros(ROWS + 1, CONTEXT, dtype=torch.int32)  # + the padding row
    table[:ROWS] = torch.randperm(pool, generator=torch.Generator().manual_seed(0)).int().view(ROWS, CONTEXT)
    for prefix_len, num_tokens, bucket in cases:
        kv = model.kv_cache_spec.make_cache(pool + 1, torch.float32, "cpu")  # + the padding slot
        tokens = [rng.randrange(3, VOCAB) for _ in range(prefix_len + num_tokens)]
        with torch.no_grad():
            if prefix_len:
                model(*build_batch(ForwardMode.PREFILL, [tokens[:prefix_len]], [0], [1], table), kv)
            ref_kv = _kv_copy(kv)
            ids, batch = build_batch(ForwardMode.PREFILL, [tokens[prefix_len:]], [prefix_len], [1], table)
            ref = model(ids, batch, ref_kv)
            graph = _graph(lambda i, b, kv=kv: model(i, b, kv), table, max_tokens, pool)
            assert graph.fits(batch)
            out = graph(ids, batch)
        assert graph.pad(ids, batch) == bucket and graph.replays == 1
        where = f"prefix {prefix_len}, {num_tokens} tokens in bucket {bucket}"
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m, w=where: f"{w}: {m}")
        for layer in range(len(kv.k)):  # the padding tokens wrote the padding slot only
            for ours, theirs in ((kv.k[layer], ref_kv.k[layer]), (kv.v[layer], ref_kv.v[layer])):
                torch.testing.assert_close(ours[:pool], theirs[:pool], rtol=1e-5, atol=1e-5)


# (cached prefix, new tokens, bucket): padded, exactly at a bucket, one past it, after a prefix.
PADDING_CASES = [(0, 5, 16), (0, 16, 16), (0, 17, 32), (0, 40, 40), (9, 23, 32), (21, 32, 32), (30, 1, 16)]


def test_padded_prefill_equals_the_unpadded_one(model_dir: Path) -> None:
    check_padding(load(model_dir), PADDING_CASES, 40)


def test_padding_tokens_never_write_an_earlier_prefills_slots(model_dir: Path) -> None:
    """A 20-token prefill after a 30-token one in the same bucket: the buffers still hold the
    first prompt's slots past token 20, which padding must not write again."""
    model = load(model_dir)
    pool = ROWS * CONTEXT
    table = torch.zeros(ROWS + 1, CONTEXT, dtype=torch.int32)
    table[:ROWS] = torch.arange(pool, dtype=torch.int32).view(ROWS, CONTEXT)
    kv = model.kv_cache_spec.make_cache(pool + 1, torch.float32, "cpu")
    graph = _graph(lambda i, b: model(i, b, kv), table, 32, pool)
    first, second = list(range(10, 40)), list(range(100, 120))
    with torch.no_grad():
        graph(*build_batch(ForwardMode.PREFILL, [first], [0], [0], table))
        before = _kv_copy(kv)
        ids, batch = build_batch(ForwardMode.PREFILL, [second], [0], [1], table)
        out = graph(ids, batch)
        ref = model(ids, batch, _kv_copy(before))
    assert graph.replays == 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    first_slots = table[0, : len(first)].long()
    for layer in range(len(kv.k)):
        assert torch.equal(kv.k[layer][first_slots], before.k[layer][first_slots])
        assert torch.equal(kv.v[layer][first_slots], before.v[layer][first_slots])


def _greedy_row(row: int) -> shard_pb2.RowSampling:
    return shard_pb2.RowSampling(row=row, top_k=-1, top_p=1.0, repetition_penalty=1.0, logprobs=True)


def _prefill(
    step_id: int, entries: list[tuple[int, int, list[int], list[int]]], sample: bool = True
) -> shard_pb2.StepRequest:
    """Entries ``(row, start, tokens, prefix_slots)``; each token's slot is ``row * CONTEXT + position``."""
    step = shard_pb2.StepRequest(step_id=step_id)
    p = step.prefill
    for row, start, tokens, prefix in entries:
        p.rows.append(row)
        p.starts.append(start)
        p.lens.append(len(tokens))
        p.token_ids.extend(tokens)
        p.slots.extend(row * CONTEXT + start + i for i in range(len(tokens)))
        p.prefix_lens.append(len(prefix))
        p.prefix_slots.extend(prefix)
        p.sample.append(sample)
    return step


def _decode(step_id: int, rows: list[int], lens: list[int]) -> shard_pb2.StepRequest:
    step = shard_pb2.StepRequest(step_id=step_id)
    step.decode.rows.extend(rows)
    step.decode.slots.extend(r * CONTEXT + n for r, n in zip(rows, lens, strict=True))
    return step


def _script() -> list[shard_pb2.StepRequest]:
    """Prefills the graph takes (padded, at a bucket, after a cached prefix, a chunk's end) and
    the ones it leaves eager (two prompts, prompt logprobs, too long), with decodes between."""
    rng = random.Random(11)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    a = prompt(20)
    steps = [_prefill(1, [(0, 0, a, [])]), _decode(2, [0], [20]), _decode(3, [0], [21])]
    steps[0].admit.extend([_greedy_row(0)])
    # Row 1: a's first 16 tokens are a cached prefix (row 0's slots), then 16 new ones.
    cached = _prefill(4, [(1, 16, prompt(16), [0 * CONTEXT + i for i in range(16)])])
    cached.admit.append(_greedy_row(1))
    steps += [cached, _decode(5, [0, 1], [22, 32])]
    # Row 2: a 40-token prompt in chunks of 27 (too long: eager) and 13 (graphed after the first).
    b = prompt(40)
    chunk = _prefill(6, [(2, 0, b[:27], [])], sample=False)
    chunk.admit.append(_greedy_row(2))
    steps += [chunk, _prefill(7, [(2, 27, b[27:], [])]), _decode(8, [0, 1, 2], [23, 33, 40])]
    # Row 3: a short prompt (graphed); released, it comes back beside more tokens of row 2: two
    # prompts in one step (eager). Then row 1 asks prompt logprobs (eager).
    short = _prefill(9, [(3, 0, prompt(7), [])])
    short.admit.append(_greedy_row(3))
    two = _prefill(10, [(3, 0, prompt(5), []), (2, 41, prompt(3), [])])
    two.release_rows.append(3)
    two.admit.append(_greedy_row(3))
    logprobs = _prefill(11, [(1, 33, prompt(6), [])])
    logprobs.prefill.prompt_logprobs.append(True)
    logprobs.prefill.prompt_targets.extend(prompt(6))
    return [*steps, short, two, logprobs, _decode(12, [0, 1, 2, 3], [24, 39, 44, 5])]


def _run(model: torch.nn.Module, graphs: bool) -> tuple[list[shard_pb2.StepResult], int]:
    kv = model.kv_cache_spec.make_cache(ROWS * CONTEXT + 1, torch.float32, "cpu")
    cpu = torch.device("cpu")
    runner = ModelRunner(lambda i, b: model(i, b, kv), kv, VOCAB, ROWS, CONTEXT, cpu)
    graph = None
    if graphs:
        graph = EagerReplay(runner.forward, runner.req_to_token, runner.pad_row, runner.pad_slot, 20, cpu)
        runner.prefill_forward = graph
    results = [runner.step(s) for s in _script()]
    return results, graph.replays if graph else 0


def test_runner_prefills_through_the_graph_hook_as_eagerly(model_dir: Path) -> None:
    """The runner's eligible prefills go through ``prefill_forward``; tokens, logprobs and prompt
    logprobs equal an eager runner's over prefills, chunks, cached prefixes and decodes."""
    model = load(model_dir)
    graphed, replays = _run(model, graphs=True)
    eager, _ = _run(model, graphs=False)
    assert replays == 4  # row 0's prompt, row 1's after its prefix, row 2's last chunk, row 3's
    for ours, ref in zip(graphed, eager, strict=True):
        assert list(ours.rows) == list(ref.rows) and list(ours.token_ids) == list(ref.token_ids)
        np.testing.assert_allclose(ours.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours.prompt_logprobs, ref.prompt_logprobs, rtol=1e-5, atol=1e-5)
    assert sum(len(r.token_ids) for r in graphed) > 10


def test_flag_reaches_the_shard_config(tmp_path: Path) -> None:
    model = tmp_path / "m"
    serve = ["serve", "--model", str(model)]
    args = build_parser().parse_args([*serve, "--cuda-graph-max-prefill-tokens", "64"])
    assert server_config(args).shard.cuda_graph_max_prefill_tokens == 64
    default = server_config(build_parser().parse_args(serve))
    assert default.shard.cuda_graph_max_prefill_tokens == ShardConfig.cuda_graph_max_prefill_tokens == 512
    shard = ["shard", "--model", str(model), "--rank", "0", "--world-size", "1", "--listen", "127.0.0.1:1"]
    args = build_parser().parse_args([*shard, "--cuda-graph-max-prefill-tokens", "0"])
    assert shard_config(args).cuda_graph_max_prefill_tokens == 0
    with pytest.raises(ValueError, match="cuda_graph_max_prefill_tokens"):
        ShardConfig(model=model, cuda_graph_max_prefill_tokens=-1)


def test_graph_size_follows_flags_and_device() -> None:
    cuda, cpu, m = torch.device("cuda", 0), torch.device("cpu"), Path("m")
    cfg = ShardConfig(model=m, max_prefill_tokens=8192)
    assert prefill_graph_tokens(cfg, 4096, cuda) == 512
    assert prefill_graph_tokens(cfg, 4096, cpu) == 0
    assert prefill_graph_tokens(ShardConfig(model=m, cuda_graphs=False), 4096, cuda) == 0
    assert prefill_graph_tokens(ShardConfig(model=m, cuda_graph_max_prefill_tokens=0), 4096, cuda) == 0
    assert prefill_graph_tokens(ShardConfig(model=m, max_prefill_tokens=24), 4096, cuda) == 24
    assert prefill_graph_tokens(cfg, 100, cuda) == 100
