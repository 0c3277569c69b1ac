"""``make bench-gpu``: our server, a transformers baseline and the hardware floor, in one run.

Workloads (8B Llama-3 shape, bf16, random weights via ``--load-format dummy``):
  W1  batch-1 decode, in 128 / out 256, through the gRPC API (ms per token, tokens/s)
  W2  1,000 requests of in 256 / out 256 with ignore_eos, all submitted at once (output tokens/s)
  B128 128 requests of in 512 / out 256 at once, against transformers at batch 128
The floor: weight bytes over the measured device-copy bandwidth (batch-1 roofline).
Writes ``bench-gpu.json`` and ``bench-gpu.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from importlib import resources
from pathlib import Path

import torch

from lightllm_grpc.aio import run
from lightllm_grpc.bench.load import Workload, run_load
from lightllm_grpc.bench.server import LocalServer
from lightllm_grpc.models.tiny_tokenizer import save_tokenizer


def copy_bandwidth(nbytes: int = 4 << 30, iters: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def prepare_model_dir(out: Path) -> Path:
    model_dir = out / "llama3-8b-dummy"
    model_dir.mkdir(parents=True, exist_ok=True)
    config = resources.files("lightllm_grpc.assets").joinpath("llama3-8b-config.json").read_text()
    (model_dir / "config.json").write_text(config)
    if not (model_dir / "tokenizer.json").exists():
        save_tokenizer(json.loads(config)["vocab_size"], model_dir)
    return model_dir


def param_bytes(config: dict, fp8: bool = False) -> int:
    """Bytes of weights read per decode step: bf16, or with FP8 (1-byte) decoder linear layers."""
    h, i, v, n = (
        config["hidden_size"],
        config["intermediate_size"],
        config["vocab_size"],
        config["num_hidden_layers"],
    )
    hd = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd
    linear = h * (h + 2 * kv) + h * h + 3 * h * i
    return n * ((1 if fp8 else 2) * linear + 2 * 2 * h) + 2 * (2 * v * h + h)


def ours(model_dir: Path, out: Path, args: argparse.Namespace) -> dict:
    server = LocalServer(
        model_dir,
        out / "server.log",
        "--load-format",
        "dummy",
        "--dtype",
        "bfloat16",
        "--device",
        "cuda",
        "--max-running-requests",
        str(args.max_running),
        *(["--quantization", args.quantization] if args.quantization else []),
        start_timeout=900,
    )
    vocab = 128256
    try:
        results: dict = {"server_info": str(server.info()).replace("\n", "; ")}
        w1 = [run(run_load(server.address, Workload(1, 128, 256, 1, vocab, seed=s))) for s in range(3)]
        results["w1"] = min((r.as_dict() for r in w1), key=lambda d: d["tpot_p50_ms"])
        results["w1_runs_tpot_ms"] = [r.tpot_p50_ms for r in w1]
        results["b128"] = run(run_load(server.address, Workload(128, 512, 256, 128, vocab))).as_dict()
        results["w2"] = run(
            run_load(server.address, Workload(args.w2_requests, 256, 256, args.w2_requests, vocab))
        ).as_dict()
    finally:
        server.stop()
    return results


def decode_breakdown(
    model_dir: Path, context: int = 128, iters: int = 200, quantization: str | None = None
) -> dict:
    """Batch-1 decode without the server: the CUDA graph alone, and the shard runner's whole step."""
    from lightllm_grpc.config import ShardConfig
    from lightllm_grpc.proto import shard_pb2
    from lightllm_grpc.shard.warmup import warmup
    from lightllm_grpc.shard.worker import build_shard, prefill_step

    cfg = ShardConfig(model=model_dir, device="cuda", dtype="bfloat16", load_format="dummy",
                      quantization=quantization, max_total_tokens=8192, max_rows=4)  # fmt: skip
    shard = build_shard(cfg, 0, 1, None)
    warmup(shard, 256, 4)
    runner = shard.runner
    runner.step(prefill_step(0, context, runner.kv_capacity))
    graph = runner.decode_forward.graphs[1]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    replay_ms = start.elapsed_time(end) / iters
    step = shard_pb2.StepRequest(step_id=1)
    step.decode.rows.append(0)
    step.decode.slots.append(context + 1)
    t0 = time.perf_counter()
    for _ in range(iters):
        runner.step(step)  # same slot each time: the timing is what matters here
    step_ms = (time.perf_counter() - t0) * 1e3 / iters
    del shard, runner, graph
    torch.cuda.empty_cache()
    return {"graph_replay_ms": replay_ms, "runner_step_ms": step_ms}


