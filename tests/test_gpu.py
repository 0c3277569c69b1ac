"""The GPU path: Triton kernels and CUDA graphs inside the real model and server (marked gpu)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from lightllm_grpc.layers.forward_batch import ForwardMode
from lightllm_grpc.layers.ops import Ops
from lightllm_grpc.models.config import ModelConfig
from lightllm_grpc.models.loader import load_model
from tests.model_factory import build_batch, make_tiny_model
from tests.server_harness import ServerProcess, greedy_request, make_served_model
from tests.test_parity import ARCHS, check_parity

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def _prefill_logits(model_dir, device: str, dtype: str, ops: Ops, prompts: list[list[int]]) -> torch.Tensor:
    cfg = ModelConfig.from_pretrained(model_dir)
    backend = ops.attention(8, cfg.num_heads, cfg.head_dim, torch.device(device), getattr(torch, dtype))
    model = load_model(model_dir, device=device, dtype=dtype, attn_backend=backend, ops=ops)
    total = sum(map(len, prompts))
    kv = model.kv_cache_spec.make_cache(total + 1, model.lm_head.weight.dtype, device)
    width = max(map(len, prompts))
    table = torch.zeros(len(prompts), width, dtype=torch.int32)
    start = 0
    for i, p in enumerate(prompts):  # scattered, non-contiguous slots
        table[i, : len(p)] = torch.arange(start, start + len(p), dtype=torch.int32).flip(0)
        start += len(p)
    ids, batch = build_batch(
        ForwardMode.PREFILL, prompts, [0] * len(prompts), list(range(len(prompts))), table
    )
    fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
    batch = type(batch)(**fields)
    with torch.no_grad():
        return model(ids.to(device), batch, kv).float().cpu()


def _bf16_error(model_dir) -> tuple[float, float]:
    """Relative error of our bf16 first-step logits (Triton ops), and of transformers' own bf16
    ones, vs our fp32 native ones."""
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 512, (n,), generator=gen).tolist() for n in (1, 17, 64, 200)]
    ref = _prefill_logits(model_dir, "cpu", "float32", Ops.native(), prompts)
    ours = _prefill_logits(model_dir, "cuda", "bfloat16", Ops.triton(), prompts)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        theirs = torch.stack(
            [hf(torch.tensor([p], device="cuda")).logits[0, -1].float().cpu() for p in prompts]
        )

    def rel(x: torch.Tensor) -> float:
        return ((x - ref).norm() / ref.norm()).item()

    return rel(ours), rel(theirs)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_first_step_logits_close_to_fp32(arch: str, tmp_path) -> None:
    """On a checkpoint with ordinary (small) weights, bf16 logits are within 1e-2 of fp32."""
    ours, theirs = _bf16_error(make_tiny_model(arch, tmp_path / arch, standard_init=True))
    assert ours < 1e-2, f"{arch}: bf16 logits relative error {ours:.3g} (transformers bf16: {theirs:.3g})"


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_no_worse_than_transformers_on_large_weights(arch: str, tmp_path) -> None:
    """The parity models' enlarged weights amplify bf16 rounding; ours must stay near transformers'."""
    ours, theirs = _bf16_error(make_tiny_model(arch, tmp_path / arch))
    assert ours <= 1.5 * theirs + 2e-3, f"{arch}: ours {ours:.3g} vs transformers bf16 {theirs:.3g}"


@pytest.mark.parametrize("graph_tokens", ["default", "0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_greedy_parity_on_gpu_with_cuda_graphs(arch: str, graph_tokens: str, tmp_path) -> None:
    """Decode graphs, and prefill and piecewise graphs (the defaults: 512 and 2048 tokens) or
    eager prefill and mixed steps (0)."""
    flags = ["--device", "cuda", "--dtype", "float32"]
    if graph_tokens == "0":
        flags += ["--cuda-graph-max-prefill-tokens", "0", "--cuda-graph-max-mixed-tokens", "0"]
    check_parity(arch, tmp_path, flags)
    captured = re.search(r"captured \d+ piecewise graphs", (tmp_path / "server.log").read_text())
    assert bool(captured) == (graph_tokens == "default")


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_greedy_parity_with_piecewise_graphs(arch: str, tmp_path) -> None:
    """Eight prompts at once, chunked by --max-prefill-tokens 24: prefills of several prompts and
    mixed steps (chunks beside decode rows) replay the piecewise graphs (buckets of 16..64
    tokens), one-prompt prefills the prefill graphs (16, 24); fp32 greedy tokens equal
    transformers' (the near-tie rule of tests/test_parity.py)."""
    flags = ["--device", "cuda", "--dtype", "float32", "--max-prefill-tokens", "24"]
    check_parity(arch, tmp_path, [*flags, "--cuda-graph-max-mixed-tokens", "64"])
    log = (tmp_path / "server.log").read_text()
    assert "captured 12 piecewise graphs (3 pieces x 4 buckets: 16,32,48,64 tokens)" in log
    assert "captured 2 prefill graphs (16,24 tokens)" in log


