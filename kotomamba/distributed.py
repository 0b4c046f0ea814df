"""Process-group setup for the three ways pretrain.py is launched.

- `torchrun` (H100/H200 nodes, SLURM): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT are set by torchrun.
- `mpirun … python pretrain.py --use-mpi` (ABCI): OpenMPI sets OMPI_COMM_WORLD_*; MASTER_ADDR/PORT come
  from the job script (`-x MASTER_ADDR -x MASTER_PORT`) or, if absent, rank 0 picks them and mpi4py
  broadcasts them.
- plain `python pretrain.py`: one process. A process group is still created (in memory) so that the
  FSDP code path is the same whatever the world size.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from kotomamba.errors import KotomambaError
from kotomamba.launcher import LaunchError, launch_environment

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    launcher: str  # "torchrun", "mpirun" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _agree_on_master_via_mpi() -> None:
    """Rank 0 proposes its host and a free port; every rank adopts them."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchError(
            "MASTER_ADDR/MASTER_PORT are not set and mpi4py is not installed: export them in the job "
            "script (mpirun -x MASTER_ADDR -x MASTER_PORT) or `pip install mpi4py`"
        ) from None
    comm = MPI.COMM_WORLD
    proposal = (socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None
    addr, port = comm.bcast(proposal, root=0)
    os.environ.setdefault("MASTER_ADDR", addr)
    os.environ.setdefault("MASTER_PORT", str(port))


def physical_cpu_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once; the affinity mask respected)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            siblings = str(cpu)
        cores.add(siblings)
    return max(1, len(cores))


def configure_cpu_threads(processes_per_node: int = 1) -> int:
    """CPU runs: torch's intra-op threads, without oversubscribing the machine; returns the count.

    ``OMP_NUM_THREADS``, when set, is respected (torch reads it at start-up; torchrun sets 1 for
    several processes). Otherwise each of the node's processes gets an equal share of the physical
    cores: torch's default counts every core for every process, and threads that outnumber the cores
    (or share them with hyper-threads) make a small model many times slower.
    """
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        threads, reason = int(configured), "OMP_NUM_THREADS"
    else:
        cores = physical_cpu_cores()
        threads = max(1, cores // max(1, processes_per_node))
        reason = f"{cores} physical cores / {processes_per_node} process(es) per node; set OMP_NUM_THREADS to change"
    torch.set_num_threads(threads)
    logger.info("CPU threads per process: %d (%s)", threads, reason)
    return threads


def init_distributed(use_mpi: bool = False, device_type: str | None = None, timeout_minutes: int = 30) -> DistributedContext:
    """Create the default process group (NCCL on GPU, gloo on CPU) and pick this rank's device."""
    launch = launch_environment(use_mpi)
    rank, world, local_rank, local_world = launch.rank, launch.world_size, launch.local_rank, launch.local_world_size

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(
                f"local rank {local_rank} has no GPU: this node shows {torch.cuda.device_count()} "
                "GPU(s); start at most that many processes per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        configure_cpu_threads(local_world)

    timeout = datetime.timedelta(minutes=timeout_minutes)
    if dist.is_initialized():
        pass
    elif world == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        if use_mpi and ("MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ):
            _agree_on_master_via_mpi()
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise LaunchError(f"{' and '.join(missing)} not set for a {world}-process run")
        dist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world, timeout=timeout,
            **({"device_id": device} if backend == "nccl" else {}),
        )
    ctx = DistributedContext(rank, world, local_rank, local_world, device, backend, launch.launcher)
    logger.info(
        "distributed: launcher=%s world_size=%d nodes=%d backend=%s device=%s",
        launch.launcher, world, ctx.num_nodes, backend, device,
    )
    return ctx


def shutdown_distributed(completed: bool = False) -> None:
    """Destroy the process groups. `completed`: every rank finished without an error, so they first
    meet at a barrier; no rank then tears its connections down while a peer is still using them (gloo
    aborted the process in that race). After an error there is no barrier: a dead peer would hang it."""
    if not dist.is_initialized():
        return
    if completed and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def new_host_group() -> dist.ProcessGroup | None:
    """A gloo group over every rank, for the few numbers the training loop agrees on between steps (stop
    decisions, logged figures): a collective on the GPU's group would wait for all the work queued before
    it. Also on CPU runs, whose default group is gloo already: one code path, tested. None for one
    process. Collective: every rank calls it at the same point."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo")


def all_ranks_agree(ok: bool, device: torch.device) -> bool:
    """True only when `ok` holds on every rank; lets a check that fails on one rank stop all of them
    (instead of rank 0 raising while the others hang in the next collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], device=device, dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def raise_on_every_rank(error: KotomambaError | None, elsewhere: KotomambaError, device: torch.device) -> None:
    """When any rank has an ``error``, raise on every rank: its own error there, ``elsewhere`` on the
    others, so that no rank is left waiting in the next collective."""
    if not all_ranks_agree(error is None, device):
        raise error if error is not None else elsewhere