def hf_generate_tps(model, batch: int, input_len: int, output_len: int) -> float:
    ids = torch.randint(1000, 128000, (batch, input_len), device="cuda")
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    model.generate(ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return batch * (out.shape[1] - input_len) / seconds


def transformers_baseline(model_dir: Path) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        res = {
            "w1_tokens_per_s": hf_generate_tps(model, 1, 128, 256),
            "b128_tokens_per_s": hf_generate_tps(model, 128, 512, 256),
            "w2_batch128_tokens_per_s": hf_generate_tps(model, 128, 256, 256),
        }
    del model
    torch.cuda.empty_cache()
    return res


def environment() -> dict:
    import grpc
    import transformers
    import triton

    return {
        "card": torch.cuda.get_device_name(),
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "grpcio": grpc.__version__,
    }


def render(r: dict) -> str:
    w1, w2, b128 = r["ours"]["w1"], r["ours"]["w2"], r["ours"]["b128"]
    hf = {
        "w1_tokens_per_s": float("nan"),
        "w2_batch128_tokens_per_s": float("nan"),
        "b128_tokens_per_s": float("nan"),
    }
    hf.update(r.get("transformers", {}))
    roof = r["roofline_tokens_per_s"]
    w1_tps = 1e3 / w1["tpot_p50_ms"]
    rows = [
        (
            "W1 batch-1 decode (in 128 / out 256)",
            f"{w1['tpot_p50_ms']:.2f} ms/token = {w1_tps:.1f} tok/s",
            f"{hf['w1_tokens_per_s']:.1f} tok/s",
            f"{w1_tps / roof:.0%} of roofline {roof:.0f} tok/s",
        ),
        (
            f"W2 {w2['workload']['num_requests']} x (in 256 / out 256), all at once",
            f"{w2['output_tokens_per_s']:.0f} out tok/s",
            f"{hf['w2_batch128_tokens_per_s']:.0f} tok/s (batch 128)",
            f"{w2['output_tokens_per_s'] / hf['w2_batch128_tokens_per_s']:.1f}x transformers",
        ),
        (
            "B128 128 x (in 512 / out 256)",
            f"{b128['output_tokens_per_s']:.0f} out tok/s",
            f"{hf['b128_tokens_per_s']:.0f} tok/s",
            f"{b128['output_tokens_per_s'] / hf['b128_tokens_per_s']:.1f}x transformers",
        ),
    ]
    env = r["environment"]
    head = (
        f"Card: {env['card']} | date {env['date']} | torch {env['torch']} | triton {env['triton']} | "
        f"transformers {env['transformers']} | grpcio {env['grpcio']}\n"
        f"Copy bandwidth {r['copy_bandwidth_tb_s']:.2f} TB/s (read+write); weights {r['weight_gb']:.2f} GB; "
        f"batch-1 roofline {roof:.0f} tok/s\n\n"
    )
    table = "| workload | lightllm-grpc | transformers (same run) | ratio |\n| --- | --- | --- | --- |\n"
    table += "".join(f"| {a} | {b} | {c} | {d} |\n" for a, b, c, d in rows)
    d = r.get("decode_breakdown")
    if d:
        table += (
            f"\nBatch-1 decode without the server (context 128): "
            f"CUDA graph replay {d['graph_replay_ms']:.2f} ms, "
            f"shard runner step (inputs, graph, sampling, copy back) {d['runner_step_ms']:.2f} ms.\n"
        )
    return head + table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--w2-requests", type=int, default=1000)
    p.add_argument("--max-running", type=int, default=512)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--quantization", choices=("fp8",), default=None, help="serve with FP8 linear layers")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model_dir(args.out)
    config = json.loads((model_dir / "config.json").read_text())
    bw = copy_bandwidth()
    weight_bytes = param_bytes(config, fp8=args.quantization == "fp8")
    result = {
        "environment": environment(),
        "copy_bandwidth_tb_s": bw / 1e12,
        "weight_gb": weight_bytes / 1e9,
        "roofline_tokens_per_s": bw / weight_bytes,
        "ours": ours(model_dir, args.out, args),
        "decode_breakdown": decode_breakdown(model_dir, quantization=args.quantization),
    }
    if not args.skip_transformers:
        result["transformers"] = transformers_baseline(model_dir)
    (args.out / "bench-gpu.json").write_text(json.dumps(result, indent=2))
    md = render(result)
    (args.out / "bench-gpu.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
