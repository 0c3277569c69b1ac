"""``make bench-gpu``'s TTFT and online W3 paths, run tiny against the CPU server, and its
report: the new rows per variant, and the older layout unchanged."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightllm_grpc.bench import gpu, gpu_power
from lightllm_grpc.bench.datasets import Vocab, uniform_requests
from lightllm_grpc.bench.server import LocalServer
from lightllm_grpc.proto import generation_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = LocalServer(None, tmp_path_factory.mktemp("bench-gpu") / "log", "--max-total-tokens", "4096")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def measured(server: LocalServer) -> dict:
    return {
        "ttft": gpu.ttft(server.address, requests=5, input_len=16),
        "w3": [gpu.online(server.address, 50.0, 6, (8, 32), (2, 6), seed=gpu.W3_SEED)],
    }


def _check_distribution(d: dict) -> None:
    assert 0 < d["median"] <= d["p99"]


def test_ttft_batch1_figures(measured: dict) -> None:
    t = measured["ttft"]
    assert t["completed"] == 5 and t["failed"] == {}  # the warm-up request is not counted
    assert (t["input_len"], t["total_input_tokens"], t["total_output_tokens"]) == (16, 80, 5)
    _check_distribution(t["ttft_ms"])
    assert t["tpot_ms"]["median"] == 0  # one token each: no TPOT


def test_online_w3_figures(server: LocalServer, measured: dict) -> None:
    (w,) = measured["w3"]
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest())
    reqs = uniform_requests(6, (8, 32), (2, 6), Vocab.of_model(info.vocab_size, tuple(info.eos_token_ids)),
                            gpu.W3_SEED)  # fmt: skip
    assert w["completed"] == 6 and w["failed"] == {}
    assert w["total_input_tokens"] == sum(len(r.prompt) for r in reqs)
    assert w["total_output_tokens"] == sum(r.output_len for r in reqs)  # ignore_eos held the lengths
    assert (w["request_rate"], w["input_range"], w["output_range"]) == (50.0, [8, 32], [2, 6])
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        _check_distribution(w[key])
    assert w["output_token_throughput"] > 0


def _variant(roofline: float, tpot_ms: float, w2: float, **ours) -> dict:
    w2_result = {"workload": {"num_requests": 1000}, "output_tokens_per_s": w2}
    return {
        "weight_gb": 3e3 / roofline,
        "roofline_tokens_per_s": roofline,
        "weight_read_ms": 1e3 / roofline,
        "ours": {"w1": {"tpot_p50_ms": tpot_ms}, "w2": w2_result, **ours},
    }


def test_render_two_variants_with_the_new_rows(measured: dict) -> None:
    env = dict.fromkeys(("card", "date", "torch", "triton", "transformers", "grpcio"), "x")
    sampled = {"workload": {"num_requests": 1000}, "output_tokens_per_s": 4000.0}
    result = {
        "environment": env,
        "copy_bandwidth_tb_s": 3.0,
        "variants": {
            "bf16": _variant(187.0, 6.0, 15000.0, sampled=sampled, **measured),
            "fp8": _variant(330.0, 4.0, 16500.0, ttft=measured["ttft"], late_compiles={"w1": 0, "w2": 3}),
        },
        "transformers": {"w1_tokens_per_s": 18.0, "w2_batch128_tokens_per_s": 2000.0},
        "phase_seconds": {"bf16: server start": 60.0},
    }
    md = gpu.render(result)
    assert "FP8 weights" in md and "| 76% of FP8 roofline 330 tok/s; 1.50x bf16 |" in md
    assert "| W2 1000 x (in 256 / out 256), all at once, FP8 | 16500 out tok/s |" in md
    assert md.count("TTFT batch 1 (in 16, 5 requests one at a time)") == 2
    assert "weight-read floor 5.35 ms" in md and "0.27x greedy W2" in md
    assert "Online W3: 6 requests per rate" in md and "| 50 req/s | bf16 | 6 (0) |" in md
    assert "B128" not in md and "Phases (s): bf16: server start 60" in md
    assert (
        "**Late compiles** (a live step waited for a Triton compile; rerun before comparing): fp8 w2 3" in md
    )


def test_render_the_small_batch_row() -> None:
    small = {"2": {"tpot_p50_ms": 6.6}, "4": {"tpot_p50_ms": 7.2}}
    result = {"variants": {"bf16": _variant(187.0, 6.0, 15000.0, small=small)}}
    rows = [line for line, *_ in gpu._rows(result)]
    cells = next(r for r in gpu._rows(result) if r[0].startswith("Decode at"))
    assert cells == ("Decode at 2 / 4 streams (in 128 / out 256)", "6.60 / 7.20 ms/token", "—",
                     "1.10x / 1.20x W1's time per token")  # fmt: skip
    assert len(rows) == 3  # W1, the small batches, W2


def test_w3_rows_state_the_offered_load_against_the_all_at_once_throughput(measured: dict) -> None:
    (w,) = measured["w3"]
    offered = 50.0 * w["total_output_tokens"] / 6  # 6 requests at 50 req/s
    flood = {**w, "request_rate": math.inf, "output_token_throughput": 2 * offered}
    result = {"variants": {"bf16": {"ours": {"w3": [w, flood]}}}}
    rows = [line for line in gpu._w3_table(result).splitlines() if line.startswith("| ")]
    assert f"| 50 req/s | bf16 | 6 (0) | {offered:.0f} (50%) |" in rows[2]
    assert "| inf req/s | bf16 | 6 (0) | all at once |" in rows[3]
    # Without an all-at-once run there is nothing to compare with: the offered rate alone.
    only = gpu._w3_table({"variants": {"bf16": {"ours": {"w3": [w]}}}})
    assert f"| 50 req/s | bf16 | 6 (0) | {offered:.0f} |" in only


def test_render_keeps_the_older_layout() -> None:
    md = gpu.render(json.loads((ROOT / "docs/bench-gpu-2026-11-26-h100.json").read_text()))
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 5 and all(row in benchmarks for row in rows)


def test_main_runs_the_chosen_workloads_per_variant(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole run without a GPU: the CPU server stands in for each variant's server."""
    started: list[tuple[str, ...]] = []

    class StandIn:
        def __init__(self, model_dir: Path, log: Path, *flags: str, **kw) -> None:
            started.append(flags)
            self.address, self.info = server.address, server.info

        def stop(self) -> None:
            pass

    (tmp_path / "model").mkdir()
    (tmp_path / "model/config.json").write_text('{"vocab_size": 512}')
    monkeypatch.setattr(gpu, "LocalServer", StandIn)
    monkeypatch.setattr(gpu, "copy_bandwidth", lambda: 3e12)
    monkeypatch.setattr(gpu, "param_bytes", lambda config, fp8=False: 8e9 if fp8 else 16e9)
    monkeypatch.setattr(gpu, "prepare_model_dir", lambda out: tmp_path / "model")
    env = dict.fromkeys(("card", "date", "torch", "triton", "transformers", "grpcio"), "x")
    monkeypatch.setattr(gpu, "environment", lambda: env)
    monkeypatch.setattr(gpu, "SMALL_OUTPUT", 4)  # the CPU model's decode steps are slow

    @contextlib.contextmanager
    def power(into: dict, key: str) -> Iterator[None]:  # no nvidia-smi here: one made-up sample
        yield
        into[key] = gpu_power.summary([gpu_power.Sample(1500, 1980, 690, 700)])

    monkeypatch.setattr(gpu_power, "sampled", power)
    monkeypatch.setattr(gpu, "POWER_WORKLOADS", frozenset({"small"}))  # W2 and the like are slow here
    flags = ["--out", str(tmp_path), "--only", "ttft,w3,small,transformers", "--skip-transformers"]
    flags += ["--ttft-requests", "2", "--w3-rates", "100,200", "--w3-requests", "3"]
    gpu.main([*flags, "--w3-input", "4,8", "--w3-output", "2,3"])
    r = json.loads((tmp_path / "bench-gpu.json").read_text())
    bf16_flags, fp8_flags = started
    assert "--quantization" not in bf16_flags and fp8_flags[-2:] == ("--quantization", "fp8")
    assert "--max-running-requests" not in bf16_flags  # the server's own row count, by the card
    bf16, fp8 = r["variants"]["bf16"]["ours"], r["variants"]["fp8"]["ours"]
    assert r["ours"] == bf16 and r["roofline_tokens_per_s"] == 3e12 / 16e9
    assert [w["request_rate"] for w in bf16["w3"]] == [100, 200] and "w3" not in fp8  # W3: first only
    assert bf16["ttft"]["completed"] == fp8["ttft"]["completed"] == 2
    for ours in (bf16, fp8):  # a few streams at once, each count its own run
        assert list(ours["small"]) == ["2", "4"]
        for n, s in ours["small"].items():
            assert s["output_tokens"] == 4 * int(n) and s["tpot_p50_ms"] > 0
            assert (s["workload"]["num_requests"], s["workload"]["concurrency"]) == (int(n), int(n))
    each = bf16["ttft"]["ttft_ms_each"]  # every request's, in send order
    assert len(each) == 2 and all(0 < t <= 60_000 for t in each)
    assert max(each) == pytest.approx(bf16["ttft"]["ttft_ms"]["p99"], rel=0.05)
    assert "transformers" not in r and "fp8: ttft" in r["phase_seconds"]
    assert "| 200 req/s | bf16 | 3 (0) |" in (tmp_path / "bench-gpu.md").read_text()
    assert set(bf16["power"]) == set(fp8["power"]) == {"small"}  # not the latency workloads
    assert (
        "Power, fp8 (median SM clock and draw per workload): small 1500 MHz"
        in (tmp_path / "bench-gpu.md").read_text()
    )

    started.clear()
    gpu.main(
        [
            "--out",
            str(tmp_path / "all"),
            "--only",
            "ttft",
            "--ttft-requests",
            "1",
            "--variants",
            "fp8-kv,fp8-all",
            "--max-running",
            "512",
        ]
    )
    r = json.loads((tmp_path / "all/bench-gpu.json").read_text())
    assert all(f[f.index("--max-running-requests") + 1] == "512" for f in started)
    assert started[1][-4:] == ("--quantization", "fp8", "--kv-cache-dtype", "fp8_e4m3")
    rooflines = [r["variants"][v]["roofline_tokens_per_s"] for v in ("fp8-kv", "fp8-all")]
    assert rooflines == [3e12 / 16e9, 3e12 / 8e9]  # FP8 weights: the e4m3 bytes' roofline


def test_workload_flags() -> None:
    assert gpu._names(gpu.WORKLOADS)("w3, ttft,w3") == ["w3", "ttft"]
    assert gpu._rates("24,48") == [24.0, 48.0] and gpu._length_range("64,1024") == (64, 1024)
    for parse, text in ((gpu._names(gpu.WORKLOADS), "w4"), (gpu._rates, "0"), (gpu._length_range, "9,8")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_late_compiles_are_counted_per_workload(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("WARNING Triton compiled warm after warm-up in 0.3 s\n")
    late: dict[str, int] = {}
    with gpu._count_late_compiles(log, late, "w3@24"), log.open("a") as f:
        f.write("INFO step\nWARNING Triton compiled a after warm-up in 0.2 s\n")
        f.write("WARNING Triton compiled b after warm-up in 0.4 s\n")
    with gpu._count_late_compiles(tmp_path / "missing.log", late, "w1"):
        pass
    assert late == {"w3@24": 2, "w1": 0}
