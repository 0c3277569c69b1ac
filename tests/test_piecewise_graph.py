"""Piecewise CUDA graphs on the CPU: the pieces, the static buffers, the padding and the dispatch.

``PiecewiseCudaGraphs`` runs its pieces eagerly until ``capture`` is called, through the same
static buffers and padding as the graphs, so everything but the capture is checked here
against the plain forward: bit for bit where the token count is a bucket (no padding: the same
kernels on the same shapes), and within rounding where padding changes a matmul's row count
(BLAS may then block the rows differently). Padding rows must never reach a real row or a real
KV slot. The graphs themselves are checked on a GPU (tests/test_gpu.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from lightllm_grpc.cli import build_parser, server_config, shard_config
from lightllm_grpc.config import ShardConfig
from lightllm_grpc.layers.attention.base import KVCache
from lightllm_grpc.layers.forward_batch import ForwardBatch, ForwardMode
from lightllm_grpc.layers.ops import Ops
from lightllm_grpc.models.config import ModelConfig
from lightllm_grpc.models.loader import load_model
from lightllm_grpc.shard.piecewise_graph import PiecewiseCudaGraphs
from lightllm_grpc.shard.prefill_graph import CudaGraphPrefill
from lightllm_grpc.shard.runner import ModelRunner
from lightllm_grpc.shard.worker import mixed_graph_tokens
from tests.model_factory import make_tiny_model
from tests.runner_harness import Script, row, scenario

VOCAB = 512
ROWS, CONTEXT = 8, 64
POOL = ROWS * CONTEXT  # slot POOL is the padding slot
CPU = torch.device("cpu")

Prefill = tuple[int, int, int]  # (row, cached prefix, new tokens)
Decode = tuple[int, int]  # (row, tokens already in its context)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("piecewise")
    # qwen2: q/k/v bias and a tied LM head; qwen3: q/k norms.
    return {
        arch: make_tiny_model(arch, root / arch, vocab_size=VOCAB) for arch in ("llama3", "qwen2", "qwen3")
    }


def load(model_dir: Path, ops: Ops | None = None) -> torch.nn.Module:
    ops = ops or Ops.native()
    cfg = ModelConfig.from_pretrained(model_dir)
    backend = ops.attention(ROWS + 1, cfg.num_heads, cfg.head_dim, CPU, torch.float32)
    return load_model(model_dir, device=CPU, dtype="float32", attn_backend=backend, ops=ops)


def random_pool(model: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor, KVCache]:
    """A req_to_token table of scattered slots (plus the padding row) and a pool of random K/V:
    every row's context is already there, whatever a batch says is cached."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.zeros(ROWS + 1, CONTEXT, dtype=torch.int32)
    table[:ROWS] = torch.randperm(POOL, generator=gen).int().view(ROWS, CONTEXT)
    kv = model.kv_cache_spec.make_cache(POOL + 1, torch.float32, "cpu")
    for t in [*kv.k, *kv.v]:
        t.copy_(torch.randn(t.shape, generator=gen))
    return table, kv


def kv_copy(kv: KVCache) -> KVCache:
    clone = copy.copy(kv)  # the same dtype and scales, its own K/V tensors
    clone.k, clone.v = [t.clone() for t in kv.k], [t.clone() for t in kv.v]
    return clone


