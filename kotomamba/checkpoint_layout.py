"""How a kotomamba training checkpoint is recognized on disk (the layout: kotomamba.checkpoint).

Torch-free, so that the command line (--base-model), inference and export ask the same question the
same way before anything heavy loads.
"""
from __future__ import annotations

import re
from pathlib import Path

LATEST = "latest"
METADATA = "checkpoint.json"
ITERATION_DIR = re.compile(r"iter_(\d+)")
# What a checkpoint stores per parameter: the fp32 master weight and AdamW's two fp32 moments.
MASTER_BYTES = 4
ADAM_BYTES = 8
CHECKPOINT_BYTES = MASTER_BYTES + ADAM_BYTES


def saves_ahead(iteration: int, train_iters: int, save_interval: int) -> int:
    """Checkpoints a run at `iteration` still writes: one every --save-interval and the final one."""
    if iteration >= train_iters:
        return 0
    return train_iters // save_interval - iteration // save_interval + (train_iters % save_interval > 0)


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def is_training_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a run's --save directory (a ``latest`` file or ``iter_*`` subdirectories) or
    one checkpoint of it, rather than a model directory."""
    path = Path(path)
    if (path / METADATA).is_file() or (path / LATEST).is_file():
        return True
    if not path.is_dir():
        return False
    if any(child.is_dir() and ITERATION_DIR.fullmatch(child.name) for child in path.iterdir()):
        return True
    # Converted models are often kept in iter_* directories too: those have a config.json.
    return bool(ITERATION_DIR.fullmatch(path.name)) and (
        (path.parent / LATEST).is_file() or not (path / "config.json").exists())
