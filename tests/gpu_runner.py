"""Every GPU test in one command, spread over the machine's GPUs: ``python -m tests.gpu_runner``.

``make test-gpu`` runs the GPU tests one after another on one card: ~15 minutes on an H200,
more than one call on a lent machine may take. This collects the ``gpu``-marked tests (or those
under the paths given), cuts them into jobs and runs each job as its own pytest process with
``CUDA_VISIBLE_DEVICES`` set to the cards it holds, as many at once as there are cards:

- a file in ``TWO_GPU_FILES`` is one job that holds two cards (tensor parallelism);
- a kernel file's tests (``QUICK_DIRS``, seconds each) go in jobs of ``QUICK_CHUNK``, since a
  pytest process takes seconds to start;
- every other file's tests are cut into jobs of at most ``ceil(n / (2 * cards))`` tests, so the
  long files (one server per test) spread over every card;
- jobs that hold two cards start first, then the server-level jobs, then the kernel jobs; each
  job takes the first free card, in order.

Each job's output goes to ``--out/job-N.log``; the summary (also ``--out/summary.txt``) has one
line per job (cards, tests, seconds, pytest's last line) and the run exits 1 if any job failed,
timed out or was never started before ``--deadline`` (seconds from the start; none are started
after it).
Exit code 5 (no tests: a module that skips itself) counts as passed here. ``--part K/N`` runs
every N-th job from the K-th, for machines lent by the call (N calls run every job once).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TWO_GPU_FILES = ("tests/test_gpu_tp.py",)
# Kernel tests take seconds each; a pytest process takes ~7 s to start (torch, Triton), so their
# files go in chunks of this many tests rather than spread thin over the cards.
QUICK_DIRS = ("tests/kernels/",)
QUICK_CHUNK = 64
PYTEST = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]


@dataclass
class Job:
    """Node ids of one file, run in one pytest process on ``gpus`` cards."""

    nodes: list[str]
    gpus: int = 1
    cards: tuple[int, ...] = ()
    rc: int | None = None  # None: not run (yet)
    started: float = 0.0
    seconds: float = 0.0
    last_line: str = ""
    log: Path | None = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        return self.rc in (0, 5)


def make_jobs(nodes: Sequence[str], cards: int) -> list[Job]:
    """The jobs for ``nodes`` (pytest node ids) on ``cards`` cards: two-card jobs, then the other
    files' (one server a test, minutes each) cut fine, then the quick files' in big chunks."""
    by_file: dict[str, list[str]] = {}
    for node in nodes:
        by_file.setdefault(node.split("::", 1)[0], []).append(node)
    jobs = [Job(n, gpus=2) for f, n in by_file.items() if f in TWO_GPU_FILES and cards >= 2]
    slow: list[Job] = []
    quick: list[Job] = []
    for path, file_nodes in by_file.items():
        if path in TWO_GPU_FILES:
            continue
        is_quick = path.startswith(QUICK_DIRS)
        size = QUICK_CHUNK if is_quick else max(1, math.ceil(len(file_nodes) / (2 * cards)))
        cut = [Job(file_nodes[i : i + size]) for i in range(0, len(file_nodes), size)]
        (quick if is_quick else slow).extend(cut)
    # Longest first, so a deadline leaves the seconds-long kernel jobs behind, not a server file.
    return jobs + slow + quick


def part_spec(text: str) -> tuple[int, int]:
    """``--part K/N`` as ``(K, N)``, with 1 <= K <= N."""
    k, slash, n = text.partition("/")
    if not (slash and k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise argparse.ArgumentTypeError(f"--part wants K/N with 1 <= K <= N (e.g. 1/2), got {text!r}")
    return int(k), int(n)


def part(jobs: list[Job], which: tuple[int, int]) -> list[Job]:
    """Part ``K/N`` of ``jobs``: every N-th job from the K-th (1-based), so each part gets the
    two-card, server-level and kernel jobs in about equal measure. A lent machine's call may
    run for 10 minutes; the N parts in N calls run every job once."""
    k, n = which
    return jobs[k - 1 :: n]


# (job, its cards, log path, seconds it may run) -> (pytest's return code, its last line)
Launch = Callable[[Job, tuple[int, ...], Path, float], tuple[int, str]]


def run_pytest(job: Job, cards: tuple[int, ...], log: Path, timeout: float) -> tuple[int, str]:
    """``job``'s pytest on ``cards``; a run past ``timeout`` is killed (rc 124)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, cards))}
    with log.open("w") as out:
        try:
            done = subprocess.run(
                [*PYTEST, *job.nodes], env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            )
            rc = done.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return rc, lines[-1] if lines else ""


