"""Decode attention at 1,000 rows: does putting rows that share a prefix next to each other help (L2)?"""
import torch, triton
from lightllm_grpc_kernels.decode_attention import decode_attention
torch.manual_seed(0)
dev = "cuda"; B, H, HKV, D = 1000, 32, 8, 128
groups, prefix, own = 50, 1024, 128
S = groups * prefix + B * own + 16
k = torch.randn(S, HKV, D, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
ctx = prefix + own
def table(shared: bool, order):
    r2t = torch.empty(B, ctx, dtype=torch.int32, device=dev)
    for b in range(B):
        g = b % groups
        pre = torch.arange(g * prefix, (g + 1) * prefix) if shared else torch.randperm(S - 16)[:prefix]
        mine = groups * prefix + b * own + torch.arange(own)
        r2t[b] = torch.cat([pre, mine]).to(torch.int32)
    return r2t[order].contiguous()
seq = torch.full((B,), ctx, dtype=torch.int32, device=dev)
rows = torch.arange(B, dtype=torch.int32, device=dev)
groups_of = torch.arange(B) % groups
variants = {
    "shared, rows random": table(True, torch.randperm(B)),
    "shared, rows grouped": table(True, torch.argsort(groups_of, stable=True)),
    "unshared (all distinct)": table(False, torch.arange(B)),
}
for name, r2t in variants.items():
    f = lambda: decode_attention(q, k, v, r2t, rows, seq, 0.088)
    ms = triton.testing.do_bench(f, warmup=50, rep=300, return_mode="median")
    gb = B * ctx * HKV * D * 2 * 2 / 1e9
    print(f"{name:28s} {ms*1e3:8.1f} us  ({gb/ms:.2f} TB/s if every row read from HBM; x32 layers = {ms*32:.1f} ms/step)")
