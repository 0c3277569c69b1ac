"""``lightllm-grpc bench trace``: a step trace's first tokens split into their parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightllm_grpc.bench import trace_report as tr
from lightllm_grpc.cli import main


def _step(step: int, t: float, shard_ms: float, first: list[tuple[str, float]]) -> dict:
    """A trace line: sent at t + 1 ms, result at t + 8 ms, each first token's request arrived
    at its own time, admitted 0.5 ms later, delivered 0.25 ms after the result."""
    return {
        "step": step, "sent": t + 0.001, "result": t + 0.008, "period_ms": 7.0, "shard_ms": shard_ms,
        "fill_ms": 0.0, "deliver_ms": 0.1, "decode_rows": 0, "prefill_tokens": 128, "prefill_requests": 1,
        "first_tokens": [
            {"request_id": rid, "index": 0, "arrived": at, "admitted": at + 0.0005,
             "first_token": t + 0.00825}
            for rid, at in first
        ],
    }  # fmt: skip


def _write(path: Path, steps: list[dict]) -> Path:
    path.write_text("".join(json.dumps(s) + "\n" for s in steps) + "\n")  # a blank last line too
    return path


STEPS = [
    _step(1, 10.0, 6.0, [("warm-up", 10.0)]),
    _step(2, 20.0, 6.5, [("a", 20.0)]),
    _step(3, 30.0, 9.0, []),  # a decode step: no first token
    _step(4, 40.0, 6.0, [("b", 40.0), ("c", 39.999)]),
]


def test_first_tokens_are_split_into_the_engines_parts(tmp_path) -> None:
    tokens = tr.first_tokens(_write(tmp_path / "t.jsonl", STEPS).read_text().splitlines())
    assert [(t.request_id, t.step) for t in tokens] == [("warm-up", 1), ("a", 2), ("b", 4), ("c", 4)]
    a = tokens[1].parts
    expected = {"queue": 0.5, "to_send": 0.5, "shard": 6.5, "messages": 0.5, "after": 0.25, "engine": 8.25}
    assert a == pytest.approx(expected, abs=1e-6)
    assert sum(a[k] for k in ("queue", "to_send", "shard", "messages", "after")) == pytest.approx(a["engine"])
    assert tokens[3].parts["queue"] == pytest.approx(0.5) and tokens[3].parts["engine"] == pytest.approx(9.25)


def test_client_ttfts_join_the_last_first_tokens_in_order(tmp_path) -> None:
    tokens = tr.first_tokens(_write(tmp_path / "t.jsonl", STEPS).read_text().splitlines())
    joined = tr.join_client(tokens, [10.0, 11.0, 12.0])  # the warm-up is not the client's
    assert [t.request_id for t in joined] == ["a", "b", "c"]
    assert [round(t.parts["outside"], 6) for t in joined] == [1.75, 2.75, 2.75]
    with pytest.raises(ValueError, match="5 client TTFTs but only 4"):
        tr.join_client(tokens, [1.0] * 5)


def test_client_ttfts_come_from_a_bench_gpu_result(tmp_path) -> None:
    result = {
        "variants": {"bf16": {"ours": {"w1": {}}}, "fp8": {"ours": {"ttft": {"ttft_ms_each": [9, 10.5]}}}}
    }
    (tmp_path / "b.json").write_text(json.dumps(result))
    assert tr.client_ttfts(tmp_path / "b.json") == [9.0, 10.5]
    (tmp_path / "none.json").write_text(json.dumps({"variants": {"bf16": {"ours": {}}}}))
    with pytest.raises(ValueError, match="no ttft workload"):
        tr.client_ttfts(tmp_path / "none.json")


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert [tr.percentile(values, q) for q in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert tr.percentile([3.0], 99) == 3.0


def test_bench_trace_prints_the_parts_and_the_slow_first_tokens(tmp_path, capsys) -> None:
    trace = _write(tmp_path / "t.jsonl", STEPS)
    (tmp_path / "b.json").write_text(
        json.dumps({"variants": {"bf16": {"ours": {"ttft": {"ttft_ms_each": [10, 11, 14]}}}}})
    )
    assert (
        main(["bench", "trace", str(trace), "--ttft-json", str(tmp_path / "b.json"), "--slow-ms", "12"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("3 first tokens; ms\n| part | p50 | p90 | p99 | max |")
    assert "| ttft | 11.000 | 14.000 | 14.000 | 14.000 |" in out
    assert "| shard | 6.000 | 6.500 | 6.500 | 6.500 |" in out
    assert "1 over 12 ms (ttft):" in out and "#2 step 4 c: ttft 14.00, outside 4.75" in out
    # Without the client's figures: the engine's parts alone, the slow ones by their engine time.
    assert main(["bench", "trace", str(trace), "--slow-ms", "9"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 first tokens; ms") and "| ttft |" not in out and "1 over 9 ms (engine):" in out
