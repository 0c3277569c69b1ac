"""Compiles the kernels for an H100 (sm_90) on a machine without one; run as a module.

``python -m tests.kernels.compile_for_hopper [case ...]`` prints ``{case: "ok" | error}`` as
JSON. Triton's front end and its bundled ptxas run on the CPU, so a kernel the interpreter
accepts but the compiler rejects (a non-constexpr global, a lowering that does not exist, a
layout pass that fails once the arguments are specialised as a launch would) fails here,
not on the GPU. It must run without ``TRITON_INTERPRET`` (the tests' conftest sets
it, so ``test_kernels_compile_for_hopper.py`` runs this in a subprocess).
"""

from __future__ import annotations

import importlib
import json
import sys

import triton
from lightllm_grpc_kernels._launch import RELEASE_EARLY
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)
GEMV = {
    "w_ptr": "*bf16",
    "y_ptr": "*bf16",
    "n": "i32",
    "k": "i32",
    "stride_w": "i32",
    "scale_ptr": "*bf16",
    "bias_ptr": "*bf16",
}
GEMV_BLOCKS = {"BLOCK_N": 8, "BLOCK_K": 512, "NUM_STAGES": 3, "SCALED": False, "HAS_BIAS": False}
# An FP8 layer's one-token GEMV: e4m3 weight, fp32 scales, a bias in the model dtype.
FP8_GEMV = {**GEMV, "w_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}
FP8_BLOCKS = {**GEMV_BLOCKS, "BLOCK_K": 512, "SCALED": True, "HAS_BIAS": True}
# gemv_rows.py: a few tokens' rows of x, strided.
GEMV_ROWS = {**GEMV, "x_ptr": "*bf16", **dict.fromkeys(("stride_x", "stride_y"), "i32")}
GEMV_ROWS_BLOCKS = {**GEMV_BLOCKS, "ROWS": 4, "BLOCK_K": 256}
NORM_GEMV = {
    **GEMV,
    "x_ptr": "*bf16",
    "res_ptr": "*bf16",
    "res_out_ptr": "*bf16",
    "norm_w_ptr": "*bf16",
    "eps": "fp32",
}
# Two ranks' bf16 all-reduce (lamport.py): the bits are int16, the sentinel -0.0's.
LAMPORT_ROWS = {
    **dict.fromkeys(("x_ptr", "res_ptr", "w_ptr", "out_ptr"), "*bf16"),
    "bits_ptr": "*i16",
    "table_ptr": "*i64",
    "state_ptr": "*i32",
    **dict.fromkeys(("n_cols", "rank", "max_elems", "max_spins"), "i32"),
    "eps": "fp32",
}
STRIDES = (
    "stride_qt",
    "stride_qh",
    "stride_kt",
    "stride_kh",
    "stride_vt",
    "stride_vh",
    "stride_bs",
    "stride_bh",
)
STORE = {
    **dict.fromkeys(("q_ptr", "k_ptr", "v_ptr"), "*bf16"),
    **dict.fromkeys(("k_buf_ptr", "v_buf_ptr"), "*fp8e4nv"),
    **dict.fromkeys(("slots_ptr", "pos_ptr"), "*i64"),
    **dict.fromkeys(("cos_ptr", "sin_ptr", "k_scale_ptr", "v_scale_ptr"), "*fp32"),
    **dict.fromkeys((*STRIDES, "stride_cos", "stride_sin", "num_q_heads", "num_kv_heads", "head_dim"), "i32"),
}
STORE_CONSTS = {"FP8_MAX": 448.0, "BLOCK_HQ": 32, "BLOCK_HK": 8, "BLOCK_HALF": 64, "BLOCK_D": 128}
DECODE = {
    **dict.fromkeys(("q_ptr", "k_buf_ptr", "v_buf_ptr", "out_ptr"), "*bf16"),
    **dict.fromkeys(
        ("req_to_token_ptr", "req_rows_ptr", "seq_lens_ptr", "kv_starts_ptr", "counters_ptr"), "*i32"
    ),
    **dict.fromkeys(("mid_o_ptr", "mid_lse_ptr", "k_scale_ptr", "v_scale_ptr", "qk_scale"), "*fp32"),
    **dict.fromkeys(("stride_qb", "stride_qh", "stride_ob", "stride_oh", "stride_bs", "stride_bh"), "i32"),
    **dict.fromkeys(("stride_rt", "num_heads", "num_kv_heads", "head_dim"), "i32"),
    "qk_scale": "fp32",
}
DECODE_CONSTS = {
    "GROUP": 4, "NUM_SPLITS": 32, "HAS_PREFIX": False, "KV_FP8": False, "MERGE": True,
    "BLOCK_G": 16, "BLOCK_N": 64, "BLOCK_D": 128, "BLOCK_S": 32, "DOT_PRECISION": "tf32", "FP8_F16": False,
}  # fmt: skip
SHARED_PREFIX = {
    **dict.fromkeys(("q_ptr", "k_buf_ptr", "v_buf_ptr"), "*bf16"),
    **dict.fromkeys(("req_to_token_ptr", "req_rows_ptr", "prefix_lens_ptr", "group_sizes_ptr"), "*i32"),
    **dict.fromkeys(("mid_o_ptr", "mid_lse_ptr", "k_scale_ptr", "v_scale_ptr"), "*fp32"),
    **dict.fromkeys(
        ("stride_qb", "stride_qh", "stride_bs", "stride_bh", "stride_rt", "num_heads", "head_dim"), "i32"
    ),
    "qk_scale": "fp32",
}
SHARED_PREFIX_CONSTS = {
    "GROUP": 4, "NUM_SPLITS": 4, "KV_FP8": False, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128,
    "DOT_PRECISION": "tf32",
}  # fmt: skip
PREFILL = {
    **dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "k_buf_ptr", "v_buf_ptr", "out_ptr"), "*bf16"),
    **dict.fromkeys(
        ("req_to_token_ptr", "req_rows_ptr", "seq_lens_ptr", "q_starts_ptr", "q_lens_ptr"), "*i32"
    ),
    **dict.fromkeys(("k_scale_ptr", "v_scale_ptr"), "*fp32"),
    **dict.fromkeys((*STRIDES, "stride_ot", "stride_oh", "stride_rt", "head_dim"), "i32"),
    "qk_scale": "fp32",
}
PREFILL_CONSTS = {"GROUP": 4, "KV_FP8": False, "BLOCK_D": 128, "DOT_PRECISION": "tf32"}
RMSNORM = {
    **dict.fromkeys(("x_ptr", "res_ptr", "w_ptr", "out_ptr"), "*bf16"),
    **dict.fromkeys(("stride_x", "stride_r", "stride_o", "n_cols"), "i32"),
    "eps": "fp32",
}