def _piecewise_shard(model_dir, dtype: str, mixed_tokens: int = 64, prefill_tokens: int = 0, **sizes):
    """A CUDA shard of ``model_dir`` as ``serve`` builds and warms it (decode, piecewise and,
    with ``prefill_tokens``, prefill graphs), sized as ``tests.test_piecewise_graph`` unless
    ``sizes`` (max_rows, max_context, max_total_tokens) say otherwise."""
    from lightllm_grpc.config import ShardConfig
    from lightllm_grpc.shard.warmup import warmup
    from lightllm_grpc.shard.worker import build_shard
    from tests.test_piecewise_graph import CONTEXT, POOL, ROWS

    sizes = {"max_rows": ROWS, "max_context": CONTEXT, "max_total_tokens": POOL, **sizes}
    cfg = ShardConfig(
        model=model_dir, device="cuda", dtype=dtype, max_prefill_tokens=64,
        cuda_graph_max_prefill_tokens=prefill_tokens, cuda_graph_max_mixed_tokens=mixed_tokens, **sizes,
    )  # fmt: skip
    shard = build_shard(cfg, 0, 1, None)
    warmup(shard, cfg.max_prefill_tokens, cfg.max_rows)
    return shard


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_piecewise_graph_logits_match_eager(dtype: str, tmp_path) -> None:
    """Mixed and multi-prompt prefill batches of several shapes (tests/test_piecewise_graph.py's
    cases: decode rows of many lengths, cached prefixes, one long prompt) through the captured
    pieces: the logits equal an uncaptured run of the same pieces bit for bit (nothing a graph
    holds went stale), and the eager forward's bit for bit at bucket sizes (no padding: the same
    kernels on the same shapes) or within rounding when padded (a padded matmul has more rows);
    the K/V of every slot but the padding one likewise."""
    from lightllm_grpc.shard.piecewise_graph import PiecewiseCudaGraphs
    from tests.test_piecewise_graph import BUCKET_CASES, PADDED_CASES, POOL, ROWS, VOCAB, make_batch

    model_dir = make_tiny_model(
        "qwen3", tmp_path / "qwen3", vocab_size=VOCAB, standard_init=dtype == "bfloat16"
    )
    shard = _piecewise_shard(model_dir, dtype)
    runner, graphs = shard.runner, shard.runner.mixed_forward
    assert isinstance(graphs, PiecewiseCudaGraphs) and shard.mixed_graph_sizes == (16, 32, 48, 64)
    assert runner.prefill_forward is graphs  # no prefill graphs: every prefill takes the pieces
    uncaptured = PiecewiseCudaGraphs(
        shard.model, runner.kv, runner.forward, runner.pad_slot, 64, runner.device
    )
    gen = torch.Generator().manual_seed(0)
    table = runner.req_to_token.cpu()
    table[:ROWS] = torch.randperm(POOL, generator=gen).int().view(ROWS, -1)
    runner.req_to_token.copy_(table)
    kv = runner.kv
    for t in [*kv.k, *kv.v]:
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))

    def pool() -> list[torch.Tensor]:
        return [t[:POOL].clone() for t in [*kv.k, *kv.v]]

    for case in BUCKET_CASES + PADDED_CASES:
        ids, batch = make_batch(table, *case)
        fields = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
        ids, batch = ids.cuda(), type(batch)(**{**fields, "req_to_token": runner.req_to_token})
        # Each run stores the batch's K/V before attending over it: the pool is the same for each.
        with torch.inference_mode():
            ref, ref_pool = runner.forward(ids, batch).clone(), pool()
            before = graphs.replays
            out, out_pool = graphs(ids, batch).clone(), pool()
            again = uncaptured(ids, batch)
        assert graphs.replays == before + 1
        where = f"{dtype} {case}: {batch.num_tokens} tokens"
        assert torch.equal(out, again), f"{where}: captured pieces differ from uncaptured ones"
        if batch.num_tokens in graphs.sizes:
            assert torch.equal(out, ref), f"{where}: logits differ by {(out - ref).abs().max():.3g}"
            assert all(torch.equal(a, b) for a, b in zip(out_pool, ref_pool)), f"{where}: K/V differ"
            continue
        if dtype == "float32":
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=lambda m, w=where: f"{w}: {m}")
        else:
            rel = ((out - ref).norm() / ref.norm()).item()
            assert rel < 1e-2, f"{where}: piecewise vs eager relative error {rel:.3g}"
        for a, b in zip(out_pool, ref_pool):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_piecewise_graphs_give_the_eager_tokens(tmp_path) -> None:
    """fp32: tests/runner_harness.py's step script (a 3-prompt prefill, mixed steps, one asking
    prompt logprobs, seeded sampling, prefix groups, decodes) gives the same tokens and
    logprobs with piecewise and prefill graphs as eagerly."""
    from lightllm_grpc.shard.piecewise_graph import PiecewiseCudaGraphs
    from tests.runner_harness import MAX_CONTEXT, MAX_ROWS, NUM_SLOTS, scenario
    from tests.test_piecewise_graph import VOCAB

    model_dir = make_tiny_model("llama3", tmp_path / "llama3", vocab_size=VOCAB)
    sizes = {"max_rows": MAX_ROWS, "max_context": MAX_CONTEXT, "max_total_tokens": NUM_SLOTS}
    shard = _piecewise_shard(model_dir, "float32", mixed_tokens=32, prefill_tokens=16, **sizes)
    runner, graphs = shard.runner, shard.runner.mixed_forward
    assert isinstance(graphs, PiecewiseCudaGraphs) and runner.prefill_forward.fallback is graphs
    warmed = graphs.replays  # warm-up's own mixed steps ran through the pieces too
    graphed = [runner.step(s) for s in scenario(VOCAB)]
    assert graphs.replays - warmed == 3  # the 3-prompt prefill, the mixed steps without prompt logprobs
    runner.reset()
    runner.prefill_forward = runner.mixed_forward = runner.forward
    eager = [runner.step(s) for s in scenario(VOCAB)]
    for ours, ref in zip(graphed, eager, strict=True):
        assert list(ours.token_ids) == list(ref.token_ids), f"step {ref.step_id}"
        np.testing.assert_allclose(ours.logprobs, ref.logprobs, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ours.prompt_logprobs, ref.prompt_logprobs, rtol=1e-4, atol=1e-4)


