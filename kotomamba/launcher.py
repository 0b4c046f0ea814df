"""What the launcher (torchrun, mpirun, or none) tells this process through its environment.

Torch-free: the entry points read the rank to decide who reports an error before anything heavy loads,
and kotomamba.distributed reads the whole layout to create the process group.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from kotomamba.errors import KotomambaError


class LaunchError(KotomambaError, RuntimeError):
    """The launcher's environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class LaunchEnvironment:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # "torchrun", "mpirun" or "single"


def _int_variable(environ: Mapping[str, str], name: str) -> int:
    if name not in environ:
        raise LaunchError(f"environment variable {name} is not set")
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def launch_environment(use_mpi: bool, environ: Mapping[str, str] | None = None) -> LaunchEnvironment:
    """This process's place in the job: mpirun's OMPI_COMM_WORLD_* under --use-mpi, else torchrun's
    RANK/WORLD_SIZE, else a single process."""
    environ = os.environ if environ is None else environ
    if use_mpi:
        if "OMPI_COMM_WORLD_RANK" not in environ:
            raise LaunchError(
                "--use-mpi was given but OMPI_COMM_WORLD_RANK is not set: launch with OpenMPI's "
                "`mpirun -np N … python pretrain.py --use-mpi`, or drop --use-mpi for torchrun/python"
            )
        found = LaunchEnvironment(
            _int_variable(environ, "OMPI_COMM_WORLD_RANK"), _int_variable(environ, "OMPI_COMM_WORLD_SIZE"),
            _int_variable(environ, "OMPI_COMM_WORLD_LOCAL_RANK"), _int_variable(environ, "OMPI_COMM_WORLD_LOCAL_SIZE"),
            "mpirun")
    elif "RANK" in environ and "WORLD_SIZE" in environ:
        world = _int_variable(environ, "WORLD_SIZE")
        found = LaunchEnvironment(
            _int_variable(environ, "RANK"), world,
            _int_variable(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
            _int_variable(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world,
            "torchrun")
    elif "OMPI_COMM_WORLD_SIZE" in environ and environ["OMPI_COMM_WORLD_SIZE"] != "1":
        raise LaunchError("started by mpirun with several processes but without --use-mpi: add --use-mpi")
    else:
        return LaunchEnvironment(0, 1, 0, 1, "single")
    if not 0 <= found.rank < found.world_size:
        raise LaunchError(f"rank {found.rank} is outside world size {found.world_size}")
    return found


def launcher_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank under torchrun or mpirun (with or without --use-mpi), 0 when the environment
    does not tell: it only decides who prints."""
    environ = os.environ if environ is None else environ
    try:
        return launch_environment("RANK" not in environ, environ).rank
    except LaunchError:
        return 0
