"""``tests/gpu_runner.py``, the parallel GPU test runner, on CPU: how it cuts the tests into jobs,
how it hands out cards, and what it reports (the pytest processes are replaced by a stub)."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest

from tests import gpu_runner
from tests.gpu_runner import Job, make_jobs, schedule, summary

TP = gpu_runner.TWO_GPU_FILES[0]


def _nodes(path: str, n: int) -> list[str]:
    return [f"{path}::test_{i}" for i in range(n)]


def test_jobs_spread_each_file_over_the_cards_and_tp_files_take_two() -> None:
    nodes = _nodes("tests/test_gpu.py", 38) + _nodes(TP, 8) + _nodes("tests/kernels/test_a.py", 3)
    jobs = make_jobs(nodes, cards=4)
    assert jobs[0].gpus == 2 and jobs[0].nodes == _nodes(TP, 8)  # first, and whole
    singles = jobs[1:]
    assert all(j.gpus == 1 for j in singles)
    assert sorted(n for j in singles for n in j.nodes) == sorted(nodes[:38] + nodes[46:])
    assert [len(j.nodes) for j in singles] == [5] * 7 + [3] + [3]  # ceil(38 / 8) a job; kernels whole
    assert all(len({n.split("::")[0] for n in j.nodes}) == 1 for j in jobs)  # one file a job
    assert all(j.gpus == 1 for j in make_jobs(nodes[:38], cards=1))
    assert not any(TP in n for j in make_jobs(nodes, cards=1) for n in j.nodes)  # one card: no TP


def test_server_jobs_start_before_kernel_jobs_and_kernel_files_go_in_chunks() -> None:
    kernels = _nodes("tests/kernels/test_b.py", gpu_runner.QUICK_CHUNK + 1)
    nodes = kernels + _nodes("tests/kernels/test_a.py", 2) + _nodes("tests/test_fp8_gpu.py", 4)
    jobs = make_jobs(nodes, cards=2)
    files = [j.nodes[0].split("::")[0] for j in jobs]
    a, b = "tests/kernels/test_a.py", "tests/kernels/test_b.py"
    assert files == ["tests/test_fp8_gpu.py"] * 4 + [b, b, a]
    assert [len(j.nodes) for j in jobs] == [1, 1, 1, 1, gpu_runner.QUICK_CHUNK, 1, 2]


def test_the_parts_run_every_job_once_in_turn() -> None:
    nodes = _nodes("tests/test_gpu.py", 12) + _nodes(TP, 8) + _nodes("tests/kernels/test_a.py", 3)
    jobs = make_jobs(nodes, cards=2)
    parts = [gpu_runner.part(jobs, (k, 3)) for k in (1, 2, 3)]
    assert sorted(n for p in parts for j in p for n in j.nodes) == sorted(nodes)
    assert [j.gpus for j in parts[0]][:1] == [2] and parts[1][0] is jobs[1]  # in turn, in order
    assert gpu_runner.part(jobs, (1, 1)) == jobs


@pytest.mark.parametrize("spec", ["4/3", "0/2", "0/0", "1/x", "12", "1/2/3"])
def test_a_malformed_part_is_refused_with_the_form_it_wants(capsys, spec: str) -> None:
    with pytest.raises(SystemExit):
        gpu_runner.parser().parse_args(["--part", spec])
    assert "--part wants K/N with 1 <= K <= N" in capsys.readouterr().err


def test_a_part_is_read_as_two_numbers() -> None:
    assert gpu_runner.parser().parse_args(["--part", "2/3"]).part == (2, 3)


def test_schedule_runs_jobs_at_once_on_disjoint_cards_and_reports_each(tmp_path: Path) -> None:
    jobs = [Job(["tp::a"], gpus=2)] + [Job([f"f::{i}"]) for i in range(5)]
    lock, held, peak, seen = threading.Lock(), set(), [0], []

    def launch(job: Job, cards: tuple[int, ...], log: Path, timeout: float) -> tuple[int, str]:
        with lock:
            assert not held & set(cards), "a card handed out twice"
            held.update(cards)
            peak[0] = max(peak[0], len(held))
            seen.append((job.nodes[0], cards))
        time.sleep(0.05)
        with lock:
            held.difference_update(cards)
        return (1, "1 failed") if job.nodes == ["f::3"] else (0, "1 passed")

    schedule(jobs, 3, tmp_path, deadline=60, job_timeout=10, launch=launch)
    assert seen[0] == ("tp::a", (0, 1)) and peak[0] == 3  # the two-card job first, every card busy
    assert [j.rc for j in jobs] == [0, 0, 0, 0, 1, 0] and all(j.seconds > 0 for j in jobs)
    text = summary(jobs)
    assert "5 of 6 jobs passed" in text and "rc 1" in text and "1 failed" in text


def test_by_default_every_job_runs_and_only_a_hang_is_cut() -> None:
    args = gpu_runner.parser().parse_args([])
    assert args.deadline == math.inf and args.job_timeout >= 1800 and args.part == (1, 1)


def test_no_job_starts_after_the_deadline(tmp_path: Path) -> None:
    jobs = [Job([f"f::{i}"]) for i in range(3)]

    def launch(job: Job, cards: tuple[int, ...], log: Path, timeout: float) -> tuple[int, str]:
        time.sleep(0.2)
        return 0, "1 passed"

    schedule(jobs, 1, tmp_path, deadline=0.1, job_timeout=10, launch=launch)
    assert [j.rc for j in jobs] == [0, None, None]
    assert "1 of 3 jobs passed" in summary(jobs) and "not started" in summary(jobs)


def test_a_real_job_runs_pytest_and_counts_no_tests_as_passed(tmp_path: Path) -> None:
    """``run_pytest`` on a node list whose module skips itself without a GPU: exit code 5 or
    0 (all skipped) both pass; its last line is pytest's summary."""
    job = Job(["tests/kernels/test_kernel_fp8_quant.py"])
    rc, last = gpu_runner.run_pytest(job, (0,), tmp_path / "log", timeout=120)
    job.rc = rc
    assert job.passed and ("skipped" in last or "no tests ran" in last), (rc, last)


def test_main_fails_without_a_card() -> None:
    assert gpu_runner.main(["--gpus", "0"]) == 1


def test_collect_lists_the_gpu_marked_node_ids_only() -> None:
    nodes = gpu_runner.collect(
        ["tests/kernels/test_kernel_fp8_quant.py", "tests/kernels/test_kernel_fp8_act_quant.py"]
    )
    assert len(nodes) == 8, nodes  # the marked file's 8 cases; the other file has no gpu mark
    assert all(n.startswith("tests/kernels/test_kernel_fp8_quant.py::test_per_token_quant") for n in nodes)
