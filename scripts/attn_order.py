"""Decode attention at 1,000 rows: does putting rows that share a prefix next to each other help?

Run on a GPU: ``PYTHONPATH=.:kernels python3 scripts/attn_order.py``. Prints the kernel's
median time for 50 groups x 20 rows sharing a 1,024-token prefix (rows in random order, rows
grouped) and for rows that share nothing (BENCHMARKS.md, the prefix-cache section).
"""

from __future__ import annotations

import torch
import triton
from lightllm_grpc_kernels.decode_attention import MAX_GROUP_ROWS, cascade_decode_attention, decode_attention

DEV = "cuda"
B, H, HKV, D = 1000, 32, 8, 128
GROUPS, PREFIX, OWN = 50, 1024, 128
S = GROUPS * PREFIX + B * OWN + 16
CTX = PREFIX + OWN


def table(shared: bool, order: torch.Tensor) -> torch.Tensor:
    r2t = torch.empty(B, CTX, dtype=torch.int32, device=DEV)
    for b in range(B):
        g = b % GROUPS
        pre = torch.arange(g * PREFIX, (g + 1) * PREFIX) if shared else torch.randperm(S - 16)[:PREFIX]
        mine = GROUPS * PREFIX + b * OWN + torch.arange(OWN)
        r2t[b] = torch.cat([pre, mine]).to(torch.int32)
    return r2t[order].contiguous()


def main() -> None:
    torch.manual_seed(0)
    k = torch.randn(S, HKV, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(B, H, D, device=DEV, dtype=torch.bfloat16)
    seq = torch.full((B,), CTX, dtype=torch.int32, device=DEV)
    rows = torch.arange(B, dtype=torch.int32, device=DEV)
    groups_of = torch.arange(B) % GROUPS
    variants = {
        "shared, rows random": table(True, torch.randperm(B)),
        "shared, rows grouped": table(True, torch.argsort(groups_of, stable=True)),
        "unshared (all distinct)": table(False, torch.arange(B)),
    }
    gb = B * CTX * HKV * D * 2 * 2 / 1e9
    for name, r2t in variants.items():
        ms = triton.testing.do_bench(
            lambda r2t=r2t: decode_attention(q, k, v, r2t, rows, seq, 0.088),
            warmup=50,
            rep=300,
            return_mode="median",
        )
        print(f"{name:28s} {ms * 1e3:8.1f} us  ({gb / ms:.2f} TB/s if every row read from HBM)")
    grouped = variants["shared, rows grouped"]
    prefix_lens = torch.full((B,), PREFIX, dtype=torch.int32, device=DEV)
    sizes = torch.zeros(B, dtype=torch.int32)
    per_group = B // GROUPS
    for g in range(GROUPS):
        for start in range(g * per_group, (g + 1) * per_group, MAX_GROUP_ROWS):
            sizes[start] = min(MAX_GROUP_ROWS, (g + 1) * per_group - start)
    sizes = sizes.to(DEV)
    ref = decode_attention(q, k, v, grouped, rows, seq, 0.088)
    got = cascade_decode_attention(q, k, v, grouped, rows, seq, prefix_lens, sizes, 0.088)
    print("cascade max abs diff vs plain:", (got.float() - ref.float()).abs().max().item())
    ms = triton.testing.do_bench(
        lambda: cascade_decode_attention(q, k, v, grouped, rows, seq, prefix_lens, sizes, 0.088),
        warmup=50,
        rep=300,
        return_mode="median",
    )
    print(f"{f'cascade, groups of {MAX_GROUP_ROWS}':28s} {ms * 1e3:8.1f} us")


if __name__ == "__main__":
    main()
