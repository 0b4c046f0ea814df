"""Checkpoint I/O: save and load time and size of a preset's model + AdamW state, per --checkpoint-type,
and how long a save blocks training (synchronous against --async-save), on the CPU in one process.

    python benchmarks/checkpoint_io.py                    # 790m (Mamba-1, vocab 50277), writes docs/benchmarks.md
    python benchmarks/checkpoint_io.py --model 130m --no-write

The saves and loads are kotomamba.checkpoint.CheckpointManager's own code paths (`_save_sharded`,
`_save_full`, `_write_checksums`, `_load_model_and_optimizer`) on a world of one process (gloo), with fp32 weights and
AdamW moments of every parameter. "Blocks training" is the time until the save call returns: what
`after_iteration` waits for, apart from a few milliseconds writing checkpoint.json and the RNG files.
With --async-save the rest is written in the background. The model is not FSDP-wrapped: on one
process FSDP would hold the same full tensors. Checkpoints are written under --dir (default the
system temporary directory; created if missing) and deleted after each case.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VOCAB = 50277  # GPT-NeoX vocabulary of the public state-spaces checkpoints
# (label, checkpoint type, --async-save)
CASES = (("SHARDED_STATE_DICT", "SHARDED_STATE_DICT", False), ("SHARDED_STATE_DICT --async-save", "SHARDED_STATE_DICT", True),
         ("FULL_STATE_DICT", "FULL_STATE_DICT", False), ("FULL_STATE_DICT --async-save", "FULL_STATE_DICT", True))


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def build(model_name: str) -> tuple[Any, Any, Any]:
    """A preset's model (fp32, CPU, random weights: the values do not matter to I/O) and AdamW with moments."""
    import torch

    from kotomamba.model import build_model, load_model_config

    config = load_model_config(model_name, VOCAB)
    model = build_model(config, on_meta=True)
    model.to_empty(device="cpu")
    model.tie_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-0.02, 0.02)
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # creates exp_avg / exp_avg_sq: the optimizer state a resume needs
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, config


def manager_for(model: Any, optimizer: Any, config: Any, ctx: Any, checkpoint_type: str, async_save: bool) -> Any:
    """A CheckpointManager holding just what its save and load paths use (no arguments, data or tokenizer)."""
    import torch.distributed as dist

    from kotomamba.checkpoint import SHARDED_TYPES, CheckpointManager

    manager = CheckpointManager.__new__(CheckpointManager)
    manager.model, manager.optimizer, manager.model_config, manager.ctx = model, optimizer, config, ctx
    sharded = checkpoint_type in SHARDED_TYPES
    manager._async = async_save
    manager._async_group = dist.new_group(backend="gloo") if async_save and sharded else None
    manager._writer = ThreadPoolExecutor(1, "checkpoint-writer") if async_save and not sharded else None
    return manager


def run_case(manager: Any, checkpoint_type: str, directory: Path) -> dict[str, float]:
    from kotomamba.checkpoint import SHARDED_TYPES

    directory.mkdir(parents=True)
    save = manager._save_sharded if checkpoint_type in SHARDED_TYPES else manager._save_full
    started = time.perf_counter()
    future = save(directory, True)
    blocked = time.perf_counter() - started
    if future is not None:
        future.result()
    saved = time.perf_counter() - started
    size = directory_bytes(directory)
    started = time.perf_counter()
    error = manager._write_checksums(directory)
    assert error is None, error
    checksummed = time.perf_counter() - started
    started = time.perf_counter()
    manager._load_model_and_optimizer(directory, {"checkpoint_type": checkpoint_type, "has_optimizer_state": True})
    loaded = time.perf_counter() - started
    if manager._writer is not None:
        manager._writer.shutdown()
    return {"blocked": blocked, "save": saved, "checksums": checksummed, "load": loaded, "bytes": size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="790m", help="a Mamba preset or model config.json (default 790m; see the section for why not 1.4b)")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    parser.add_argument("--no-write", action="store_true", help="print the table instead of updating docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.dir is not None:
        try:
            Path(args.dir).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f"--dir {args.dir}: cannot create it ({error.strerror})")

    import torch

    from benchmarks.report import markdown_table, write_section
    from kotomamba.distributed import init_distributed, shutdown_distributed
    from kotomamba.kernels import select_kernel_backend
    from kotomamba.model import count_parameters

    torch.set_num_threads(max(1, torch.get_num_threads()))
    select_kernel_backend(torch.device("cpu"))
    ctx = init_distributed(use_mpi=False, device_type="cpu")
    root = Path(tempfile.mkdtemp(prefix="kotomamba-checkpoint-io-", dir=args.dir))
    try:
        model, optimizer, config = build(args.model)
        state_bytes = 3 * 4 * count_parameters(model)  # fp32 weights + two AdamW moments
        rows = []
        for label, checkpoint_type, async_save in CASES:
            manager = manager_for(model, optimizer, config, ctx, checkpoint_type, async_save)
            result = run_case(manager, checkpoint_type, root / label.replace(" ", "_"))
            shutil.rmtree(root / label.replace(" ", "_"))
            print(label, result, flush=True)
            rows.append([f"`{label}`", f"{result['blocked']:.1f}", f"{result['save']:.1f}", f"{result['checksums']:.1f}",
                         f"{result['load']:.1f}",
                         f"{result['bytes'] / 1e9:.2f}", f"{result['bytes'] / 1e9 / result['save']:.2f}"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutdown_distributed()
    table = markdown_table(["checkpoint", "blocks training (s)", "save (s)", "checksums (s)", "load (s)", "size (GB)", "save GB/s"], rows)
    body = (
        f"Preset `{args.model}` (Mamba-1, vocab {VOCAB}): {count_parameters(model) / 1e6:.0f}M parameters, "
        f"fp32 weights + AdamW moments = {state_bytes / 1e9:.2f} GB of state, on the CPU in one process "
        f"(world size 1, gloo), written to local disk. (The default preset is 790m because the 1.4b one "
        f"needs 16.5 GB of state plus a second copy while an asynchronous save stages it: more than a 24 GB "
        f"machine has.)\n\n{table}\n\n"
        "*blocks training*: time until the save call returns, i.e. what `after_iteration` waits for (plus a few "
        "milliseconds for checkpoint.json and the RNG files). With `--async-save` the state is copied to host "
        "memory (sharded: torch.distributed.checkpoint's staging; FULL: a clone) and written by a background "
        "thread, so training resumes after the copy; without it, after the write. *save*: until the files are "
        "written. *checksums*: CRC32 of every file (checksums.json), taken once all ranks have written and "
        "before publishing, and again to verify a checkpoint before a resume reads it. It adds to what a save "
        "blocks: a synchronous save blocks for save + checksums, an asynchronous one for the copy and then, "
        "when the next save or the end of the run waits for it, the checksums. With N ranks each checksums 1/N "
        "of the files (here one process hashes all of them, about 1 GB/s). *load*: reading back into the model and optimizer as a resume does (`FULL_STATE_DICT` "
        "memory-maps `state.pt`). torch.distributed.checkpoint fsyncs its files, while `state.pt` is written by "
        "`torch.save` without an fsync, so part of the FULL save time is spent only reaching the page cache; the "
        "sharded format also stores the tied `lm_head.weight` (a second copy of the embedding). Recently written "
        "files may still be in the page cache, so loads from a cold parallel file system are slower."
    )
    if args.no_write:
        print(body)
    else:
        write_section("checkpoint_io", "Checkpoint save and load (CPU, one process)", body)


if __name__ == "__main__":
    main()
