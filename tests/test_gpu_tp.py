"""Tensor parallelism on two GPUs (marked gpu; skipped with fewer than two CUDA devices).

The P2P all-reduce must equal NCCL's, eagerly and inside CUDA graphs; a TP=2 server with
decode CUDA graphs (P2P all-reduce on, and off) must give transformers' greedy tokens in
fp32 (the near-tie rule of tests/test_parity.py), TP=1's greedy tokens, and TP=1's seeded
samples. One command: ``PYTHONPATH=.:kernels python -m pytest -q -m gpu tests/test_gpu_tp.py``.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lightllm_grpc.bench.allreduce import run_group
from tests.reference import assert_greedy_equal, reference_greedy
from tests.server_harness import ServerProcess, greedy_request, make_served_model
from tests.test_parity import check_parity

pytestmark = pytest.mark.gpu
if torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA GPUs", allow_module_level=True)

FP32_GPU = ("--device", "cuda", "--dtype", "float32")
NEW_TOKENS = 32
P2P_LINE = "all-reduce: P2P over symmetric memory"


def test_custom_all_reduce_equals_nccl_eagerly_and_in_cuda_graphs() -> None:
    result = run_group("lightllm_grpc.bench.allreduce", 2, ["--check"], timeout=300)
    bad = [c for c in result["cases"] if c["eager_max_diff"] or c["graph_max_diff"]]
    assert not bad, bad
    paths = {(c["dtype"], c["path"]) for c in result["cases"]}
    for dtype in ("torch.bfloat16", "torch.float32"):
        for path in ("lamport", "one_shot", "two_shot", "nccl"):
            assert (dtype, path) in paths, f"no {dtype} case took the {path} path: {result['cases']}"
    # The norm kernels with the barrier-free all-reduce folded in, mixed sizes in one graph.
    assert len(result["fused"]) == 2, result["fused"]
    for f in result["fused"]:
        assert f["eager_max_diff"] == 0 and f["graph_max_diff"] == 0, f
        assert f["state"][5] == 0, f  # no wait gave up


@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_fp32_tp2_greedy_parity_with_cuda_graphs(arch: str, tmp_path) -> None:
    check_parity(arch, tmp_path, [*FP32_GPU, "--tp-size", "2"])


@pytest.mark.parametrize("all_reduce", ["p2p", "nccl"])
def test_fp32_tp2_greedy_parity_with_piecewise_graphs(all_reduce: str, tmp_path) -> None:
    """Prefills of several prompts and mixed steps (prompts chunked by --max-prefill-tokens 24
    beside decode rows) replay piecewise graphs, whose all-reduces are the P2P kernels or NCCL."""
    flags = [*FP32_GPU, "--tp-size", "2", "--max-prefill-tokens", "24", "--cuda-graph-max-mixed-tokens", "64"]
    if all_reduce == "nccl":
        flags.append("--disable-custom-all-reduce")
    check_parity("llama3", tmp_path, flags)
    assert "captured 12 piecewise graphs (3 pieces x 4 buckets" in (tmp_path / "server.log").read_text()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One fp32 llama3 served at TP=1, TP=2 (P2P all-reduce) and TP=2 (NCCL only)."""
    d = tmp_path_factory.mktemp("tp")
    model = make_served_model("llama3", d / "llama3")
    configs = {
        "tp1": (),
        "tp2": ("--tp-size", "2"),
        "tp2-nccl": ("--tp-size", "2", "--disable-custom-all-reduce"),
    }
    started: dict[str, ServerProcess] = {}
    try:
        for name, extra in configs.items():
            started[name] = ServerProcess(model, d / f"{name}.log", *FP32_GPU, *extra)
        yield model, started
    finally:
        for server in started.values():
            server.stop()


def _prompts(n: int = 8) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(10, 512) for _ in range(rng.randrange(1, 60))] for _ in range(n)]


def _generate(server: ServerProcess, requests: list) -> list[list[int]]:
    with ThreadPoolExecutor(len(requests)) as pool:  # all at once: batched decode graphs
        return list(pool.map(lambda r: list(server.stub.Generate(r).token_ids), requests))


def test_tp2_logs_its_all_reduce_path(servers) -> None:
    _, started = servers
    assert P2P_LINE in started["tp2"].log_path.read_text()
    assert "all-reduce: NCCL (--disable-custom-all-reduce)" in started["tp2-nccl"].log_path.read_text()


def test_tp2_greedy_tokens_equal_tp1_and_transformers(servers) -> None:
    model, started = servers
    prompts = _prompts()
    outs = {
        name: _generate(s, [greedy_request(p, NEW_TOKENS) for p in prompts]) for name, s in started.items()
    }
    reference = reference_greedy(model, prompts, NEW_TOKENS)
    for i, (ref, scores) in enumerate(reference):
        ties = [assert_greedy_equal(f"{name} prompt {i}", outs[name][i], ref, scores) for name in outs]
        if not any(ties):  # all equal transformers, hence each other; a near-tie may split them
            assert outs["tp1"][i] == outs["tp2"][i] == outs["tp2-nccl"][i]


def test_seeded_sampling_is_identical_at_tp1_and_tp2(servers) -> None:
    _, started = servers
    requests = []
    for i, prompt in enumerate(_prompts()):
        req = greedy_request(prompt, NEW_TOKENS)
        req.sampling.temperature, req.sampling.top_p, req.sampling.seed = 0.8, 0.95, 100 + i
        requests.append(req)
    outs = {name: _generate(s, requests) for name, s in started.items()}
    assert outs["tp2"] == outs["tp1"]
    assert outs["tp2-nccl"] == outs["tp1"]
    greedy = _generate(started["tp1"], [greedy_request(p, NEW_TOKENS) for p in _prompts()])
    assert outs["tp1"] != greedy  # the samples are not greedy in disguise
