"""``make bench-gpu``: our server, a transformers baseline and the hardware floor, in one run.

Workloads (8B Llama-3 shape, random weights via ``--load-format dummy``), chosen with ``--only``:
  w1        batch-1 decode, in 128 / out 256, through the gRPC API (ms per token, tokens/s)
  ttft      batch-1 time to first token: 20 prompts of 128 tokens, one at a time, one token each
  b128      128 requests of in 512 / out 256 at once, against transformers at batch 128
  w2        1,000 requests of in 256 / out 256 with ignore_eos, all submitted at once (output tokens/s)
  sampled   W2 sampled: temperature 0.8, top-p 0.9, top-k 50, presence penalty 0.5
  w3        online: Poisson arrivals at each ``--w3-rates``, in U[64, 1024] / out U[32, 512]
            (TTFT, TPOT and ITL p50/p99, output tokens/s), through ``bench serve``'s driver; the
            rate ``inf`` (a default) sends them all at once: the server's throughput for the
            mix, against which the report states each rate's offered load
  breakdown batch-1 decode without the server (CUDA graph replay, shard runner step)
  transformers  the eager transformers baseline (bf16) at batch 1 and 128
``--variants bf16,fp8`` serves each variant in turn (fp8: ``--quantization fp8``; fp8-kv:
``--kv-cache-dtype fp8_e4m3``, bf16 weights with an e4m3 KV cache; fp8-all: both); the first
runs every chosen workload, later ones only w1, ttft, w2 and breakdown.
The floor: weight bytes over the measured device-copy bandwidth (batch-1 roofline).
Writes ``bench-gpu.json`` (after every phase) and ``bench-gpu.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import shlex
import statistics
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import torch

from lightllm_grpc.aio import run
from lightllm_grpc.bench import gpu_power
from lightllm_grpc.bench.datasets import Vocab, random_requests, uniform_requests
from lightllm_grpc.bench.load import Workload, run_load
from lightllm_grpc.bench.metrics import summarize
from lightllm_grpc.bench.serve import Traffic, as_conversations, drive, open_stubs, serve_benchmark
from lightllm_grpc.bench.server import ROWS_HELP, LocalServer, rows_flags
from lightllm_grpc.models.tiny_tokenizer import save_tokenizer
from lightllm_grpc.proto import generation_pb2 as pb

WORKLOADS = ("w1", "small", "ttft", "b128", "w2", "sampled", "w3", "breakdown", "transformers")
# What a variant after the first is measured on: the rows the FP8 comparison needs.
LATER_VARIANT_WORKLOADS = frozenset({"w1", "small", "ttft", "w2", "breakdown"})
# "small": decode at these numbers of concurrent streams (where the decode graphs of 2-4 rows
# run), each stream in SMALL_INPUT / out SMALL_OUTPUT tokens.
SMALL_STREAMS, SMALL_INPUT, SMALL_OUTPUT = (2, 4), 128, 256
VARIANT_FLAGS = {
    "bf16": (),
    "fp8": ("--quantization", "fp8"),
    "fp8-kv": ("--kv-cache-dtype", "fp8_e4m3"),
    "fp8-all": ("--quantization", "fp8", "--kv-cache-dtype", "fp8_e4m3"),
}
BREAKDOWN_ARGS = {
    "fp8": {"quantization": "fp8"},
    "fp8-kv": {"kv_cache_dtype": "fp8_e4m3"},
    "fp8-all": {"quantization": "fp8", "kv_cache_dtype": "fp8_e4m3"},
}  # the same, in-process
# Throughput workloads, whose card clock and power the report gives (bench/gpu_power.py). Not
# the latency ones (W1, TTFT, small, W3): NVML queries every 200 ms could add jitter to a p99.
POWER_WORKLOADS = frozenset({"b128", "w2", "sampled"})
SAMPLED = {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "presence_penalty": 0.5}
# Prompt seeds of their own, so no workload's prompts share a prefix with another's
# (the prefix cache stays at 0% hits between workloads and between W3 rates). Sampled W2 had
# W2's seed until 2026-11-27: run after W2 on one server, its prompts hit the prefix cache.
TTFT_SEED, W3_SEED, B128_SEED, SAMPLED_SEED, SMALL_SEED = 1000, 2000, 3000, 4000, 5000


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


def w1(address: str, vocab: int) -> dict:
    """Batch-1 decode, three runs: the best median time per output token, and all three."""
    runs = [run(run_load(address, Workload(1, 128, 256, 1, vocab, seed=s))) for s in range(3)]
    best = min((r.as_dict() for r in runs), key=lambda d: d["tpot_p50_ms"])
    return {"w1": best, "w1_runs_tpot_ms": [r.tpot_p50_ms for r in runs]}


def small_batches(address: str, vocab: int) -> dict:
    """Decode at a few concurrent streams (``SMALL_STREAMS``, all sent at once), one run per count:
    the time per output token where the decode graphs of 2-4 rows run (the few-token paths)."""
    return {
        "small": {
            str(n): run(
                run_load(address, Workload(n, SMALL_INPUT, SMALL_OUTPUT, n, vocab, SMALL_SEED + n))
            ).as_dict()
            for n in SMALL_STREAMS
        }
    }


def sampled_w2(address: str, requests: int, vocab: int) -> dict:
    """W2 with sampling (T 0.8, top-p 0.9, top-k 50, presence 0.5), all at once; fails loudly
    if any request fails (issue 11's check)."""
    workload = Workload(requests, 256, 256, requests, vocab, SAMPLED_SEED, **SAMPLED)
    return run(run_load(address, workload)).as_dict()


async def _ttft(address: str, requests: int, input_len: int, seed: int) -> dict:
    async with open_stubs([address]) as stubs:
        info = await stubs[0].GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        vocab = Vocab.of_model(info.vocab_size, tuple(info.eos_token_ids))
        prompts = as_conversations(random_requests(requests + 1, input_len, 1, 0.0, vocab, seed))
        traffic = Traffic(max_concurrency=1, ignore_eos=True, progress=False)
        outcomes, duration = await drive(stubs, prompts, traffic)
    # One at a time, so outcomes are in send order; the first only warmed the channel. Each
    # request's TTFT is kept too, in order: with 20 requests p99 is the maximum, and an outlier's
    # position (the first, every n-th) says more about its cause than the summary does.
    timed = outcomes[1:]
    each = [round(o.ttft * 1e3, 3) if o.ttft is not None else None for o in timed]
    return {"input_len": input_len, **summarize(timed, duration).as_dict(), "ttft_ms_each": each}


def ttft(address: str, requests: int = 20, input_len: int = 128, seed: int = TTFT_SEED) -> dict:
    """Batch-1 time to first token: ``requests`` prompts of ``input_len`` tokens, sent one after
    another (after one warm-up), each asking for one token; ``bench serve``'s figures."""
    return run(_ttft(address, requests, input_len, seed))


def online(
    address: str,
    rate: float,
    requests: int,
    input_range: tuple[int, int],
    output_range: tuple[int, int],
    seed: int,
) -> dict:
    """W3 at one rate: ``requests`` Poisson arrivals of ``rate`` per second, lengths uniform over
    the inclusive ranges, greedy with ``ignore_eos``; ``bench serve``'s figures."""

    def build(info: pb.ModelInfo) -> list:
        vocab = Vocab.of_model(info.vocab_size, tuple(info.eos_token_ids))
        return as_conversations(uniform_requests(requests, input_range, output_range, vocab, seed))

    traffic = Traffic(request_rate=rate, ignore_eos=True, seed=seed, progress=False)
    summary, _ = run(serve_benchmark([address], build, traffic))
    ranges = {"input_range": list(input_range), "output_range": list(output_range)}
    return {"request_rate": rate, **ranges, **summary.as_dict()}


class Bench:
    """One run: its flags, its result tree (saved after every phase, so a run cut short by a
    time limit keeps what it measured) and a clock that stamps each phase."""

    def __init__(self, args: argparse.Namespace, model_dir: Path, vocab: int) -> None:
        self.args, self.model_dir, self.vocab = args, model_dir, vocab
        self.result: dict = {"phase_seconds": {}}
        self.t0 = time.monotonic()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        print(f"[{dt.datetime.now():%H:%M:%S} +{start - self.t0:.0f}s] {name}", flush=True)
        try:
            yield
        finally:
            took = time.monotonic() - start
            self.result["phase_seconds"][name] = took
            stamp = f"[{dt.datetime.now():%H:%M:%S} +{time.monotonic() - self.t0:.0f}s]"
            print(f"{stamp} {name}: {took:.1f}s", flush=True)
            self.save()

    def save(self) -> None:
        (self.args.out / "bench-gpu.json").write_text(json.dumps(self.result, indent=2))

    def serve(self, variant: str, todo: set[str], into: dict) -> None:
        """Start the variant's server and run the chosen server workloads, filling ``into``."""
        args, vocab, n_w2 = self.args, self.vocab, self.args.w2_requests
        steps: dict[str, Callable[[str], dict]] = {
            "w1": lambda a: w1(a, vocab),
            "small": lambda a: small_batches(a, vocab),
            "ttft": lambda a: {"ttft": ttft(a, args.ttft_requests)},
            "b128": lambda a: {
                "b128": run(run_load(a, Workload(128, 512, 256, 128, vocab, B128_SEED))).as_dict()
            },
            "w2": lambda a: {"w2": run(run_load(a, Workload(n_w2, 256, 256, n_w2, vocab))).as_dict()},
            "sampled": lambda a: {"sampled": sampled_w2(a, args.sampled_requests, vocab)},
        }
        if not todo & {*steps, "w3"}:
            return
        with self.phase(f"{variant}: server start"):
            server = LocalServer(
                self.model_dir,
                args.out / f"server-{variant}.log",
                *("--load-format", "dummy", "--dtype", "bfloat16", "--device", "cuda"),
                *rows_flags(args.max_running),
                *VARIANT_FLAGS[variant],
                *shlex.split(args.server_args),
                start_timeout=900,
            )
        log_path = args.out / f"server-{variant}.log"
        # Kernel compiles a live step waited for (shard/compile_watch.py), per workload.
        late = into.setdefault("late_compiles", {})
        power = into.setdefault("power", {})  # the card's clock and draw, per workload
        try:
            into["server_info"] = str(server.info()).replace("\n", "; ")
            for name, step in steps.items():
                if name in todo:
                    with (
                        self.phase(f"{variant}: {name}"),
                        _count_late_compiles(log_path, late, name),
                        _power_sampled(power, name),
                    ):
                        into.update(step(server.address))
            if "w3" in todo:
                into["w3"] = []
                for i, rate in enumerate(args.w3_rates):
                    with (
                        self.phase(f"{variant}: w3 at {rate:g} req/s"),
                        _count_late_compiles(log_path, late, f"w3@{rate:g}"),
                    ):
                        shape = (args.w3_requests, args.w3_input, args.w3_output)
                        into["w3"].append(online(server.address, rate, *shape, seed=W3_SEED + i))
        finally:
            server.stop()


def _power_sampled(into: dict, name: str) -> contextlib.AbstractContextManager[None]:
    """The card's clock and power over a throughput workload (``POWER_WORKLOADS``), else nothing."""
    return gpu_power.sampled(into, name) if name in POWER_WORKLOADS else contextlib.nullcontext()


LATE_COMPILE = "after warm-up"  # compile_watch's warning


@contextlib.contextmanager
def _count_late_compiles(log_path: Path, into: dict[str, int], name: str) -> Iterator[None]:
    """``into[name]``: the server log's late-compile warnings that appeared during the block."""

    def count() -> int:
        try:
            return log_path.read_text(errors="replace").count(LATE_COMPILE)
        except OSError:
            return 0

    before = count()
    try:
        yield
    finally:
        into[name] = count() - before


def decode_breakdown(
    model_dir: Path,
    context: int = 128,
    iters: int = 200,
    quantization: str | None = None,
    kv_cache_dtype: str = "auto",
) -> dict:
    """Batch-1 decode without the server: the CUDA graph alone, and the shard runner's whole step."""
    from lightllm_grpc.config import ShardConfig
    from lightllm_grpc.proto import shard_pb2
    from lightllm_grpc.shard.cuda_graph import replay_ms
    from lightllm_grpc.shard.warmup import warmup
    from lightllm_grpc.shard.worker import build_shard, prefill_step

    cfg = ShardConfig(model=model_dir, device="cuda", dtype="bfloat16", load_format="dummy",
                      quantization=quantization, kv_cache_dtype=kv_cache_dtype, max_total_tokens=8192,
                      max_rows=4)  # fmt: skip
    shard = build_shard(cfg, 0, 1, None)
    warmup(shard, 256, 4)
    runner = shard.runner
    runner.step(prefill_step(0, context, runner.kv_capacity))
    graph_ms = replay_ms(runner.decode_graphs.graphs[1], iters, warmup=0)
    step = shard_pb2.StepRequest(step_id=1)
    step.decode.rows.append(0)
    step.decode.slots.append(context + 1)
    t0 = time.perf_counter()
    for _ in range(iters):
        runner.step(step)  # same slot each time: the timing is what matters here
    step_ms = (time.perf_counter() - t0) * 1e3 / iters
    del shard, runner
    torch.cuda.empty_cache()
    return {"graph_replay_ms": graph_ms, "runner_step_ms": step_ms}


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


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def _ratio(a: float | None, b: float | None, fmt: str, missing: str = "—") -> str:
    return missing if a is None or not b else fmt.format(a / b)


def _variants(r: dict) -> dict:
    # Results of the older layout have one variant, in the top-level fields.
    return r.get("variants") or {"bf16": r}


def _rows(r: dict) -> list[tuple[str, str, str, str]]:
    """The main table: per workload, one row per variant that measured it (bf16 first)."""
    hf = r.get("transformers", {})
    variants = _variants(r)
    base_name, base = next((name, v["ours"]) for name, v in variants.items())
    vs_base = f"; {{:.2f}}x {base_name}"

    def each(key: str):
        for name, v in variants.items():
            if key in v["ours"]:
                tag = "" if name == "bf16" else f", {name.upper()}"
                yield name, tag, v, v["ours"]

    def tps(o: dict) -> float | None:
        return 1e3 / o["w1"]["tpot_p50_ms"] if "w1" in o else None

    def w2(o: dict) -> float | None:
        return o["w2"]["output_tokens_per_s"] if "w2" in o else None

    rows = []
    for _, tag, v, o in each("w1"):
        roof = v["roofline_tokens_per_s"]
        roof_name = f"{tag[2:]} roofline".lstrip()
        vs = "" if o is base else _ratio(tps(o), tps(base), vs_base, "")
        rows.append((
            f"W1 batch-1 decode (in 128 / out 256){tag}",
            f"{o['w1']['tpot_p50_ms']:.2f} ms/token = {tps(o):.1f} tok/s",
            _cell(hf.get("w1_tokens_per_s"), "{:.1f} tok/s"),
            f"{tps(o) / roof:.0%} of {roof_name} {roof:.0f} tok/s{vs}",
        ))  # fmt: skip
    for _, tag, _, o in each("small"):
        small = o["small"]
        rows.append((
            f"Decode at {' / '.join(small)} streams (in {SMALL_INPUT} / out {SMALL_OUTPUT}){tag}",
            " / ".join(f"{s['tpot_p50_ms']:.2f}" for s in small.values()) + " ms/token",
            "—",
            " / ".join(_ratio(s["tpot_p50_ms"], o["w1"]["tpot_p50_ms"], "{:.2f}x") for s in small.values())
            + " W1's time per token" if "w1" in o else "—",
        ))  # fmt: skip
    for _, tag, v, o in each("ttft"):
        t, floor, n = o["ttft"]["ttft_ms"], v["weight_read_ms"], o["ttft"]["completed"]
        rows.append((
            f"TTFT batch 1 (in {o['ttft']['input_len']}, {n} requests one at a time){tag}",
            f"p50 {t['median']:.1f} ms / p99 {t['p99']:.1f} ms",
            "—",
            f"p50 {t['median'] / floor:.1f}x the weight-read floor {floor:.2f} ms",
        ))  # fmt: skip
    for _, tag, _, o in each("w2"):
        vs = "" if o is base else _ratio(w2(o), w2(base), vs_base, "")
        rows.append((
            f"W2 {o['w2']['workload']['num_requests']} x (in 256 / out 256), all at once{tag}",
            f"{w2(o):.0f} out tok/s",
            _cell(hf.get("w2_batch128_tokens_per_s"), "{:.0f} tok/s (batch 128)"),
            _ratio(w2(o), hf.get("w2_batch128_tokens_per_s"), "{:.1f}x transformers") + vs,
        ))  # fmt: skip
    for _, tag, _, o in each("sampled"):
        sampled = o["sampled"]["output_tokens_per_s"]
        rows.append((
            f"W2 sampled {o['sampled']['workload']['num_requests']} x (in 256 / out 256): "
            f"T 0.8, top-p 0.9, top-k 50, presence 0.5{tag}",
            f"{sampled:.0f} out tok/s",
            "—",
            _ratio(sampled, w2(o), "{:.2f}x greedy W2"),
        ))  # fmt: skip
    for _, tag, _, o in each("b128"):
        b128 = o["b128"]["output_tokens_per_s"]
        rows.append((
            f"B128 128 x (in 512 / out 256){tag}",
            f"{b128:.0f} out tok/s",
            _cell(hf.get("b128_tokens_per_s"), "{:.0f} tok/s"),
            _ratio(b128, hf.get("b128_tokens_per_s"), "{:.1f}x transformers"),
        ))  # fmt: skip
    return rows


def _sent(w: dict) -> int:
    """Requests a W3 run sent: completed and failed."""
    return w["completed"] + sum(w["failed"].values())


def _offered(w: dict) -> float:
    """Output tokens a second that ``w``'s arrival rate asks for (its mean output length times
    the rate); infinite for all at once."""
    return w["request_rate"] * w["total_output_tokens"] / max(_sent(w), 1)


def _load(w: dict, capacity: float | None) -> str:
    """``w``'s offered output rate, and its share of what the server sustained all at once."""
    offered = _offered(w)
    if math.isinf(offered):
        return "all at once"
    share = f" ({offered / capacity:.0%})" if capacity else ""
    return f"{offered:.0f}{share}"


def _w3_table(r: dict) -> str:
    lines = []
    for name, v in _variants(r).items():
        runs = v["ours"].get("w3", [])
        # All at once, the server runs at its throughput for this mix: a rate asking for more
        # output than that is over capacity, and its tails grow with the run's length.
        capacity = next((w["output_token_throughput"] for w in runs if math.isinf(w["request_rate"])), None)
        for w in runs:
            if not lines:
                (in_lo, in_hi), (out_lo, out_hi) = w["input_range"], w["output_range"]
                lines += [
                    f"\nOnline W3: {_sent(w)} requests per rate, Poisson "
                    f"arrivals, in U[{in_lo}, {in_hi}] / out U[{out_lo}, {out_hi}], greedy, ignore_eos "
                    "(output tok/s over the whole run, arrival gaps included; offered: the output "
                    "tok/s the rate asks for, and its share of the all-at-once throughput: over 100% "
                    "is more than the server sustains, and the tails then grow with the run).\n",
                    "| rate | variant | completed (failed) | offered out tok/s | output tok/s "
                    "| TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms |",
                    "| --- | --- | --- | --- | --- | --- | --- | --- |",
                ]
            pct = [f"{w[k]['median']:.1f} / {w[k]['p99']:.1f}" for k in ("ttft_ms", "tpot_ms", "itl_ms")]
            lines.append(
                f"| {w['request_rate']:g} req/s | {name} | {w['completed']} ({sum(w['failed'].values())}) "
                f"| {_load(w, capacity)} | {w['output_token_throughput']:.0f} | {' | '.join(pct)} |"
            )
    return "\n".join(lines) + "\n" if lines else ""


def render(r: dict) -> str:
    """The Markdown report; also renders a result of the older one-variant layout."""
    env, variants = r["environment"], _variants(r)
    first = next(iter(variants.values()))
    others = "".join(
        f"; {name.upper()} weights {v['weight_gb']:.2f} GB, roofline {v['roofline_tokens_per_s']:.0f} tok/s"
        for name, v in list(variants.items())[1:]
    )
    head = (
        f"Card: {env['card']} | date {env['date']} | torch {env['torch']} | triton {env['triton']} | "
        f"transformers {env['transformers']} | grpcio {env['grpcio']}\n"
        f"Copy bandwidth {r['copy_bandwidth_tb_s']:.2f} TB/s (read+write); "
        f"weights {first['weight_gb']:.2f} GB; "
        f"batch-1 roofline {first['roofline_tokens_per_s']:.0f} tok/s{others}\n"
        + (f"Server flags added: `{r['server_args']}`\n" if r.get("server_args") else "")
        + "\n"
    )
    table = "| workload | lightllm-grpc | transformers (same run) | ratio |\n| --- | --- | --- | --- |\n"
    table += "".join(f"| {a} | {b} | {c} | {d} |\n" for a, b, c, d in _rows(r))
    table += _w3_table(r)
    for name, v in variants.items():
        d = v.get("decode_breakdown")
        if d:
            tag = "" if name == "bf16" else f", {name.upper()}"
            table += (
                f"\nBatch-1 decode without the server (context 128{tag}): "
                f"CUDA graph replay {d['graph_replay_ms']:.2f} ms, "
                f"shard runner step (inputs, graph, sampling, copy back) {d['runner_step_ms']:.2f} ms.\n"
            )
    table += _late_compiles(variants)
    table += gpu_power.report(variants)
    phases = r.get("phase_seconds", {})
    if phases:
        table += "\nPhases (s): " + ", ".join(f"{k} {t:.0f}" for k, t in phases.items()) + "\n"
    return head + table


def _late_compiles(variants: dict) -> str:
    """A warning line naming the workloads during which a live step waited for a Triton compile
    (a cold cache: one such run of W2 measured 16% low), or nothing."""
    late = [
        f"{name} {workload} {count}"
        for name, v in variants.items()
        for workload, count in v.get("ours", {}).get("late_compiles", {}).items()
        if count
    ]
    if not late:
        return ""
    return (
        "\n**Late compiles** (a live step waited for a Triton compile; rerun before comparing): "
        + ", ".join(late)
        + "\n"
    )


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{unknown or text!r}: choose from {', '.join(allowed)}")
        return list(dict.fromkeys(names))

    return parse


def _rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(not x > 0 for x in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive numbers (got {text!r})")
    return rates


def _length_range(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"need 1 <= low <= high (got {text!r})")
    return lo, hi


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--only", type=_names(WORKLOADS), default=list(WORKLOADS), help="workloads, e.g. w1,ttft")
    p.add_argument("--variants", type=_names(tuple(VARIANT_FLAGS)), default=["bf16", "fp8"])
    p.add_argument("--quantization", choices=("fp8",), default=None, help="same as --variants fp8")
    p.add_argument("--w2-requests", type=int, default=1000)
    p.add_argument("--sampled-requests", type=int, default=1000)
    p.add_argument("--ttft-requests", type=int, default=20)
    p.add_argument(
        "--w3-rates",
        type=_rates,
        default=[24.0, 48.0, math.inf],
        help="req/s, comma-separated; inf: all at once (the server's throughput for the mix)",
    )
    p.add_argument("--w3-requests", type=int, default=600, help="per rate")
    p.add_argument("--w3-input", type=_length_range, default=(64, 1024), help="low,high prompt tokens")
    p.add_argument("--w3-output", type=_length_range, default=(32, 512), help="low,high output tokens")
    p.add_argument("--max-running", type=int, default=None, help=ROWS_HELP)
    p.add_argument("--skip-transformers", action="store_true", help="same as leaving it out of --only")
    p.add_argument("--server-args", default="", help='more serve flags, e.g. "--step-time-budget-ms 50"')
    args = p.parse_args(argv)
    if args.quantization:
        args.variants = [args.quantization]
    if args.skip_transformers:
        args.only = [w for w in args.only if w != "transformers"]
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model_dir(args.out)
    config = json.loads((model_dir / "config.json").read_text())
    bench = Bench(args, model_dir, config["vocab_size"])
    r = bench.result
    r["environment"] = environment()
    r["server_args"] = args.server_args
    with bench.phase("copy bandwidth"):
        bw = copy_bandwidth()
    r["copy_bandwidth_tb_s"] = bw / 1e12
    r["variants"] = {}
    todo = {}
    for i, name in enumerate(args.variants):
        # A variant with FP8 linear layers has e4m3 weight bytes, so its own roofline.
        weight_bytes = param_bytes(config, fp8="--quantization" in VARIANT_FLAGS[name])
        v = r["variants"][name] = {
            "weight_gb": weight_bytes / 1e9,
            "roofline_tokens_per_s": bw / weight_bytes,
            "weight_read_ms": weight_bytes / bw * 1e3,
            "ours": {},
        }
        if i == 0:  # the top-level fields of older runs: the first variant's
            r.update({k: v[k] for k in ("weight_gb", "roofline_tokens_per_s", "ours")})
        todo[name] = set(args.only) if i == 0 else set(args.only) & LATER_VARIANT_WORKLOADS
        bench.serve(name, todo[name], v["ours"])
    # In-process GPU work only after every server has run, so each server found the card empty.
    for i, name in enumerate(args.variants):
        if "breakdown" in todo[name]:
            v = r["variants"][name]
            with bench.phase(f"{name}: breakdown"):
                v["decode_breakdown"] = decode_breakdown(model_dir, **BREAKDOWN_ARGS.get(name, {}))
            if i == 0:
                r["decode_breakdown"] = v["decode_breakdown"]
    if "transformers" in args.only:
        with bench.phase("transformers"):
            r["transformers"] = transformers_baseline(model_dir)
    bench.save()
    md = render(r)
    (args.out / "bench-gpu.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