# fp8_quant.py's fused kernels: bf16 activations in, e4m3 and fp32 scales out.
QUANT_OUT = {"q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "static_scale_ptr": "*fp32", "stride_q": "i32"}
QUANT_CONSTS = {"STATIC": False, "QMAX": 448.0, "SCALE_MIN": 1e-12}
NORM_QUANT = {**{k: v for k, v in RMSNORM.items() if k not in ("out_ptr", "stride_o")}, **QUANT_OUT}
SILU_QUANT = {"h_ptr": "*bf16", "stride_h": "i32", "inter": "i32", **QUANT_OUT}


def _prefill_cases(kernel: object) -> dict[str, tuple]:
    """Prefill attention as the launcher picks it on Hopper: the chunk's K/V through TMA descriptors,
    by pointers, or from the pool alone (with their tiles, warps and stages)."""

    def options(warps: int, stages: int) -> dict[str, int]:
        return {"num_warps": warps, "num_stages": stages}

    tiles = {**PREFILL_CONSTS, "BLOCK_M": 128, "BLOCK_N": 128}
    no_desc = dict.fromkeys(("q_desc", "k_desc", "v_desc"), None)
    pool = {**tiles, **no_desc, "CHUNK_KV": False, "TMA": False}
    ptr = {**pool, "CHUNK_KV": True}
    tma = {**tiles, "CHUNK_KV": True, "TMA": True}
    descs = dict.fromkeys(no_desc, "tensordesc<bf16[128, 128]>")
    return {
        "prefill_attention pool": (kernel, PREFILL, pool, True, options(8, 2)),
        "prefill_attention chunk by pointers": (kernel, PREFILL, ptr, True, options(8, 2)),
        "prefill_attention chunk by TMA 128x128": (kernel, {**PREFILL, **descs}, tma, True, options(8, 3)),
    }


def _decode_large_batch_fp8(decode: object) -> tuple:
    """Stage 1 over an e4m3 pool with the tiles a large batch gets (one split, one warp)."""
    block_n, warps, stages = decode.stage1_tiles(True, 1)
    consts = {
        **DECODE_CONSTS, "NUM_SPLITS": 1, "MERGE": False, "KV_FP8": True, "FP8_F16": True, "BLOCK_S": 1,
        "BLOCK_N": block_n,
    }  # fmt: skip
    types = {**DECODE, "k_buf_ptr": "*fp8e4nv", "v_buf_ptr": "*fp8e4nv"}
    return decode._decode_stage1_kernel, types, consts, True, {"num_warps": warps, "num_stages": stages}


def cases() -> dict[str, tuple]:
    """case -> (kernel, argument types, constexpr values, FMA contraction on[, compile options])."""
    modules = (
        "gemv", "store_kv", "rmsnorm", "decode_attention", "lamport", "prefill_attention", "gemv_rows",
        "fp8_quant",
    )  # fmt: skip
    gemv, store, norm, decode, lamport, prefill, gemv_rows, quant = (
        importlib.import_module(f"lightllm_grpc_kernels.{m}") for m in modules
    )
    bf16_pool = {**STORE, "k_buf_ptr": "*bf16", "v_buf_ptr": "*bf16"}
    with_res, no_res = ({**GEMV_BLOCKS, "HAS_RESIDUAL": r} for r in (True, False))
    rows = {"WORLD": 2, "BLOCK": 4096, "SENT": -(1 << 15)}
    fp8_norm = {**NORM_GEMV, **FP8_GEMV}
    fp8, same = ({**STORE_CONSTS, "KV_FP8": f} for f in (True, False))
    return {
        "gemv": (gemv._gemv_kernel, {**GEMV, "x_ptr": "*bf16"}, GEMV_BLOCKS, True),
        "silu_gemv": (gemv._silu_gemv_kernel, {**GEMV, "h_ptr": "*bf16"}, GEMV_BLOCKS, True),
        "add_rmsnorm_gemv": (gemv._add_rmsnorm_gemv_kernel, NORM_GEMV, with_res, True),
        "add_rmsnorm_gemv no residual": (gemv._add_rmsnorm_gemv_kernel, NORM_GEMV, no_res, True),
        "gemv fp8": (gemv._gemv_kernel, {**FP8_GEMV, "x_ptr": "*bf16"}, FP8_BLOCKS, True),
        "gemv_rows": (gemv_rows._gemv_rows_kernel, GEMV_ROWS, GEMV_ROWS_BLOCKS, True),
        "gemv_rows fp8": (
            gemv_rows._gemv_rows_kernel,
            {**GEMV_ROWS, **FP8_GEMV, "x_ptr": "*bf16"},
            {**GEMV_ROWS_BLOCKS, "BLOCK_N": 4, "BLOCK_K": 512, "SCALED": True, "HAS_BIAS": True},
            True,
        ),
        "silu_gemv fp8": (gemv._silu_gemv_kernel, {**FP8_GEMV, "h_ptr": "*bf16"}, FP8_BLOCKS, True),
        "add_rmsnorm_gemv fp8": (
            gemv._add_rmsnorm_gemv_kernel,
            fp8_norm,
            {**FP8_BLOCKS, "HAS_RESIDUAL": True},
            True,
        ),
        "lamport all-reduce": (
            lamport._lamport_rows_kernel,
            LAMPORT_ROWS,
            {**rows, "NORM": False, "HAS_RESIDUAL": False},
            False,
        ),
        "lamport add_rmsnorm": (
            lamport._lamport_rows_kernel,
            LAMPORT_ROWS,
            {**rows, "NORM": True, "HAS_RESIDUAL": True},
            False,
        ),
        "rotary_store_kv fp8": (store._rotary_store_kv_kernel, STORE, fp8, False),
        "rotary_store_kv bf16": (store._rotary_store_kv_kernel, bf16_pool, same, False),
        "fused_add_rmsnorm": (norm._rmsnorm_kernel, RMSNORM, {"HAS_RESIDUAL": True, "BLOCK": 4096}, False),
        "decode_attention merged in one launch": (decode._decode_stage1_kernel, DECODE, DECODE_CONSTS, True),
        "decode_attention e4m3 pool, large batch": _decode_large_batch_fp8(decode),
        "cascade shared prefix": (decode._shared_prefix_kernel, SHARED_PREFIX, SHARED_PREFIX_CONSTS, True),
        "add_rmsnorm_quant_fp8": (
            quant._add_rmsnorm_quant_kernel,
            NORM_QUANT,
            {**QUANT_CONSTS, "HAS_RESIDUAL": True, "BLOCK": 4096},
            False,
            {"num_warps": 8},
        ),
        "silu_and_mul_quant_fp8": (
            quant._silu_and_mul_quant_kernel,
            SILU_QUANT,
            {**QUANT_CONSTS, "BLOCK": 2048},
            False,
            {"num_warps": 8},
        ),
        **_prefill_cases(prefill._prefill_attention_kernel),
    }


def compile_case(
    kernel: object,
    types: dict[str, str],
    constexprs: dict[str, object],
    fma: bool,
    options: dict[str, int] | None = None,
) -> str:
    # As launched on Hopper with programmatic dependent launch, releasing the next kernel early:
    # the PTX must show the release and the in-kernel wait (WAIT_ONLY compiles the wait alone).
    constexprs = {**constexprs, "PDL": RELEASE_EARLY}
    signature = {**types, **dict.fromkeys(constexprs, "constexpr")}
    names = list(kernel.arg_names)
    if sorted(names) != sorted(signature):
        return f"argument names {sorted(signature)} != the kernel's {names}"
    # What a launch on the GPU specializes on: 16-aligned pointers, int arguments divisible
    # by 16 (hidden sizes, strides). Some lowerings fail only with these (the layout passes).
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if signature[n] != "constexpr" and not signature[n].startswith(("fp", "tensordesc"))
    }
    source = ASTSource(
        fn=kernel, signature={n: signature[n] for n in names}, constexprs=constexprs, attrs=attrs
    )
    try:
        compiled = triton.compile(
            source, target=HOPPER, options={"num_warps": 4, **(options or {}), "enable_fp_fusion": fma}
        )
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    ptx = compiled.asm.get("ptx", "")
    if "griddepcontrol.wait" not in ptx:
        return "no griddepcontrol.wait: the kernel would not wait for the one before it"
    if "griddepcontrol.launch_dependents" not in ptx:
        return "no griddepcontrol.launch_dependents: the kernel would not release the next one early"
    return "ok" if compiled.asm.get("cubin") else "no cubin"


def main(argv: list[str]) -> None:
    table = cases()
    print(json.dumps({name: compile_case(*table[name]) for name in (argv or list(table))}))


if __name__ == "__main__":
    main(sys.argv[1:])