def _graphed_shard(model_dir, dtype: str, graph_tokens: int = 48):
    """A CUDA shard of ``model_dir`` as ``serve`` builds and warms it (decode and prefill graphs),
    sized for ``tests.test_prefill_graph``'s step script."""
    from lightllm_grpc.config import ShardConfig
    from lightllm_grpc.shard.warmup import warmup
    from lightllm_grpc.shard.worker import build_shard
    from tests.test_prefill_graph import CONTEXT, ROWS

    cfg = ShardConfig(
        model=model_dir, device="cuda", dtype=dtype, max_total_tokens=ROWS * CONTEXT, max_rows=ROWS,
        max_context=CONTEXT, max_prefill_tokens=64, cuda_graph_max_prefill_tokens=graph_tokens,
    )  # fmt: skip
    shard = build_shard(cfg, 0, 1, None)
    warmup(shard, cfg.max_prefill_tokens, ROWS)
    return shard


def test_prefill_graphs_give_the_eager_tokens(tmp_path) -> None:
    """fp32: the step script of tests/test_prefill_graph.py (padded prompts, a cached prefix, a
    chunked prompt, decodes between; two-prompt and prompt-logprobs steps stay eager) gives
    the same tokens and logprobs through the captured prefill graphs as with eager prefill."""
    from lightllm_grpc.shard.prefill_graph import CudaGraphPrefill
    from tests.test_prefill_graph import VOCAB, _script

    shard = _graphed_shard(make_tiny_model("llama3", tmp_path / "llama3", vocab_size=VOCAB), "float32")
    runner = shard.runner
    graphs = runner.prefill_forward
    assert isinstance(graphs, CudaGraphPrefill) and shard.prefill_graph_sizes == (16, 32, 48)
    graphed = [runner.step(s) for s in _script()]
    assert graphs.replays == 5  # every one-prompt prefill: all fit 48 tokens
    runner.reset()
    runner.prefill_forward = runner.forward
    eager = [runner.step(s) for s in _script()]
    for ours, ref in zip(graphed, eager, strict=True):
        assert list(ours.token_ids) == list(ref.token_ids), f"step {ref.step_id}"
        np.testing.assert_allclose(ours.logprobs, ref.logprobs, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ours.prompt_logprobs, ref.prompt_logprobs, rtol=1e-4, atol=1e-4)


