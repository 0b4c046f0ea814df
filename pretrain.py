"""Pretrain or continually pretrain a mamba-ssm language model with PyTorch FSDP.

    python pretrain.py --help
    torchrun --nproc-per-node 8 pretrain.py --model 1.4b --data-path PREFIX ...
    mpirun -np 16 --npernode 4 python pretrain.py --use-mpi --fp16 ...
"""
from __future__ import annotations

import sys

from kotomamba.arguments import ArgumentError, check_data_files, parse_args
from kotomamba.config import build_run_config
from kotomamba.cli import INPUT_ERROR, USAGE_ERROR, report_error
from kotomamba.errors import KotomambaError
from kotomamba.launcher import LaunchError, launch_environment

PROG = "pretrain.py"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.dry_run:
            # Before kotomamba.train is imported: a dry run needs no GPU, process group or data; it builds
            # the configuration for the world layout it assumes.
            from kotomamba.dry_run import run

            return run(args)
        config = build_run_config(args, launch_environment(args.use_mpi).world_size)
    except ArgumentError as error:
        return report_error(PROG, error, USAGE_ERROR)
    except LaunchError as error:
        return report_error(PROG, error, INPUT_ERROR)
    try:
        check_data_files(config.data)  # before the process group, the kernels and the model
    except ArgumentError as error:
        return report_error(PROG, error, INPUT_ERROR)
    from kotomamba.train import pretrain

    try:
        pretrain(config)
    except KotomambaError as error:
        # A problem with the inputs (data, tokenizer, model, launch, flags), already explained by its message.
        return report_error(PROG, error, INPUT_ERROR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
