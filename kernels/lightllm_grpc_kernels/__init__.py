"""Triton kernels of the GPU path, each beside a thin launcher and a torch reference (``*_ref``)."""

from lightllm_grpc_kernels._launch import RELEASE_POLICIES, forced_release, programmatic_launch
from lightllm_grpc_kernels.activation import silu_and_mul
from lightllm_grpc_kernels.decode_attention import decode_attention, decode_num_splits, decode_workspace_rows
from lightllm_grpc_kernels.prefill_attention import prefill_attention
from lightllm_grpc_kernels.rmsnorm import fused_add_rmsnorm, rmsnorm
from lightllm_grpc_kernels.rotary import apply_rotary
from lightllm_grpc_kernels.sampling import apply_penalties, sample
from lightllm_grpc_kernels.store_kv import rotary_store_kv, store_kv

__all__ = [
    "RELEASE_POLICIES",
    "apply_penalties",
    "apply_rotary",
    "decode_attention",
    "decode_num_splits",
    "decode_workspace_rows",
    "forced_release",
    "fused_add_rmsnorm",
    "prefill_attention",
    "programmatic_launch",
    "rmsnorm",
    "rotary_store_kv",
    "sample",
    "silu_and_mul",
    "store_kv",
]