def test_prefill_graph_logits_match_eager_in_bf16(tmp_path) -> None:
    """bf16 logits of graphed prefills of several lengths, at bucket edges and after cached
    prefixes, against the unpadded eager forward; and the replay against an eager run of the
    same padded buffers (which shows nothing a graph holds went stale)."""
    from tests.test_prefill_graph import CONTEXT, VOCAB

    model_dir = make_tiny_model("llama3", tmp_path / "llama3", vocab_size=VOCAB, standard_init=True)
    shard = _graphed_shard(model_dir, "bfloat16")
    runner, graphs = shard.runner, shard.runner.prefill_forward
    gen = torch.Generator().manual_seed(5)
    row = 2
    table = torch.zeros(row + 1, CONTEXT, dtype=torch.int32)
    table[row] = torch.randperm(CONTEXT, generator=gen).int() + row * CONTEXT  # scattered slots
    runner.req_to_token[row] = table[row].cuda()

    def batch_of(tokens: list[int], prefix: int):
        ids, batch = build_batch(ForwardMode.PREFILL, [tokens], [prefix], [row], table)
        fields = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
        fields["req_to_token"] = runner.req_to_token
        return ids.cuda(), type(batch)(**fields)

    with torch.inference_mode():
        for prefix, n in [(0, 1), (0, 15), (0, 16), (0, 17), (0, 48), (23, 9), (40, 8), (7, 32)]:
            tokens = torch.randint(3, VOCAB, (prefix + n,), generator=gen).tolist()
            if prefix:
                runner.forward(*batch_of(tokens[:prefix], 0))
            ids, batch = batch_of(tokens[prefix:], prefix)
            ref = runner.forward(ids, batch).clone()
            size = graphs.pad(ids, batch)
            padded = graphs.run(size).clone()
            before = graphs.replays
            out = graphs(ids, batch).clone()
            assert graphs.replays == before + 1
            where = f"prefix {prefix}, {n} tokens (bucket {size})"
            torch.testing.assert_close(out, padded, rtol=2e-2, atol=2e-2, msg=lambda m, w=where: f"{w}: {m}")
            rel = ((out - ref).norm() / ref.norm()).item()
            assert rel < 1e-2, f"{where}: graph vs eager relative error {rel:.3g}"