def make_batch(
    table: torch.Tensor, prefills: list[Prefill], decodes: list[Decode], seed: int = 0
) -> tuple[torch.Tensor, ForwardBatch]:
    """Random token ids and the batch of ``prefills`` then ``decodes`` (MIXED when both)."""
    positions, q_lens, seqs = [], [], []
    for r, prefix, new in prefills:
        positions += range(prefix, prefix + new)
        q_lens.append(new)
        seqs.append((r, prefix + new))
    for r, context in decodes:
        positions.append(context)
        q_lens.append(1)
        seqs.append((r, context + 1))
    rows = [r for r, _ in seqs]
    tok_rows = np.repeat(rows, q_lens)
    q_starts = np.cumsum(q_lens) - q_lens
    mixed = bool(prefills and decodes)
    i32 = torch.int32
    batch = ForwardBatch(
        mode=ForwardMode.MIXED if mixed else ForwardMode.PREFILL if prefills else ForwardMode.DECODE,
        positions=torch.tensor(positions),
        out_slots=table[tok_rows, positions].long(),
        req_rows=torch.tensor(rows, dtype=i32),
        seq_lens=torch.tensor([n for _, n in seqs], dtype=i32),
        q_starts=torch.tensor(q_starts, dtype=i32),
        q_lens=torch.tensor(q_lens, dtype=i32),
        req_to_token=table,
        logits_indices=torch.from_numpy(q_starts + np.asarray(q_lens) - 1),
        max_q_len=max(q_lens),
        max_seq_len=max(n for _, n in seqs),
        num_prefill=len(prefills) if mixed else 0,
        num_prefill_tokens=sum(new for _, _, new in prefills) if mixed else 0,
    )
    ids = torch.randint(3, VOCAB, (len(positions),), generator=torch.Generator().manual_seed(seed))
    return ids, batch


def piecewise(model: torch.nn.Module, kv: KVCache, max_tokens: int) -> PiecewiseCudaGraphs:
    return PiecewiseCudaGraphs(model, kv, lambda i, b: model(i, b, kv), POOL, max_tokens, CPU)


def run_both(
    model: torch.nn.Module,
    table: torch.Tensor,
    kv: KVCache,
    case: tuple[list[Prefill], list[Decode]],
    max_tokens: int,
) -> tuple[torch.Tensor, KVCache, torch.Tensor, KVCache, PiecewiseCudaGraphs]:
    """The eager forward and the pieces on one batch, each on its own copy of ``kv``."""
    ids, batch = make_batch(table, *case)
    eager_kv, pieces_kv = kv_copy(kv), kv_copy(kv)
    graphs = piecewise(model, pieces_kv, max_tokens)
    with torch.inference_mode():
        ref = model(ids, batch, eager_kv)
        out = graphs(ids, batch)
    assert graphs.replays == 1, "the batch ran eagerly, not through the pieces"
    return ref, eager_kv, out, pieces_kv, graphs


def assert_pools(ours: KVCache, ref: KVCache, exact: bool) -> None:
    """Every slot but the padding one holds the same K/V."""
    for layer in range(len(ref.k)):
        for a, b in ((ours.k[layer], ref.k[layer]), (ours.v[layer], ref.v[layer])):
            if exact:
                assert torch.equal(a[:POOL], b[:POOL]), f"layer {layer}: K/V differ"
            else:
                torch.testing.assert_close(a[:POOL], b[:POOL], rtol=1e-5, atol=1e-5)


# Token counts at a bucket of max 48 (16, 32, 48): MIXED with cached prefixes and decode rows
# of several lengths, MIXED with one prompt, PREFILL of several prompts, one long prompt.
BUCKET_CASES = [
    ([(0, 0, 7), (1, 9, 5)], [(2, 30), (3, 1), (4, 12), (5, 62)]),  # 16 tokens
    ([(6, 20, 31)], [(7, 40)]),  # 32
    ([(0, 0, 20), (3, 5, 12), (1, 0, 16)], []),  # 48, PREFILL
    ([(2, 3, 48)], []),  # 48, one prompt after a cached prefix
]
# Padded: 3 -> 16, 13 -> 16, 17 -> 32, 41 -> 48.
PADDED_CASES = [
    ([(0, 0, 2)], [(5, 10)]),
    ([(1, 4, 3), (2, 0, 6)], [(0, 33), (3, 2), (4, 7), (6, 50)]),
    ([(7, 0, 9), (6, 30, 8)], []),
    ([(3, 22, 37)], [(0, 5), (1, 6), (2, 60), (4, 0)]),
]


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "qwen3"])
def test_pieces_are_the_forward_bit_for_bit_at_bucket_sizes(model_dirs: dict[str, Path], arch: str) -> None:
    """No padding: the pieces with attention between them are the eager forward's kernels in
    its order, on the same shapes; logits and every K/V they store are identical."""
    model = load(model_dirs[arch])
    table, kv = random_pool(model)
    for case in BUCKET_CASES:
        ref, eager_kv, out, pieces_kv, graphs = run_both(model, table, kv, case, 48)
        assert graphs.pad(*make_batch(table, *case)) == sum(n for *_, n in case[0]) + len(case[1])
        assert torch.equal(out, ref), f"{case}: logits differ by {(out - ref).abs().max():.3g}"
        assert_pools(pieces_kv, eager_kv, exact=True)


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_padded_batches_give_the_eager_logits_and_leave_other_slots(
    model_dirs: dict[str, Path], arch: str
) -> None:
    model = load(model_dirs[arch])
    table, kv = random_pool(model)
    for case in PADDED_CASES:
        ids, batch = make_batch(table, *case)
        ref, eager_kv, out, pieces_kv, graphs = run_both(model, table, kv, case, 48)
        assert graphs.pad(ids, batch) > batch.num_tokens
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert_pools(pieces_kv, eager_kv, exact=False)
        untouched = torch.ones(POOL, dtype=torch.bool)
        untouched[batch.out_slots] = False
        for ours, before in zip([*pieces_kv.k, *pieces_kv.v], [*kv.k, *kv.v], strict=True):
            assert torch.equal(ours[:POOL][untouched], before[:POOL][untouched]), "padding wrote a real slot"


