"""FP8 against bf16 on one GPU: accuracy, GEMM timings and batch-1 decode, in a few minutes.

``python -m lightllm_grpc.bench.fp8_check --out DIR [--model CHECKPOINT] [--checks weights,kv]``

``weights`` (FP8 linear layers, ``--quantization fp8``) runs 1.-3.; ``kv`` (the FP8 KV cache,
``--kv-cache-dtype fp8_e4m3``) runs 4.-5.; both by default.

1. Accuracy over 4,096 positions (16 random sequences of 256 tokens, logits at every position)
   of the bf16 model and its FP8 version: top-1 agreement, mean / p99 KL(bf16 || fp8), and
   agreement where bf16's top-1 margin is decisive (>= 0.5 standard deviations of its logits).
   Models: the 8B Llama-3 shape with dummy weights (``init_dummy_weights``: the FP8 model is
   exactly the quantized bf16 one), a ~1B model with transformers' own init saved as a bf16
   checkpoint and quantized at load, and ``--model`` (a real checkpoint) if given. Random-init
   models have nearly tied logits, so their overall agreement is far below a trained model's;
   the decisive-margin agreement and the KL are the numbers to read there.
2. GEMM time per 8B linear shape at M = 1, 16, 256, 4096: bf16 ``F.linear`` vs per-token
   quantization + ``torch._scaled_mm`` (W8A8), and at M <= 16 the W8A16 kernel the FP8 layers
   run there (its default config, and the best of ``FP8_GEMV_CONFIGS``) (CUDA graphs, weights
   rotated out of L2).
3. Batch-1 decode through the shard runner (CUDA graphs) on the 8B dummy shape, bf16 vs FP8.
4. The FP8 KV cache's accuracy, measured the same way on the same models (bf16 weights on
   both sides; the cache in bf16 vs e4m3 with the checkpoint's scales, 1.0 without): every
   position's attention reads its keys and values back from the pool, quantized.
5. Decode attention alone (the Triton kernel, CUDA graphs) over 8B-shaped pools (32 query and
   8 kv heads of 128) at 4,096 tokens of context, bf16 vs e4m3 pool, batch 1 to 128.

Writes ``fp8-check.json`` and prints a summary. gRPC-level numbers: ``python -m
lightllm_grpc.bench.gpu --quantization fp8 --skip-transformers``.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lightllm_grpc.layers.forward_batch import ForwardBatch, ForwardMode
from lightllm_grpc.models.loader import load_model

EIGHT_B_LINEARS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ONE_B = {  # TinyLlama's shape, transformers' init
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}


def prefill_batch(ids: torch.Tensor) -> tuple[torch.Tensor, ForwardBatch]:
    """``ids [B, L]`` as one prefill of B sequences at slots 0..B*L-1, logits at every position."""
    b, length = ids.shape
    dev = ids.device

    def i32(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.int32)

    batch = ForwardBatch(
        mode=ForwardMode.PREFILL,
        positions=torch.arange(length, device=dev).repeat(b),
        out_slots=torch.arange(b * length, device=dev),
        req_rows=i32(torch.arange(b, device=dev)),
        seq_lens=i32(torch.full((b,), length, device=dev)),
        q_starts=i32(torch.arange(b, device=dev) * length),
        q_lens=i32(torch.full((b,), length, device=dev)),
        req_to_token=i32(torch.arange(b * length, device=dev).view(b, length)),
        logits_indices=torch.arange(b * length, device=dev),
        max_q_len=length,
        max_seq_len=length,
    )
    return ids.reshape(-1), batch


@torch.no_grad()
def all_logits(model: torch.nn.Module, ids: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """fp32 logits ``[B * L, V]`` of every position, ``chunk`` sequences per forward."""
    out = []
    dtype = model.lm_head.weight.dtype
    for part in ids.split(chunk):
        kv = model.kv_cache_spec.make_cache(part.numel(), dtype, ids.device)
        flat, batch = prefill_batch(part)
        out.append(model(flat, batch, kv).float())
        del kv
    return torch.cat(out)


def compare_logits(reference: torch.Tensor, quantized: torch.Tensor, decisive_sigma: float = 0.5) -> dict:
    """Top-1 agreement, KL(reference || quantized) and agreement where the reference is decisive."""
    logp_ref, logp_q = reference.log_softmax(-1), quantized.log_softmax(-1)
    kl = (logp_ref.exp() * (logp_ref - logp_q)).sum(-1)
    agree = reference.argmax(-1) == quantized.argmax(-1)
    top2 = reference.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    decisive = margin >= decisive_sigma * reference.std(dim=-1)
    rel = (quantized - reference).norm() / reference.norm()
    return {
        "positions": int(agree.numel()),
        "top1_agreement": agree.float().mean().item(),
        "decisive_positions": int(decisive.sum()),
        "decisive_top1_agreement": agree[decisive].float().mean().item() if decisive.any() else float("nan"),
        "mean_kl": kl.mean().item(),
        "p99_kl": kl.quantile(0.99).item(),
        "logits_rel_l2_error": rel.item(),
        "median_top1_margin": margin.median().item(),
    }


# What each accuracy check compares with the bf16 model: load_model's arguments for the other side.
VARIANTS = {"fp8-weights": {"quantization": "fp8"}, "fp8-kv": {"kv_cache_dtype": "fp8_e4m3"}}


def _backend(model_dir: Path, device: torch.device, batch: int):
    """The server's attention backend for ``device`` (Triton on CUDA), ``batch`` sequences at once."""
    from lightllm_grpc.layers.ops import Ops
    from lightllm_grpc.models.config import ModelConfig

    cfg = ModelConfig.from_pretrained(model_dir)
    return Ops.for_device(device).attention(batch + 1, cfg.num_heads, cfg.head_dim, device, torch.bfloat16)


