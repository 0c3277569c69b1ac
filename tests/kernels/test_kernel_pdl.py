"""Programmatic dependent launch: every kernel waits for the one before it, only where asked.

A kernel launched with the PDL attribute may start while the previous kernel in the stream is
still running; it is correct only if nothing it does precedes ``wait_for_predecessor(PDL)``.
The structural test below fails when a kernel gains a statement before that wait (or loses
it); ``test_kernels_compile_for_hopper.py`` checks that the wait reaches the PTX.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import textwrap

import lightllm_grpc_kernels
import pytest
import torch
from lightllm_grpc_kernels import RELEASE_POLICIES, _launch, programmatic_launch
from lightllm_grpc_kernels.decode_attention import decode_attention
from lightllm_grpc_kernels.gemv import GemvConfig, add_rmsnorm_gemv, gemv, silu_gemv
from lightllm_grpc_kernels.rmsnorm import fused_add_rmsnorm

MODULES = (
    "activation",
    "decode_attention",
    "fp8_gemv",
    "fp8_quant",
    "gemv",
    "gemv_rows",
    "lamport",
    "prefill_attention",
    "rmsnorm",
    "rotary",
    "sampling",
    "store_kv",
)


def _jit_functions(module) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(module)))
    return {
        node.name: node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list)
    }


def _first_call(fn: ast.FunctionDef) -> str:
    body = fn.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    first = body[0]
    assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Call), ast.unparse(first)
    return ast.unparse(first.value.func)


@pytest.mark.parametrize("name", MODULES)
def test_every_kernel_waits_for_its_predecessor_before_anything_else(name: str) -> None:
    module = importlib.import_module(f"lightllm_grpc_kernels.{name}")
    functions = _jit_functions(module)
    kernels = {n: f for n, f in functions.items() if n.endswith("_kernel")}
    assert kernels, f"no kernels found in {name}"
    for kernel_name, fn in kernels.items():
        assert "PDL" in [a.arg for a in fn.args.args], f"{kernel_name} takes no PDL"
        first = _first_call(fn)
        if first in functions:  # a shared body (gemv.py's kernels): its first statement instead
            first = _first_call(functions[first])
        assert first == "wait_for_predecessor", f"{kernel_name} starts with {first}, not the wait"


def test_pdl_only_inside_the_scope_and_only_on_a_gpu() -> None:
    cpu = torch.zeros(1)
    assert _launch.pdl(cpu) == {"PDL": False}
    with programmatic_launch("all"):
        assert _launch.pdl(cpu) == {"PDL": False}  # the interpreter has no launch attribute
    assert lightllm_grpc_kernels.programmatic_launch is programmatic_launch


def test_release_policies_and_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AssertionError, match="release must be one of"), programmatic_launch("early"):
        pass
    monkeypatch.delenv(_launch.PDL_ENV, raising=False)
    assert _launch.forced_release() is None
    for value, forced in (("0", "wait"), ("1", None), ("auto", None), *((p, p) for p in RELEASE_POLICIES)):
        monkeypatch.setenv(_launch.PDL_ENV, value)
        assert _launch.forced_release() == forced


@pytest.mark.gpu
def test_pdl_scope_release_and_switch_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_launch.PDL_ENV, raising=False)
    t = torch.zeros(1, device="cuda")
    if torch.cuda.get_device_capability()[0] < 9:
        with programmatic_launch("all"):
            assert _launch.pdl(t) == {"PDL": False}
        return
    assert _launch.pdl(t) == {"PDL": False}
    wait = {"PDL": _launch.WAIT_ONLY, "launch_pdl": True}
    early = {"PDL": _launch.RELEASE_EARLY, "launch_pdl": True}
    # (policy, a GEMV's keywords, any other kernel's)
    for release, gemv_kw, other_kw in (("wait", wait, wait), ("gemv", early, wait), ("all", early, early)):
        with programmatic_launch(release):
            assert _launch.pdl(t, gemv=True) == gemv_kw and _launch.pdl(t) == other_kw
    with programmatic_launch("wait"):
        monkeypatch.setenv(_launch.PDL_ENV, "all")  # forces one policy over the scope's
        assert _launch.pdl(t) == early
        monkeypatch.setenv(_launch.PDL_ENV, "0")
        assert _launch.pdl(t) == {"PDL": False}


def _layer_chain(dtype: torch.dtype):
    """A decoder layer's batch-1 kernels back to back: norm + qkv GEMV, attention, o GEMV,
    add + norm, gate_up GEMV, SiLU + down GEMV."""
    torch.manual_seed(0)
    dev, h, inter, heads, kv_heads, d, seq = "cuda", 512, 1024, 4, 2, 128, 200
    w = {
        "qkv": torch.randn((heads + 2 * kv_heads) * d, h, device=dev, dtype=dtype) / 16,
        "o": torch.randn(h, heads * d, device=dev, dtype=dtype) / 16,
        "gate_up": torch.randn(2 * inter, h, device=dev, dtype=dtype) / 16,
        "down": torch.randn(h, inter, device=dev, dtype=dtype) / 16,
        "norm": torch.rand(h, device=dev, dtype=dtype) + 0.5,
    }
    k_buf = torch.randn(seq, kv_heads, d, device=dev, dtype=dtype)
    v_buf = torch.randn(seq, kv_heads, d, device=dev, dtype=dtype)
    req_to_token = torch.arange(seq, device=dev, dtype=torch.int32)[None].flip(1).contiguous()
    rows = torch.zeros(1, device=dev, dtype=torch.int32)
    lens = torch.full((1,), seq, device=dev, dtype=torch.int32)
    counters = torch.zeros(kv_heads, device=dev, dtype=torch.int32)
    mid_o = torch.empty(1, heads, 32, d, device=dev)
    mid_lse = torch.empty(1, heads, 32, device=dev)
    x0 = torch.randn(1, h, device=dev, dtype=dtype)
    res0 = torch.randn(1, h, device=dev, dtype=dtype)
    cfg = GemvConfig(16, 256, 4, 3)

    def chain() -> torch.Tensor:
        x, res = x0, res0
        for _ in range(4):
            qkv, res = add_rmsnorm_gemv(x, res, w["norm"], 1e-6, w["qkv"], cfg)
            q = qkv[:, : heads * d].view(1, heads, d)
            attn = decode_attention(q, k_buf, v_buf, req_to_token, rows, lens, d**-0.5, 32, mid_o, mid_lse,
                                    counters=counters)  # fmt: skip
            o = gemv(attn.view(1, -1), w["o"], cfg)
            normed = fused_add_rmsnorm(o, res, w["norm"], 1e-6)
            gate_up = gemv(normed, w["gate_up"], cfg)
            x = silu_gemv(gate_up, w["down"], cfg)
        return torch.cat([x, res], dim=1)

    return chain


@pytest.mark.gpu
@pytest.mark.parametrize("release", RELEASE_POLICIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_graph_with_pdl_gives_the_same_bits(dtype: torch.dtype, release: str) -> None:
    """Every release policy: the kernels released early still wait for their predecessor's data."""
    chain = _layer_chain(dtype)
    outputs = []
    for scoped in (False, True):
        stream = torch.cuda.Stream()
        with programmatic_launch(release) if scoped else contextlib.nullcontext():
            with torch.cuda.stream(stream):
                chain()
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                out = chain()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        outputs.append(out.clone())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