@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_fp32_greedy_parity_with_prefill_graphs_one_prompt_at_a_time(arch: str, tmp_path) -> None:
    """Prompts sent one after another, so each prefill step holds one prompt and replays a
    prefill graph (llama3: chunked by --max-prefill-tokens 24, each chunk after the last; the
    last prompt repeats an earlier one's first 40 tokens, a cached prefix): fp32 greedy tokens
    equal transformers'."""
    from tests.reference import assert_greedy_equal, reference_greedy
    from tests.test_parity import NEW_TOKENS, _prompts

    model_dir = make_served_model(arch, tmp_path / arch)
    prompts = _prompts(512)
    prompts.append(prompts[-1][:40] + prompts[-2][:9])
    chunked = ["--max-prefill-tokens", "24"] if arch == "llama3" else []
    buckets = "16,24" if chunked else "16,32,48"  # no graph above what a step may prefill
    server = ServerProcess(
        model_dir, tmp_path / "server.log", "--device", "cuda", "--dtype", "float32", *chunked,
        "--cuda-graph-max-prefill-tokens", "48",
    )  # fmt: skip
    try:
        outs = [list(server.stub.Generate(greedy_request(p, NEW_TOKENS)).token_ids) for p in prompts]
        info = server.wait_idle()
        log = server.log()
    finally:
        server.stop()
    assert f"captured {buckets.count(',') + 1} prefill graphs ({buckets} tokens)" in log
    assert info.kv_used_tokens == 0
    for i, (ours, (ref, scores)) in enumerate(zip(outs, reference_greedy(model_dir, prompts, NEW_TOKENS))):
        assert_greedy_equal(f"{arch} prompt {i} (len {len(prompts[i])})", ours, ref, scores)


def test_prefix_cache_n_and_preemption_on_gpu(tmp_path) -> None:
    """Cached prefixes (read through req_to_token by the Triton prefill kernel), multi-turn
    hits, n completions, prompt logprobs and preemption in a tiny pool, fp32 with CUDA graphs."""
    from tests import test_prefix_cache as t

    model_dir = make_served_model("llama3", tmp_path / "llama3", vocab_size=t.VOCAB)
    gpu = ("--device", "cuda", "--dtype", "float32")
    server = ServerProcess(
        model_dir,
        tmp_path / "server.log",
        *gpu,
        *("--max-total-tokens", "2048", "--max-prefill-tokens", "16", "--cascade-min-shared-tokens", "1"),
    )
    try:
        t.test_shared_prefixes_are_served_from_the_cache(server, model_dir)
        t.test_multi_turn_conversation_hits_prompt_and_answer(server, model_dir)
        t.test_n_completions_equal_seeded_requests_sent_alone(server)
        t.test_prompt_logprobs_match_transformers_across_chunks(server, model_dir)
    finally:
        server.stop()
    t.check_preemption(model_dir, tmp_path, *gpu)