def schedule(
    jobs: list[Job], cards: int, out: Path, deadline: float, job_timeout: float, launch: Launch = run_pytest
) -> None:
    """Run ``jobs`` on ``cards`` cards, as many at once as the cards allow (threads: each job is a
    subprocess); fills each job's result. None starts ``deadline`` seconds after the call."""
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    start, free = time.monotonic(), list(range(cards))
    pending = list(jobs)
    running: dict[Future[tuple[int, str]], Job] = {}
    with ThreadPoolExecutor(max_workers=max(1, cards)) as pool:
        while pending or running:
            late = time.monotonic() - start > deadline
            while pending and not late and len(free) >= pending[0].gpus:
                job = pending.pop(0)
                job.cards, free = tuple(free[: job.gpus]), free[job.gpus :]
                job.log = out / f"job-{jobs.index(job)}.log"
                job.started = time.monotonic()
                running[pool.submit(launch, job, job.cards, job.log, job_timeout)] = job
            if late:
                pending.clear()
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                job.rc, job.last_line = future.result()
                job.seconds = time.monotonic() - job.started
                free = sorted(free + list(job.cards))


def collect(paths: Sequence[str]) -> list[str]:
    """Node ids of the ``gpu``-marked tests under ``paths`` (as this machine's pytest collects them)."""
    found = subprocess.run([*PYTEST, "--collect-only", *paths], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if "::" in line and not line.startswith(" ")]


def summary(jobs: Sequence[Job]) -> str:
    rows = []
    for i, job in enumerate(jobs):
        state = "not started" if job.rc is None else f"rc {job.rc}, {job.seconds:.0f} s"
        cards = ",".join(map(str, job.cards)) or "-"
        rows.append(f"job {i}: cards {cards}, {len(job.nodes)} tests, {state}: {job.last_line}")
    failed = sum(not job.passed for job in jobs)
    rows.append(f"{len(jobs) - failed} of {len(jobs)} jobs passed")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", default=["tests"])
    p.add_argument("--gpus", type=int, default=None, help="cards to use (default: all CUDA devices)")
    p.add_argument("--out", type=Path, default=None, help="folder for the jobs' logs (default: a temp dir)")
    # No deadline by default: a machine of one's own runs every job. A machine lent by the call
    # (10 minutes at most) wants e.g. --deadline 400 --job-timeout 470, or --part.
    p.add_argument("--deadline", type=float, default=math.inf, help="seconds after which no job starts")
    p.add_argument("--job-timeout", type=float, default=1800.0, help="seconds one job may run (a hang)")
    p.add_argument(
        "--part", type=part_spec, default=(1, 1), help="K/N: run only the K-th of N parts of the jobs"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.gpus is None:
        import torch

        args.gpus = torch.cuda.device_count()
    if args.gpus < 1:
        print("no CUDA device", file=sys.stderr)
        return 1
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-tests-"))
    out.mkdir(parents=True, exist_ok=True)
    jobs = part(make_jobs(collect(args.paths), args.gpus), args.part)
    tests = sum(len(j.nodes) for j in jobs)
    print(f"{tests} tests in {len(jobs)} jobs on {args.gpus} card(s); logs in {out}")
    schedule(jobs, args.gpus, out, args.deadline, args.job_timeout)
    report = summary(jobs)
    (out / "summary.txt").write_text(report + "\n")  # the console may keep only its tail
    print(report)
    return 0 if jobs and all(job.passed for job in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
