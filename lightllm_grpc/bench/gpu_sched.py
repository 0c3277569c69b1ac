"""GPU benchmark of the scheduler: shared prefixes with and without the prefix cache, and
W1/W2 against the code before the scheduler change, in one run on one card.

Workloads (8B Llama-3 shape, bf16, ``--load-format dummy``):
  SP  50 prefixes x 20 prompts (prefix 1,024 + suffix 64 tokens, output 128), all at once,
      through ``bench serve``: prefix cache on vs ``--no-prefix-cache``
  W1  batch-1 decode, in 128 / out 256 (best of 3)
  W2  1,000 x in 256 / out 256, all at once
``--before DIR`` is a checkout of the previous code (with its stubs generated); its server
runs from that folder. Writes ``bench-sched.json`` and ``bench-sched.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightllm_grpc.aio import run
from lightllm_grpc.bench.datasets import Vocab, shared_prefix_requests
from lightllm_grpc.bench.gpu import (
    copy_bandwidth,
    environment,
    param_bytes,
    prepare_model_dir,
    sampled_w2,
    w1,
)
from lightllm_grpc.bench.load import Workload, run_load
from lightllm_grpc.bench.serve import Traffic, as_conversations, serve_benchmark
from lightllm_grpc.bench.server import ROWS_HELP, LocalServer, rows_flags

VOCAB = 128256


def _server(model_dir: Path, log: Path, extra: list[str], cwd: Path | None, args) -> LocalServer:
    flags = ["--load-format", "dummy", "--dtype", "bfloat16", "--device", args.device]
    flags += [*rows_flags(args.max_running), *extra]
    return LocalServer(model_dir.resolve(), log.resolve(), *flags, start_timeout=900, cwd=cwd)


def _shared_prefix(address: str, shape: tuple[int, ...]) -> dict:
    def build(info) -> list:
        vocab = Vocab.of_model(info.vocab_size, tuple(info.eos_token_ids))
        return as_conversations(shared_prefix_requests(*shape, vocab, seed=0))

    summary, _ = run(serve_benchmark([address], build, Traffic(ignore_eos=True, progress=False)))
    return summary.as_dict()


def _w1_w2(address: str, w2_requests: int, vocab: int) -> dict:
    result = w1(address, vocab)  # W1 first, on an idle server
    w2 = run(run_load(address, Workload(w2_requests, 256, 256, w2_requests, vocab)))
    return {**result, "w2": w2.as_dict()}


def _sampled(address: str, requests: int, vocab: int) -> dict:
    """Issue 11's check: 1,500 sampled requests at once end with no error at all."""
    return {"sampled": sampled_w2(address, requests, vocab)}


def _variant(name: str, model_dir: Path, out: Path, args, extra: list[str], cwd: Path | None, work) -> dict:
    server = _server(model_dir, out / f"server-{name}.log", extra, cwd, args)
    try:
        result = work(server.address)
        result["server_info"] = str(server.info()).replace("\n", "; ")
    finally:
        server.stop()
    print(name, json.dumps(result)[:2000], flush=True)
    return result


def render(r: dict) -> str:
    env, v = r["environment"], r["variants"]
    lines = [
        " | ".join(f"{k} {val}" for k, val in env.items()),
        f"Copy bandwidth {r['copy_bandwidth_tb_s']:.2f} TB/s; "
        f"batch-1 roofline {r['roofline_tokens_per_s']:.0f} tok/s",
        "",
        "| workload | variant | output tok/s | TTFT p50 / p99 ms | hit share | duration s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("cache", "no-cache"):
        sp = v.get(name, {}).get("shared_prefix")
        if sp:
            lines.append(
                f"| SP 50x20 (1024+64, out 128) | {name} | {sp['output_token_throughput']:.0f} | "
                f"{sp['ttft_ms']['median']:.0f} / {sp['ttft_ms']['p99']:.0f} | "
                f"{sp['prefix_cache_hit_share']:.3f} | {sp['duration_s']:.1f} |"
            )
    sampled = v.get("sampled", {}).get("sampled")
    if sampled:
        lines.append(
            f"| {sampled['workload']['num_requests']} x 256/256 sampled (T 0.8, top-p 0.9, top-k 50, "
            "presence 0.5) "
            f"| now | {sampled['output_tokens_per_s']:.0f} | | | {sampled['seconds']:.1f} |"
        )
    for name in ("before", "cache"):
        res = v.get(name, {})
        if "w1" in res:
            w1, w2 = res["w1"], res["w2"]
            lines.append(f"| W1 batch 1 (128/256) | {name} | {1e3 / w1['tpot_p50_ms']:.1f} | | | |")
            lines.append(
                f"| W2 {w2['workload']['num_requests']} x 256/256 | {name} | {w2['output_tokens_per_s']:.0f} "
                f"| | | {w2['seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--before", type=Path, default=None, help="checkout of the previous code")
    p.add_argument("--w2-requests", type=int, default=1000)
    p.add_argument("--max-running", type=int, default=None, help=ROWS_HELP)
    p.add_argument("--only", default="cache,no-cache,before")
    p.add_argument("--device", default="cuda")
    p.add_argument("--skip-w1w2", action="store_true", help="shared prefix only")
    p.add_argument("--sampled-requests", type=int, default=1500, help="for --only ...,sampled")
    p.add_argument("--sp", default="50,20,1024,64,128", help="groups,per-group,prefix,suffix,output")
    p.add_argument("--model", type=Path, default=None, help="default: the 8B Llama-3 shape (dummy)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or prepare_model_dir(args.out)
    config = json.loads((model_dir / "config.json").read_text())
    vocab, sp = config["vocab_size"], tuple(int(x) for x in args.sp.split(","))
    bw = copy_bandwidth() if args.device == "cuda" else float("nan")
    result: dict = {
        "environment": environment() if args.device == "cuda" else {},
        "copy_bandwidth_tb_s": bw / 1e12,
        "roofline_tokens_per_s": bw / param_bytes(config),
        "variants": {},
    }
    only = args.only.split(",")

    def both(address: str) -> dict:
        sp_result = {"shared_prefix": _shared_prefix(address, sp)}
        return sp_result if args.skip_w1w2 else {**sp_result, **_w1_w2(address, args.w2_requests, vocab)}

    plans = {
        "cache": ([], None, both),
        "no-cache": (["--no-prefix-cache"], None, lambda a: {"shared_prefix": _shared_prefix(a, sp)}),
        "before": ([], args.before, lambda a: _w1_w2(a, args.w2_requests, vocab)),
        "sampled": ([], None, lambda a: _sampled(a, args.sampled_requests, vocab)),
    }
    for name in only:
        extra, cwd, work = plans[name]
        if name == "before" and cwd is None:
            continue
        result["variants"][name] = _variant(name, model_dir, args.out, args, extra, cwd, work)
        (args.out / "bench-sched.json").write_text(json.dumps(result, indent=2))
    md = render(result)
    (args.out / "bench-sched.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