def test_decode_graphs_share_one_logits_buffer(tmp_path) -> None:
    """Every decode graph (plain and cascade) writes its logits into one [max batch, vocab] buffer,
    so capture memory does not grow with the sum of the batch sizes (it was sum x vocab x 4
    bytes: 5.4 GiB at 512 rows of Llama 3, an out-of-memory at 1,024; measured 0.56 GiB after);
    the graphs' logits equal the eager forward's; the small graphs kept their fastest PDL release policy."""
    from lightllm_grpc_kernels import RELEASE_POLICIES

    from lightllm_grpc.config import ShardConfig
    from lightllm_grpc.shard import decode_inputs
    from lightllm_grpc.shard.cuda_graph import PDL_MAX_BATCH, CudaGraphDecoder
    from lightllm_grpc.shard.worker import build_shard

    vocab, rows = 128000, 256  # a Llama 3 vocabulary: the logits dominate what the graphs keep
    model_dir = make_tiny_model("llama3", tmp_path / "llama3", vocab_size=vocab)
    cfg = ShardConfig(
        model=model_dir, device="cuda", dtype="float32", max_total_tokens=4096, max_rows=rows, max_context=64,
        cuda_graph_max_prefill_tokens=0, cuda_graph_max_mixed_tokens=0,
    )  # fmt: skip
    runner = build_shard(cfg, 0, 1, None).runner
    graphs = CudaGraphDecoder(
        runner.forward, runner.req_to_token, runner.last_token, runner.pad_row, runner.pad_slot, rows, "cuda"
    )
    torch.cuda.synchronize()
    free = torch.cuda.mem_get_info()[0]
    graphs.capture()
    torch.cuda.empty_cache()  # what the eager runs before each capture left cached is not the graphs'
    grown = free - torch.cuda.mem_get_info()[0]
    per_size = (sum(graphs.sizes) + sum(graphs.cascade_graphs)) * vocab * 4  # one output per graph
    assert grown < per_size / 3, f"{grown / 2**20:.0f} MiB; one logits tensor a graph: {per_size / 2**20:.0f}"
    assert graphs.logits is not None and graphs.logits.shape == (graphs.sizes[-1], vocab)
    assert len(graphs.cascade_outputs) > 0
    # Graphs of up to PDL_MAX_BATCH rows were captured once per release policy; each keeps the fastest.
    small = [s for s in graphs.sizes if s <= PDL_MAX_BATCH]
    assert sorted(graphs.release) == sorted(graphs.release_times) == small
    for bs, times in graphs.release_times.items():
        assert tuple(times) == RELEASE_POLICIES and graphs.release[bs] == min(times, key=times.__getitem__)
    for out in [*graphs.outputs.values(), *graphs.cascade_outputs.values()]:
        assert out.data_ptr() == graphs.logits.data_ptr()
    with torch.inference_mode():
        for bs in (3, 100):  # two sizes, replayed one after the other
            rows = np.arange(bs)  # each row one token (position 0) in its own slot
            ids = torch.randint(3, vocab, (bs,), device="cuda")
            runner.last_token[:bs] = ids
            inputs = decode_inputs.pack(rows, rows * 0, rows, [], bs, runner.pad_row, runner.pad_slot)
            eager = decode_inputs.DecodeInputs.view(torch.from_numpy(inputs).cuda(), bs)
            ref = runner.forward(*decode_inputs.prepare(eager, graphs.consts, runner.req_to_token,
                                                        runner.last_token, 1, False)).clone()  # fmt: skip
            logits, tokens, _ = graphs.run(rows, rows * 0, rows, [])
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
            if tokens is not None:
                assert torch.equal(tokens, ref.argmax(dim=-1)) and torch.equal(runner.last_token[:bs], tokens)


def test_cascade_decode_graphs_keep_greedy_parity(tmp_path) -> None:
    """72 rows sharing a cached prefix decode through the cascade CUDA graphs (batch >= 64):
    fp32 greedy tokens equal transformers'."""
    import random

    from tests.reference import assert_greedy_equal, reference_greedy

    model_dir = make_served_model("llama3", tmp_path / "llama3", vocab_size=512)
    server = ServerProcess(
        model_dir,
        tmp_path / "server.log",
        *("--device", "cuda", "--dtype", "float32", "--max-running-requests", "96"),
        *("--max-total-tokens", "8192", "--cascade-min-shared-tokens", "1"),
    )
    rng = random.Random(3)
    prefix = [rng.randrange(10, 512) for _ in range(70)]
    prompts = [prefix + [rng.randrange(10, 512) for _ in range(3)] for _ in range(72)]
    try:
        server.stub.Generate(greedy_request(prompts[0], 2))  # cache the prefix
        with ThreadPoolExecutor(len(prompts)) as pool:
            outs = list(
                pool.map(lambda p: list(server.stub.Generate(greedy_request(p, 8)).token_ids), prompts)
            )
        info = server.wait_idle()
    finally:
        server.stop()
    assert info.num_cascade_decode_steps > 0
    for i, ((ref, scores), ours) in enumerate(zip(reference_greedy(model_dir, prompts, 8), outs)):
        assert_greedy_equal(f"prompt {i}", ours, ref, scores)