def accuracy(
    model_dir: Path,
    load_format: str,
    sequences: int = 16,
    length: int = 256,
    seed: int = 0,
    backend: Any = None,
    device: str = "cuda",
    variant: str = "fp8-weights",
) -> dict:
    """bf16 vs FP8 logits at every position of ``sequences`` random sequences. ``variant``:
    ``fp8-weights`` quantizes the linear layers at load (``model_dir`` must hold a
    high-precision checkpoint, or a dummy config); ``fp8-kv`` keeps the weights and stores the
    KV cache in e4m3 (``--kv-cache-dtype fp8_e4m3``). ``backend``: the attention backend
    (default: the server's); the layers' ops are ``Ops.for_device(device)``, as the server's."""
    backend = backend or _backend(model_dir, torch.device(device), 4)
    common = dict(device=device, dtype="bfloat16", attn_backend=backend, load_format=load_format, seed=seed)
    ref_model = load_model(model_dir, **common)
    vocab = ref_model.config.vocab_size
    ids = torch.randint(0, vocab, (sequences, length), generator=torch.Generator().manual_seed(seed)).to(
        device
    )
    reference = all_logits(ref_model, ids)
    del ref_model
    _free()
    quantized = all_logits(load_model(model_dir, **VARIANTS[variant], **common), ids)
    _free()
    return compare_logits(reference, quantized)


