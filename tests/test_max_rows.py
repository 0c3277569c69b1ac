"""The batch's row count when ``--max-running-requests`` is not given: chosen per device by the
shards, agreed between TP ranks, and taken by the coordinator."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightllm_grpc.config import SchedulerConfig, ServerConfig, ShardConfig
from lightllm_grpc.shard import memory
from tests.server_harness import make_served_model


@pytest.mark.parametrize(("gib", "rows"), [(24, 256), (48, 256), (64, 1024), (80, 1024), (141, 1024)])
def test_a_large_card_gets_1024_rows_and_a_small_one_256(monkeypatch, gib: int, rows: int) -> None:
    props = SimpleNamespace(total_memory=gib << 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert memory.default_max_rows(torch.device("cuda", 0)) == rows


def test_a_cpu_shard_gets_256_rows() -> None:
    assert memory.default_max_rows(torch.device("cpu")) == 256


def test_the_scheduler_runs_the_shards_rows_unless_told_fewer() -> None:
    assert SchedulerConfig().running_rows(1024) == 1024
    assert SchedulerConfig(max_running_requests=100).running_rows(1024) == 100
    assert SchedulerConfig(max_running_requests=512).running_rows(256) == 256


def test_the_scheduler_hands_out_no_more_rows_than_it_runs() -> None:
    from lightllm_grpc.scheduler.scheduler import Scheduler

    assert Scheduler(SchedulerConfig(), kv_capacity=1000, max_rows=8).rows.capacity == 8
    assert Scheduler(SchedulerConfig(max_running_requests=2), kv_capacity=1000, max_rows=8).rows.capacity == 2


def test_row_counts_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_running_requests must be >= 1"):
        SchedulerConfig(max_running_requests=0)
    with pytest.raises(ValueError, match="max_rows"):
        ShardConfig(model=tmp_path, max_rows=0)
    with pytest.raises(ValueError, match="cannot exceed"):
        ServerConfig(ShardConfig(model=tmp_path, max_rows=8), SchedulerConfig(max_running_requests=9))
    ServerConfig(ShardConfig(model=tmp_path), SchedulerConfig())  # both chosen later: fine


def _rows_worker(rank: int, init_file: str, model_dir: str, out: str) -> None:
    from lightllm_grpc.shard import worker

    # Rank 1 stands for a larger card than rank 0's.
    memory.default_max_rows = lambda device: (256, 1024)[rank]
    cfg = ShardConfig(model=Path(model_dir), device="cpu", tp_size=2, max_total_tokens=64)
    shard = worker.build_shard(cfg, rank, 2, f"file://{init_file}")
    torch.save(shard.runner.max_rows, f"{out}.{rank}")
    dist.destroy_process_group()


def test_tp_ranks_take_the_smallest_cards_rows(tmp_path: Path) -> None:
    """Every rank must capture the same decode graphs, so all take the smallest default."""
    model_dir = make_served_model("llama3", tmp_path / "model")
    out = str(tmp_path / "rows")
    mp.spawn(_rows_worker, (str(tmp_path / "init"), str(model_dir), out), nprocs=2)
    assert [torch.load(f"{out}.{r}") for r in range(2)] == [256, 256]