def test_structured_output_on_gpu(tmp_path) -> None:
    """Constrained rows on CUDA (pinned mask buffers, the token copy before each forward, the
    Triton masking kernel, CUDA graphs), preempted and chunked in a small pool: every output
    validates, and the unconstrained rows beside them decode as they do alone."""
    from tests import test_structured_output as t

    model_dir = make_served_model("llama", tmp_path / "llama")
    server = ServerProcess(
        model_dir,
        tmp_path / "server.log",
        *("--device", "cuda", "--dtype", "float32", "--json-whitespace", "compact"),
        *("--max-total-tokens", "600", "--max-prefill-tokens", "16"),
    )
    try:
        t.test_constrained_outputs_validate_and_leave_the_others_unchanged(server, model_dir)
        t.test_n_completions_each_follow_the_constraint(server)
        t.test_constraint_wins_over_min_new_tokens_and_logit_bias(server)
    finally:
        server.stop()


def test_fp8_kv_cache_agrees_with_bf16(tmp_path) -> None:
    """bf16 weights on the GPU (Triton kernels), the KV cache in bf16 vs e4m3 (scale 1.0: the
    checkpoint has none), 4,096 positions whose attention reads every key and value back from
    the pool. An ordinary-init (std 0.02) model's logits are nearly tied, so as for FP8 weights
    (test_fp8_gpu.py) the >= 99% criterion is taken where bf16's top-1 margin is decisive (>= 0.5
    std of its logits). This shape on the CPU (torch backend, bf16): 91.4% top-1 agreement over
    all positions, 100% over the 605 decisive ones, mean KL 1.7e-4."""
    from lightllm_grpc.bench.fp8_check import accuracy

    shape = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                 head_dim=64, num_key_value_heads=2)  # fmt: skip
    model_dir = make_tiny_model("llama3", tmp_path / "m", vocab_size=8192, standard_init=True, **shape)
    result = accuracy(model_dir, "auto", sequences=16, length=256, variant="fp8-kv")  # Triton backend
    print("fp8 KV cache vs bf16:", result)
    assert result["positions"] == 4096
    assert result["decisive_positions"] >= 400, result
    assert result["decisive_top1_agreement"] >= 0.99, result
    assert result["mean_kl"] < 1e-3, result
    assert result["top1_agreement"] >= 0.8, result


def test_fp8_kv_cache_server_on_gpu(tmp_path) -> None:
    """The CPU end-to-end check (tests/test_fp8_kv.py) with the server on the GPU: Triton store,
    prefill and decode on an e4m3 pool, decode in CUDA graphs; fp32 weights so that the CPU
    reference differs only in rounding."""
    from tests.test_fp8_kv import check_fp8_kv_server

    check_fp8_kv_server(tmp_path, "--device", "cuda", "--dtype", "float32")


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])
def test_mixed_steps_after_warmup_compile_nothing(kv_cache_dtype: str, tmp_path) -> None:
    """A mixed step's decode rows attend outside the graphs; warm-up compiled that launch for
    every split count, plain and cascade, so the first mixed steps of a fresh server with 2 to 40
    decode rows (split counts 32, 16, 8, 2), in prefix groups or not, compile no Triton kernel
    (each compile stalled a live step ~0.6 s)."""
    from lightllm_grpc.config import ShardConfig
    from lightllm_grpc.shard import compile_watch
    from lightllm_grpc.shard.warmup import mixed_step, warmup
    from lightllm_grpc.shard.worker import build_shard

    model_dir = make_tiny_model("llama3", tmp_path / "llama3")
    cfg = ShardConfig(
        model=model_dir, device="cuda", dtype="bfloat16", max_rows=48, max_context=128, max_total_tokens=4096,
        max_prefill_tokens=64, kv_cache_dtype=kv_cache_dtype,
    )  # fmt: skip
    shard = build_shard(cfg, 0, 1, None)
    warmup(shard, cfg.max_prefill_tokens, cfg.max_rows)
    watch = compile_watch.install()
    assert watch.armed
    before = watch.compiles
    for rows in (2, 5, 9, 40):
        for grouped in (False, True):  # plain and cascade attention
            shard.runner.step(mixed_step(rows, shard.runner.kv_capacity, grouped))
            shard.runner.reset()
    assert watch.compiles == before