def test_padded_prefill_equals_an_eagerly_padded_one_bit_for_bit(model_dirs: dict[str, Path]) -> None:
    """With padding, the pieces still run exactly the eager forward's kernels: against an eager
    forward of the same bucket whose padding tokens are a third sequence on the padding row
    (as a prefill graph pads), the logits and the K/V are identical."""
    model = load(model_dirs["llama3"])
    table, kv = random_pool(model)
    case = ([(0, 3, 11), (4, 0, 10)], [])  # 21 tokens in the 32 bucket
    ids, batch = make_batch(table, *case)
    table[ROWS, :11] = POOL
    ref_ids, ref_batch = make_batch(table, [*case[0], (ROWS, 0, 11)], [])
    ref_batch.logits_indices = batch.logits_indices
    eager_kv, pieces_kv = kv_copy(kv), kv_copy(kv)
    with torch.inference_mode():
        ref = model(torch.cat([ids, ref_ids[21:]]), ref_batch, eager_kv)
        out = piecewise(model, pieces_kv, 48)(ids, batch)
    assert torch.equal(out, ref)
    assert_pools(pieces_kv, eager_kv, exact=True)


def test_padding_rows_never_reach_the_real_ones(model_dirs: dict[str, Path]) -> None:
    """A batch's logits and K/V do not depend on what its padding rows hold: a fresh instance,
    one that ran a larger batch of the same bucket first (whose slots its padding must not
    write again), and one whose buffers' padding rows hold garbage all agree bit for bit."""
    model = load(model_dirs["llama3"])
    table, kv = random_pool(model)
    large = make_batch(table, [(0, 0, 25), (1, 2, 5)], [(2, 9)], seed=1)  # 31 tokens: bucket 32
    small = make_batch(table, [(3, 1, 17)], [(4, 20), (5, 3)], seed=2)  # 19 tokens: bucket 32
    outs, pools = [], []
    for history in ("fresh", "after a larger batch", "garbage"):
        pool = kv_copy(kv)
        graphs = piecewise(model, pool, 48)
        with torch.inference_mode():
            if history == "after a larger batch":
                graphs(*large)
                after_large = kv_copy(pool)
            if history == "garbage":
                t, gen = small[1].num_tokens, torch.Generator().manual_seed(3)
                graphs.ids[t:] = torch.randint(0, VOCAB, graphs.ids[t:].shape, generator=gen)
                graphs.positions[t:] = torch.randint(0, CONTEXT, graphs.positions[t:].shape, generator=gen)
                for buf in (graphs.q, graphs.attn, graphs.residual, graphs.hidden):
                    buf[t:] = 1e3 * torch.randn(buf[t:].shape, generator=gen)
            outs.append(graphs(*small))
        assert graphs.pad(*small) == 32
        pools.append(pool)
        if history == "after a larger batch":  # rows 19..30 of the slots buffer held these
            slots = large[1].out_slots
            for ours, before in zip([*pool.k, *pool.v], [*after_large.k, *after_large.v], strict=True):
                assert torch.equal(ours[slots], before[slots]), "padding overwrote an earlier batch's K/V"
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    assert_pools(pools[2], pools[0], exact=True)  # fresh and garbage: the whole pool
    ours = [t[small[1].out_slots] for t in [*pools[1].k, *pools[1].v]]
    assert all(torch.equal(a, b[small[1].out_slots]) for a, b in zip(ours, [*pools[0].k, *pools[0].v]))


