"""Pretrain or continually pretrain a mamba-ssm language model with PyTorch FSDP.

    python pretrain.py --help
    torchrun --nproc-per-node 8 pretrain.py --model 1.4b --data-path PREFIX ...
    mpirun -np 16 --npernode 4 python pretrain.py --use-mpi --fp16 ...
"""
from __future__ import annotations

import sys

from kotomamba.arguments import ArgumentError, check_data_files, parse_args
from kotomamba.cli import INPUT_ERROR, USAGE_ERROR, report_error
from kotomamba.errors import KotomambaError

PROG = "pretrain.py"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ArgumentError as error:
        return report_error(PROG, error, USAGE_ERROR)
    if not args.dry_run:
        try:
            check_data_files(args)  # before the process group, the kernels and the model
        except ArgumentError as error:
            return report_error(PROG, error, INPUT_ERROR)
    if args.dry_run:
        # Before kotomamba.train is imported: a dry run needs no GPU, process group or data.
        from kotomamba.dry_run import run

        return run(args)
    from kotomamba.train import pretrain

    try:
        pretrain(args)
    except KotomambaError as error:
        # A problem with the inputs (data, tokenizer, model, launch, flags), already explained by its message.
        return report_error(PROG, error, INPUT_ERROR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
