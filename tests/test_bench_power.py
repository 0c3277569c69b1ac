"""``bench gpu``'s power sampler (``lightllm_grpc/bench/gpu_power.py``) on CPU, with a stand-in
``nvidia-smi``: what it parses, what it keeps per workload, and what the report says."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from lightllm_grpc.bench import gpu, gpu_power

LINES = (
    "1980, 1980, 120.50, 700.00\n"
    "1530, 1980, 690.00, 700.00\n"
    "[N/A], 1980, 691.0, 700.00\n"
    "1500, 1980, 697.00, 700.00\n"
)


def test_parse_keeps_four_number_lines_and_summary_counts_the_limit() -> None:
    samples = gpu_power.parse(LINES + "1545, 19")  # a cut last line
    assert [s.clock_mhz for s in samples] == [1980, 1530, 1500]
    got = gpu_power.summary(samples)
    assert got is not None
    assert (got["samples"], got["clock_mhz_median"], got["clock_mhz_min"], got["clock_mhz_max"]) == (
        3,
        1530,
        1500,
        1980,
    )
    assert (got["power_w_median"], got["power_w_max"], got["power_limit_w"]) == (690, 697, 700)
    assert got["at_limit_share"] == pytest.approx(2 / 3)  # 690 and 697 W are >= 95% of 700
    assert gpu_power.summary([]) is None


def _fake_smi(tmp_path: Path) -> Path:
    """Prints LINES' samples one every 20 ms until stopped, and records its arguments."""
    script = tmp_path / "nvidia-smi"
    body = "".join(f"echo '{line}'; sleep 0.02\n" for line in LINES.splitlines())
    script.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\nwhile true; do\n{body}done\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_sampled_summarizes_the_block_on_the_visible_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    into: dict = {}
    with gpu_power.sampled(into, "w2", interval_ms=20, smi=str(_fake_smi(tmp_path))):
        time.sleep(0.5)
    got = into["w2"]
    assert got["samples"] >= 3 and got["power_limit_w"] == 700 and got["clock_mhz_min"] == 1500
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-i") + 1] == "3" and "--format=csv,noheader,nounits" in args


def test_no_nvidia_smi_means_no_entry_and_errors_still_propagate(tmp_path: Path) -> None:
    into: dict = {}
    with gpu_power.sampled(into, "w1", smi=str(tmp_path / "missing")):
        pass
    assert into == {}
    with (
        pytest.raises(RuntimeError, match="workload"),
        gpu_power.sampled(into, "w1", smi=str(_fake_smi(tmp_path))),
    ):
        raise RuntimeError("the workload failed")


def test_the_report_names_each_workloads_clock_and_draw() -> None:
    power = {"w2": gpu_power.summary(gpu_power.parse(LINES))}
    variants = {"bf16": {"ours": {"power": power}}, "fp8": {"ours": {}}}
    line = gpu_power.report(variants)
    want = "w2 1530 MHz (max 1980), 690 of 700 W, 67% at the limit"
    assert line == f"\nPower, bf16 (median SM clock and draw per workload): {want}\n"
    env = dict.fromkeys(("card", "date", "torch", "triton", "transformers", "grpcio"), "x")
    w2 = {"workload": {"num_requests": 1000}, "output_tokens_per_s": 16000.0}
    ours = {"w1": {"tpot_p50_ms": 4.0}, "w2": w2, "power": power}
    bf16 = {"weight_gb": 16.0, "roofline_tokens_per_s": 264.0, "weight_read_ms": 3.8, "ours": ours}
    md = gpu.render({"environment": env, "copy_bandwidth_tb_s": 4.2, "variants": {"bf16": bf16}})
    assert line in md
