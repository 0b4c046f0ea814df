"""kotomamba.parallel's own duties beyond FSDP: averaging the gradients of the fp32 parameters FSDP leaves
replicated (A_log, D, dt_bias under bf16), over 2 real gloo processes."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kotomamba.parallel import ShardedModel


def _sync_worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    parameters = [nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(1))]
    for i, parameter in enumerate(parameters[:2]):
        parameter.grad = torch.arange(parameter.numel(), dtype=torch.float32).view_as(parameter) * (rank + 1) + i
    # parameters[2] has no gradient (unused this step): it must stay without one.
    ShardedModel(nn.Identity(), None, world_size, parameters).sync_replicated_gradients()
    gathered = [None] * world_size
    dist.all_gather_object(gathered, [None if p.grad is None else p.grad.clone() for p in parameters])
    if rank == 0:
        torch.save(gathered, result_file)
    dist.destroy_process_group()


def test_replicated_gradients_are_averaged_over_ranks(tmp_path):
    result_file = tmp_path / "result.pt"
    mp.start_processes(_sync_worker, args=(2, str(tmp_path / "init"), str(result_file)), nprocs=2,
                       start_method="fork")
    per_rank = torch.load(result_file)
    for i, shape in enumerate([(2, 3), (4,)]):
        base = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)
        expected = (base * 1 + i + base * 2 + i) / 2
        for grads in per_rank:
            assert torch.equal(grads[i], expected), (i, grads[i], expected)
    assert all(grads[2] is None for grads in per_rank)


def test_cpu_threads_respect_omp_num_threads_else_share_the_physical_cores(monkeypatch):
    from kotomamba import distributed

    assert 1 <= distributed.physical_cpu_cores() <= os.cpu_count()
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert distributed.configure_cpu_threads(processes_per_node=4) == 1 == torch.get_num_threads()
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(distributed, "physical_cpu_cores", lambda: 8)
        assert distributed.configure_cpu_threads(processes_per_node=2) == 4 == torch.get_num_threads()
        assert distributed.configure_cpu_threads(processes_per_node=16) == 1
    finally:
        torch.set_num_threads(before)