def test_only_prefill_and_mixed_batches_up_to_the_largest_bucket_run_the_pieces(
    model_dirs: dict[str, Path],
) -> None:
    model = load(model_dirs["llama3"])
    table, kv = random_pool(model)
    eager: list[ForwardMode] = []

    def forward(ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        eager.append(batch.mode)
        return model(ids, batch, kv)

    graphs = PiecewiseCudaGraphs(model, kv, forward, POOL, 40, CPU)
    assert graphs.sizes == [16, 32, 40]
    with torch.inference_mode():
        graphs(*make_batch(table, [(0, 0, 39)], [(1, 5)]))  # 40: the largest bucket
        graphs(*make_batch(table, [(0, 0, 3), (2, 0, 4)], []))
        graphs(*make_batch(table, [(0, 0, 40)], [(1, 5)]))  # 41: eager
        graphs(*make_batch(table, [], [(1, 5), (2, 7)]))  # decode: eager
    assert graphs.replays == 2 and eager == [ForwardMode.MIXED, ForwardMode.DECODE]


def _runner(model: torch.nn.Module, pieces: bool) -> tuple[ModelRunner, PiecewiseCudaGraphs | None]:
    kv = model.kv_cache_spec.make_cache(256 + 1, torch.float32, "cpu")
    runner = ModelRunner(lambda i, b: model(i, b, kv), kv, VOCAB, ROWS, CONTEXT, CPU)
    if not pieces:
        return runner, None
    graphs = PiecewiseCudaGraphs(model, kv, runner.forward, runner.pad_slot, 24, CPU)
    # One-prompt prefills of up to 16 tokens take the prefill graph (run eagerly here); it
    # hands the others to the pieces, as warm-up wires them on a GPU.
    prefill = CudaGraphPrefill(
        runner.forward, runner.req_to_token, runner.pad_row, runner.pad_slot, 16, CPU, fallback=graphs
    )
    prefill.replay = prefill.run  # type: ignore[method-assign]
    runner.prefill_forward, runner.mixed_forward = prefill, graphs
    return runner, graphs


def test_runner_sends_prefill_and_mixed_steps_through_the_pieces(model_dirs: dict[str, Path]) -> None:
    """Tokens and logprobs of every step equal an eager runner's; multi-prompt prefills, mixed
    steps and one-prompt prefills the prefill graph does not take go through the pieces."""
    model = load(model_dirs["llama3"])
    (runner, graphs), (eager, _) = _runner(model, True), _runner(model, False)
    steps = list(scenario(VOCAB))
    # Then row 1 (released) comes back with a 20-token prompt: one prompt, too long for the
    # prefill graph (16), which hands it to the pieces.
    s, gen = Script(next_slot=200, step_id=len(steps)), np.random.default_rng(3)
    msg = s.new(row(1), release=(1,))
    s.prefill(msg, 1, gen.integers(3, VOCAB, 20).tolist())
    steps.append(msg)
    msg = s.new(row(7))  # a 10-token prompt alone: the prefill graph's
    s.prefill(msg, 7, gen.integers(3, VOCAB, 10).tolist())
    steps.append(msg)
    assert graphs is not None
    for msg in steps:
        ours, ref = runner.step(msg), eager.step(msg)
        assert list(ours.rows) == list(ref.rows) and list(ours.token_ids) == list(ref.token_ids)
        np.testing.assert_allclose(ours.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours.prompt_logprobs, ref.prompt_logprobs, rtol=1e-5, atol=1e-5)
    # The 3-prompt prefill, the mixed steps but the one asking prompt logprobs, the long prompt.
    assert graphs.replays == 4
    assert runner.prefill_forward.replays == 1  # type: ignore[union-attr]


def test_flag_reaches_the_shard_config(tmp_path: Path) -> None:
    model = tmp_path / "m"
    serve = ["serve", "--model", str(model)]
    args = build_parser().parse_args([*serve, "--cuda-graph-max-mixed-tokens", "512"])
    assert server_config(args).shard.cuda_graph_max_mixed_tokens == 512
    default = server_config(build_parser().parse_args(serve))
    assert default.shard.cuda_graph_max_mixed_tokens == ShardConfig.cuda_graph_max_mixed_tokens == 512
    shard = ["shard", "--model", str(model), "--rank", "0", "--world-size", "1", "--listen", "127.0.0.1:1"]
    args = build_parser().parse_args([*shard, "--cuda-graph-max-mixed-tokens", "0"])
    assert shard_config(args).cuda_graph_max_mixed_tokens == 0
    with pytest.raises(ValueError, match="cuda_graph_max_mixed_tokens"):
        ShardConfig(model=model, cuda_graph_max_mixed_tokens=-1)


def test_mixed_graph_size_follows_flags_and_device() -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")

    def cfg(**kw) -> ShardConfig:  # rows as build_shard has resolved them
        return ShardConfig(model=Path("m"), **{"max_rows": 256, **kw})

    assert mixed_graph_tokens(cfg(), cuda) == 512
    assert mixed_graph_tokens(cfg(), cpu) == 0
    assert mixed_graph_tokens(cfg(cuda_graphs=False), cuda) == 0
    assert mixed_graph_tokens(cfg(cuda_graph_max_mixed_tokens=0), cuda) == 0
    # A step holds at most max_prefill_tokens prompt tokens and a decode token per row.
    assert mixed_graph_tokens(cfg(max_prefill_tokens=100, max_rows=28), cuda) == 128


def test_profile_mixed_runs_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU benchmark's smoke run: a tiny checkpoint, the pieces uncaptured."""
    from lightllm_grpc.bench.profile_mixed import main
    from tests.server_harness import make_served_model

    model_dir = make_served_model("llama3", tmp_path / "llama3")
    args = ["--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "--iters", "1"]
    main(
        [*args, "--prompt-tokens", "5,20", "--decode-rows", "3", "--context", "8", "--max-mixed-tokens", "16"]
    )
    rows = capsys.readouterr().out.splitlines()[-2:]
    assert rows[0].split()[:4] == ["5", "3", "8", "16"] and rows[0].endswith("x")
    assert rows[1].split()[:4] == ["20", "3", "23", "-"] and "eager" in rows[1]


def test_profile_mixed_puts_several_prompts_in_a_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--prompts P``: P prompts of N tokens each beside the decode rows (W2's chunks), each in its
    own row and slots; the step's token count is P x N + B."""
    from lightllm_grpc.bench.profile_mixed import _mixed_step, main
    from tests.server_harness import make_served_model

    step = _mixed_step(4, 3, 3, 8, prompts=2)
    assert list(step.prefill.rows) == [3, 4] and list(step.prefill.lens) == [4, 4]
    assert list(step.prefill.slots) == list(range(27, 35))  # after 3 rows of 9 slots
    assert [a.row for a in step.admit] == [3, 4] and list(step.decode.rows) == [0, 1, 2]
    model_dir = make_served_model("llama3", tmp_path / "llama3")
    args = ["--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "--iters", "1"]
    main([*args, "--prompts", "3", "--prompt-tokens", "4", "--decode-rows", "2", "--context", "8",
          "--max-mixed-tokens", "16", "--kernels", "5"])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert "3 prompt(s) a step" in out[-3] and out[-1].split()[:4] == ["4", "2", "14", "16"]