def gemm_timings(ms: tuple[int, ...] = (1, 16, 256, 4096)) -> dict:
    """Microseconds per matmul of each 8B linear shape: bf16 vs FP8 W8A8 (quantize x + _scaled_mm),
    and up to ``W8A16_MAX_M`` tokens the W8A16 kernel (default config and best candidate)."""
    import triton.testing

    from lightllm_grpc.layers.fp8 import W8A16_MAX_M, fp8_linear_scaled_mm, quantize_weight

    out: dict[str, Any] = {}
    for name, (n, k) in EIGHT_B_LINEARS.items():
        copies = max(2, min(8, (512 << 20) // (n * k * 2)))  # rotate weights so L2 cannot serve them
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        fp8 = [quantize_weight(w) for w in dense]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            turn = iter(range(1 << 30))

            def bf16(x=x, turn=turn, dense=dense) -> None:
                F.linear(x, dense[next(turn) % len(dense)])

            def f8(x=x, turn=turn, fp8=fp8) -> None:
                q, s = fp8[next(turn) % len(fp8)]
                fp8_linear_scaled_mm(x, q, s, None, None)

            t = {"bf16_us": triton.testing.do_bench_cudagraph(bf16) * 1e3}
            t["fp8_us"] = triton.testing.do_bench_cudagraph(f8) * 1e3
            t["speedup"] = t["bf16_us"] / t["fp8_us"]
            if m <= W8A16_MAX_M:
                t.update(_w8a16_timings(x, fp8, t["bf16_us"]))
            out[f"{name} [{n}x{k}] M={m}"] = t
        del dense, fp8
        _free()
    return out


def _w8a16_timings(x: torch.Tensor, fp8: list[tuple[torch.Tensor, torch.Tensor]], bf16_us: float) -> dict:
    """The W8A16 kernel on ``x`` with the rotated e4m3 weights: its default config (what the
    layers run) and the fastest of ``FP8_GEMV_CONFIGS``."""
    import triton.testing
    from lightllm_grpc_kernels.fp8_gemv import FP8_GEMV_CONFIGS, Fp8GemvConfig, fp8_gemv

    turn = iter(range(1 << 30))

    def run(config: Fp8GemvConfig) -> None:
        q, s = fp8[next(turn) % len(fp8)]
        fp8_gemv(x, q, s, None, config)

    timed = {c: triton.testing.do_bench_cudagraph(lambda c=c: run(c)) * 1e3 for c in FP8_GEMV_CONFIGS}
    default, best = timed[Fp8GemvConfig()], min(timed, key=timed.get)
    n, k = fp8[0][0].shape
    return {"w8a16_us": default, "w8a16_speedup": bf16_us / default, "w8a16_tb_per_s": n * k / default / 1e6,
            "w8a16_best_us": timed[best], "w8a16_best_config": str(best)}  # fmt: skip


def _gemm_line(shape: str, t: dict) -> str:
    line = f"GEMM {shape}: bf16 {t['bf16_us']:.1f} us, W8A8 {t['fp8_us']:.1f} us ({t['speedup']:.2f}x)"
    if "w8a16_us" in t:
        line += f", W8A16 {t['w8a16_us']:.1f} us ({t['w8a16_speedup']:.2f}x, {t['w8a16_tb_per_s']:.2f} TB/s"
        line += f"; best {t['w8a16_best_us']:.1f} us with {t['w8a16_best_config']})"
    return line


def decode_speed(model_dir: Path) -> dict:
    from lightllm_grpc.bench.gpu import decode_breakdown

    result = {}
    for label, quant in (("bf16", None), ("fp8", "fp8")):
        d = decode_breakdown(model_dir, quantization=quant)
        d["tokens_per_s"] = 1e3 / d["runner_step_ms"]
        result[label] = d
        _free()
    return result


def kv_attention_timings(batches: tuple[int, ...] = (1, 8, 32, 128), context: int = 4096) -> dict:
    """Microseconds per decode-attention call (one layer) on a bf16 pool and on an e4m3 one with
    scales, 8B's heads (32 query, 8 kv, 128 dims), every sequence ``context`` tokens long."""
    out = {}
    for batch in batches:
        out[f"batch {batch} x {context} tokens"] = _attention_us(batch, context)
        _free()
    return out


def _attention_us(batch: int, context: int, heads: int = 32, kv_heads: int = 8, dim: int = 128) -> dict:
    import triton.testing
    from lightllm_grpc_kernels.decode_attention import decode_attention, decode_num_splits

    slots, splits = batch * context, decode_num_splits(batch)
    k = torch.randn(slots, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    scale = torch.tensor(4.0 / 448, device="cuda")  # |x| up to 4 sits inside e4m3's range
    k8, v8 = ((x.float() / scale).to(torch.float8_e4m3fn) for x in (k, v))
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(slots, device="cuda").to(torch.int32).view(batch, context)  # scattered slots
    rows = torch.arange(batch, device="cuda", dtype=torch.int32)
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    work = {
        "scale": dim**-0.5,
        "mid_o": torch.empty(batch, heads, splits, dim, device="cuda"),
        "mid_lse": torch.empty(batch, heads, splits, device="cuda"),
    }

    def bf16() -> None:
        decode_attention(q, k, v, table, rows, lens, **work)

    def fp8() -> None:
        decode_attention(q, k8, v8, table, rows, lens, **work, k_scale=scale, v_scale=scale)

    t = {
        "bf16_us": triton.testing.do_bench_cudagraph(bf16) * 1e3,
        "fp8_us": triton.testing.do_bench_cudagraph(fp8) * 1e3,
    }
    t["speedup"] = t["bf16_us"] / t["fp8_us"]
    return t


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _one_b_checkpoint(out: Path) -> Path:
    """A ~1B Llama with transformers' init, saved as a bf16 checkpoint (quantized at load later)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = out / "llama-1b-init"
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        return folder
    config = AutoConfig.for_model(**{k: v for k, v in ONE_B.items() if k != "architectures"})
    config.architectures = ONE_B["architectures"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    _free()
    return folder


def main(argv: list[str] | None = None) -> None:
    from lightllm_grpc.bench.gpu import param_bytes, prepare_model_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("fp8-check-out"))
    p.add_argument("--model", type=Path, default=None, help="also check this (bf16 or FP8) checkpoint")
    p.add_argument("--skip-speed", action="store_true", help="accuracy only")
    p.add_argument(
        "--checks",
        default="weights,kv",
        help="comma-separated: weights (FP8 linear layers), kv (FP8 KV cache, --kv-cache-dtype fp8_e4m3)",
    )
    args = p.parse_args(argv)
    checks = set(args.checks.split(","))
    if not checks or not checks <= {"weights", "kv"}:
        p.error(f"--checks takes weights and/or kv, got {args.checks!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    eight_b = prepare_model_dir(args.out)
    config = json.loads((eight_b / "config.json").read_text())
    models = {"8b_dummy": (eight_b, "dummy"), "1b_transformers_init": (_one_b_checkpoint(args.out), "auto")}
    if args.model is not None:
        models[str(args.model)] = (args.model, "auto")
    result: dict[str, Any] = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    if "weights" in checks:
        result["weight_gb"] = {"bf16": param_bytes(config) / 1e9, "fp8": param_bytes(config, fp8=True) / 1e9}
        result["accuracy"] = {}
        for name, (folder, load_format) in models.items():
            result["accuracy"][name] = accuracy(folder, load_format)
            print(f"FP8 weights, {name}:", json.dumps(result["accuracy"][name]), flush=True)
    if "kv" in checks:
        result["kv_cache_accuracy"] = {}
        for name, (folder, load_format) in models.items():
            result["kv_cache_accuracy"][name] = accuracy(folder, load_format, variant="fp8-kv")
            print(f"FP8 KV cache, {name}:", json.dumps(result["kv_cache_accuracy"][name]), flush=True)
    if not args.skip_speed and "weights" in checks:
        result["gemm_us"] = gemm_timings()
        for shape, t in result["gemm_us"].items():
            print(_gemm_line(shape, t))
        result["decode_batch1"] = decode_speed(eight_b)
        d = result["decode_batch1"]
        print(
            f"batch-1 decode (runner, CUDA graphs): bf16 {d['bf16']['tokens_per_s']:.1f} tok/s "
            f"({d['bf16']['graph_replay_ms']:.2f} ms graph), fp8 {d['fp8']['tokens_per_s']:.1f} tok/s "
            f"({d['fp8']['graph_replay_ms']:.2f} ms graph)"
        )
    if not args.skip_speed and "kv" in checks:
        result["kv_decode_attention_us"] = kv_attention_timings()
        for shape, t in result["kv_decode_attention_us"].items():
            line = f"decode attention {shape}: bf16 pool {t['bf16_us']:.1f} us, e4m3 {t['fp8_us']:.1f} us"
            print(f"{line} ({t['speedup']:.2f}x)")
    result["seconds"] = time.perf_counter() - started
    (args.out / "fp8-check.json").write_text(json.dumps(result, indent=2))
    print(f"done in {result['seconds']:.0f} s -> {args.out / 'fp8-check.json'}")


if __name__ == "__main__":
    main()
