"""Training throughput: kotomamba's pretrain.py path against the peers users would otherwise run,
on the same shapes, the same machine, in one run.

    python benchmarks/train_throughput.py --plan standard          # on a GPU machine (1 and 2 GPUs)
    python benchmarks/train_throughput.py --plan tiny              # CPU smoke test of every runner
    python benchmarks/train_throughput.py --plan scan              # one GPU: our scan vs mamba-ssm's, the recipe
    python benchmarks/train_throughput.py --only 2.8b --results r.jsonl --no-report   # a part of the plan
    python benchmarks/train_throughput.py --report-from r1.jsonl r2.jsonl            # docs from saved parts
    python benchmarks/train_throughput.py --only "2.8b 1gpu" --profile prof/         # + where each step's time goes

Runners (each measurement in its own process, launched with torchrun when it uses 2 GPUs):
  kotomamba   our training loop (`kotomamba.train.run_training`, i.e. pretrain.py) on a Megatron
              dataset of random tokens: FSDP2, fp32 master weights, bf16 compute, fp32 reduction.
  recipe      the kotomamba repository's recipe: FSDP1 `FullyShardedDataParallel` wrapping each
              mamba-ssm `Block`, the model cast to bf16, `MixedPrecision(bf16, bf16, bf16)`,
              torch AdamW, cross-entropy on bf16 logits.
  hf          Hugging Face `MambaForCausalLM` (its CUDA-kernel path), one GPU, plain loop, bf16
              autocast over fp32 weights, torch AdamW.
All runners train on random tokens (the data loader is not what is measured; ours still reads its
samples through the real Megatron dataset). Tokens/s per GPU = global batch × seq / mean step time
/ GPUs, over the steps after warm-up. MFU uses `kotomamba.flops.flops_per_token` (forward +
backward, no recomputation counted) against the GPU's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VOCAB = 50277  # GPT-NeoX vocabulary of the public state-spaces checkpoints
PROFILED_STEPS = 2
# Kernel-name patterns -> the categories of the step profile, first match wins.
KERNEL_CATEGORIES = (
    ("selective scan / SSD", ("selective_scan", "ssd", "chunk_scan", "chunk_state", "state_passing", "bmm_chunk",
                              "chunk_cumsum")),
    ("causal conv1d", ("conv1d", "convolution")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "aten::mm", "aten::bmm", "aten::addmm")),
    ("communication", ("nccl", "all_gather", "reduce_scatter", "allreduce", "all_reduce")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("norm", ("norm",)),
    ("loss / softmax", ("softmax", "cross_entropy", "nll_loss", "logsumexp")),
    ("copies and casts", ("copy", "cast", "convert", "fill", "cat")),
)


def _category(name: str) -> str:
    lowered = name.lower()
    for category, patterns in KERNEL_CATEGORIES:
        if any(pattern in lowered for pattern in patterns):
            return category
    return "other"


def work_events(events, on_gpu: bool, time_of) -> list:
    """The profiler's events that are work: kernels (ops on a CPU) with time of their own. Annotations
    (`record_function` ranges such as `Optimizer.step#AdamW.step`, FSDP1's `FullyShardedDataParallel.forward`,
    `nccl:_all_gather_base`) also appear with device time, which is that of the kernels inside them,
    counted again; they are left out."""
    import torch

    return [e for e in events
            if not getattr(e, "is_user_annotation", False) and time_of(e) > 0
            and (not on_gpu or e.device_type == torch.autograd.DeviceType.CUDA)]


class StepProfiler:
    """Profiles PROFILED_STEPS steps once `start` steps have completed (after the timed ones, so the
    profiler does not distort the throughput) and writes DIR/LABEL.txt: time per kernel category and
    the top kernels, by device time on a GPU (CPU time on a CPU); on a GPU also the ops that take the
    most CPU time, which show where a step that leaves the GPU idle spends it."""

    def __init__(self, directory: str | None, label: str, start: int, rank: int = 0) -> None:
        self.directory, self.label, self.start, self.rank = directory, label, start, rank
        self.profiler = None
        self.completed = 0
        self.profile_started = 0.0

    @property
    def extra_steps(self) -> int:
        """Steps to run after the timed ones (on every rank: they take part in the collectives)."""
        return PROFILED_STEPS if self.directory else 0

    def after_step(self) -> None:
        import torch

        if not self.directory or self.rank != 0:
            return
        self.completed += 1
        if self.completed == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()
            self.profile_started = time.perf_counter()
        elif self.profiler is not None and self.completed == self.start + PROFILED_STEPS:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - self.profile_started) * 1e3 / PROFILED_STEPS
            self.profiler.stop()
            self._write(wall_ms)
            self.profiler = None

    def _write(self, wall_ms: float, on_gpu: bool | None = None) -> None:
        import torch

        on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
        time_of = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
        averages = self.profiler.key_averages()
        events = work_events(averages, on_gpu, time_of)
        total = sum(time_of(e) for e in events) or 1
        by_category: dict[str, float] = {}
        for event in events:
            by_category[_category(event.key)] = by_category.get(_category(event.key), 0.0) + time_of(event)
        clock = "GPU kernel time" if on_gpu else "CPU time (self, per op)"
        lines = [f"{self.label}: {PROFILED_STEPS} steps, {clock} {total / 1e3 / PROFILED_STEPS:.1f} ms per step "
                 f"(steps of {wall_ms:.1f} ms wall time with the profiler on)", "",
                 "| category | share | ms per step |", "|---|---|---|"]
        for category, micros in sorted(by_category.items(), key=lambda item: -item[1]):
            lines.append(f"| {category} | {100 * micros / total:.1f}% | {micros / 1e3 / PROFILED_STEPS:.1f} |")
        lines += ["", f"| {'kernel' if on_gpu else 'op'} | category | share | calls per step |", "|---|---|---|---|"]
        for event in sorted(events, key=time_of, reverse=True)[:40]:
            lines.append(f"| `{event.key[:90]}` | {_category(event.key)} | {100 * time_of(event) / total:.1f}% "
                         f"| {event.count / PROFILED_STEPS:g} |")
        if on_gpu:
            cpu_time = lambda e: e.self_cpu_time_total  # noqa: E731
            cpu_events = work_events(averages, False, cpu_time)
            lines += ["", f"CPU time (self, per op): {sum(map(cpu_time, cpu_events)) / 1e3 / PROFILED_STEPS:.1f} ms "
                          "per step", "", "| op | ms per step | calls per step |", "|---|---|---|"]
            for event in sorted(cpu_events, key=cpu_time, reverse=True)[:20]:
                lines.append(f"| `{event.key[:90]}` | {cpu_time(event) / 1e3 / PROFILED_STEPS:.2f} "
                             f"| {event.count / PROFILED_STEPS:g} |")
        path = Path(self.directory) / (self.label.replace(" ", "_").replace("/", "-") + ".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        print(f"profile written to {path}", flush=True)


@dataclass(frozen=True)
class Case:
    runner: str
    model: str
    gpus: int
    seq: int
    micro_batch: int
    options: str = ""  # extra pretrain.py flags for the kotomamba runner

    @property
    def label(self) -> str:
        extra = f" {self.options}" if self.options else ""
        return f"{self.runner} {self.model} {self.gpus}gpu seq{self.seq} mb{self.micro_batch}{extra}"


def plan(name: str) -> list[Case]:
    if name == "tiny":  # FSDP1, hence the recipe, needs a GPU
        return [Case(r, "tiny", 1, 64, 2) for r in ("kotomamba", "hf")] + [
            Case("kotomamba", "tiny", 1, 64, 2, "--cross-entropy-chunk-tokens 32")]
    if name == "scan":  # our scan against mamba-ssm's in our loop, beside the recipe, one GPU
        ours, theirs = "--selective-scan kotomamba", "--selective-scan mamba-ssm"
        chunked = "--cross-entropy-chunk-tokens 4096"
        return [
            Case("kotomamba", "2.8b", 1, 2048, 8, f"{chunked} {ours}"),
            Case("kotomamba", "2.8b", 1, 2048, 16, f"{chunked} {ours}"),
            Case("kotomamba", "2.8b", 1, 2048, 8, f"{chunked} {theirs}"),
            Case("kotomamba", "2.8b", 1, 2048, 16, f"{chunked} {theirs}"),
            # ours keeps no pre-gate output for backward (10 GB less at micro batch 8): a larger batch may fit
            Case("kotomamba", "2.8b", 1, 2048, 12, f"{chunked} {ours}"),
            Case("kotomamba", "2.8b", 1, 2048, 12, f"{chunked} {theirs}"),
            Case("recipe", "2.8b", 1, 2048, 8), Case("recipe", "2.8b", 1, 2048, 16),
            Case("kotomamba", "1.4b", 1, 2048, 8, ours), Case("kotomamba", "1.4b", 1, 2048, 8, theirs),
            Case("recipe", "1.4b", 1, 2048, 8),
            Case("kotomamba", "130m", 1, 2048, 16, ours), Case("kotomamba", "130m", 1, 2048, 16, theirs),
            Case("recipe", "130m", 1, 2048, 16),
        ]
    if name == "documents":  # the cost of --reset-state-at-eod (and --eod-mask-loss), ours on our scan
        ours, chunked = "--selective-scan kotomamba", "--cross-entropy-chunk-tokens 4096"
        reset = "--reset-state-at-eod"
        return [
            Case("kotomamba", "130m", 1, 2048, 16, ours), Case("kotomamba", "130m", 1, 2048, 16, f"{ours} {reset}"),
            Case("kotomamba", "1.4b", 1, 2048, 8, ours), Case("kotomamba", "1.4b", 1, 2048, 8, f"{ours} {reset}"),
            Case("kotomamba", "1.4b", 1, 2048, 8, f"{ours} {reset} --eod-mask-loss"),
            Case("kotomamba", "2.8b", 1, 2048, 8, f"{chunked} {ours}"),
            Case("kotomamba", "2.8b", 1, 2048, 8, f"{chunked} {ours} {reset}"),
            Case("kotomamba", "mamba2-2.7b", 1, 2048, 4), Case("kotomamba", "mamba2-2.7b", 1, 2048, 4, reset),
        ]
    if name == "launch":  # launch-bound cases ([16]): fewer, larger FSDP units against one unit per Block;
        # Mamba-2 at micro batch 8 (twice the GPU work per launch), made to fit by the chunked loss and by
        # recomputing a few blocks (the dry run: 78.5 GiB with 4 blocks, 76.6 with 8; measured peaks ran ~8% under)
        chunked = "--cross-entropy-chunk-tokens 4096"
        recompute = f"{chunked} --fsdp-activation-checkpointing --activation-checkpointing-layers"
        return [Case("kotomamba", "130m", 1, 2048, 16), Case("kotomamba", "130m", 1, 2048, 16, "--fsdp-blocks-per-unit 6"),
                Case("kotomamba", "130m", 1, 2048, 16, "--fsdp-blocks-per-unit 24"), Case("recipe", "130m", 1, 2048, 16),
                Case("kotomamba", "mamba2-2.7b", 1, 2048, 4),
                Case("kotomamba", "mamba2-2.7b", 1, 2048, 4, "--fsdp-blocks-per-unit 4"),
                Case("kotomamba", "mamba2-2.7b", 1, 2048, 4, "--fsdp-blocks-per-unit 16"),
                Case("recipe", "mamba2-2.7b", 1, 2048, 4),
                Case("kotomamba", "mamba2-2.7b", 1, 2048, 8, chunked),
                Case("kotomamba", "mamba2-2.7b", 1, 2048, 8, f"{recompute} 4"),
                Case("kotomamba", "mamba2-2.7b", 1, 2048, 8, f"{recompute} 8"),
                Case("recipe", "mamba2-2.7b", 1, 2048, 8)]
    if name == "memory":  # the dry run's peak memory estimate against the measured peak (tests/gpu)
        chunked = "--cross-entropy-chunk-tokens 4096"
        return [Case("kotomamba", "130m", 1, 2048, 16), Case("kotomamba", "370m", 1, 2048, 8, chunked),
                Case("kotomamba", "790m", 1, 2048, 8), Case("kotomamba", "mamba2-370m", 1, 2048, 8, chunked)]
    if name == "quick":
        return [
            Case("kotomamba", "2.8b", 1, 2048, 4),
            Case("recipe", "2.8b", 1, 2048, 4),
        ]
    cases = []
    for model, mbs in (("130m", 16), ("1.4b", 8), ("2.8b", 4)):
        cases += [Case("kotomamba", model, 1, 2048, mbs), Case("recipe", model, 1, 2048, mbs),
                  Case("hf", model, 1, 2048, mbs)]
    cases += [
        Case("kotomamba", "2.8b", 1, 2048, 8),
        Case("kotomamba", "2.8b", 1, 2048, 8, "--cross-entropy-chunk-tokens 4096"),
        Case("kotomamba", "2.8b", 1, 2048, 16, "--cross-entropy-chunk-tokens 4096"),
        Case("kotomamba", "2.8b", 1, 2048, 16, "--cross-entropy-chunk-tokens 4096 --activation-checkpointing-layers 16"),
        Case("recipe", "2.8b", 1, 2048, 8), Case("recipe", "2.8b", 1, 2048, 16),
        Case("kotomamba", "2.8b", 2, 2048, 4), Case("kotomamba", "2.8b", 2, 2048, 8),
        Case("kotomamba", "2.8b", 2, 2048, 16, "--cross-entropy-chunk-tokens 4096"),
        Case("recipe", "2.8b", 2, 2048, 4), Case("recipe", "2.8b", 2, 2048, 8), Case("recipe", "2.8b", 2, 2048, 16),
        Case("kotomamba", "mamba2-2.7b", 1, 2048, 4), Case("recipe", "mamba2-2.7b", 1, 2048, 4),
        Case("kotomamba", "mamba2-2.7b", 1, 2048, 8), Case("recipe", "mamba2-2.7b", 1, 2048, 8),
        # Parameters kept gathered from forward to backward: no backward all-gathers, fewer FSDP hooks.
        Case("kotomamba", "mamba2-2.7b", 1, 2048, 4, "--sharding-strategy SHARD_GRAD_OP"),
        Case("kotomamba", "2.8b", 2, 2048, 8, "--sharding-strategy SHARD_GRAD_OP"),
        Case("kotomamba", "1.4b", 1, 8192, 1), Case("kotomamba", "1.4b", 1, 16384, 1),
        Case("kotomamba", "1.4b", 1, 16384, 1, "--cross-entropy-chunk-tokens 4096"),
    ]
    return cases


# ------------------------------------------------------------------------------------------------
# Workers: one measurement each, printing a RESULT line on rank 0.


def model_config(name: str):
    from kotomamba.model import load_model_config

    if name == "tiny":
        return load_model_config("130m", VOCAB, {"d_model": 64, "n_layer": 2})
    return load_model_config(name, VOCAB)


def random_dataset(directory: Path, tokens: int) -> str:
    """A Megatron .bin/.idx of random documents of 100-4,000 tokens, each ending with the NullTokenizer's
    EOD (id VOCAB), as tokenized text does (written once per benchmark run)."""
    import numpy as np

    from megatron_lm.indexed_dataset import IndexedDatasetBuilder, data_file_path, index_file_path

    prefix = str(directory / f"random_documents_{tokens}")
    if not Path(index_file_path(prefix)).exists():
        rng = np.random.default_rng(0)
        with IndexedDatasetBuilder(data_file_path(prefix), dtype=np.uint16) as builder:
            written = 0
            while written < tokens:
                length = int(rng.integers(100, 4000))
                builder.add_item(np.append(rng.integers(0, VOCAB, length - 1, dtype=np.uint16), np.uint16(VOCAB)))
                builder.end_document()
                written += length
            builder.finalize(index_file_path(prefix))
    return prefix


def run_kotomamba(case: Case, steps: int, warmup: int, data_prefix: str, config_path: str,
                  profiler: StepProfiler) -> dict:
    import torch

    from kotomamba.config import parse_run_config
    from kotomamba.distributed import init_distributed, shutdown_distributed
    from kotomamba.train import run_training

    ctx = init_distributed()
    device_precision = ["--bf16"] if ctx.device.type == "cuda" else ["--fp32"]
    argv = [
        "--model", config_path, "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
        "--data-path", data_prefix, "--split", "100,0,0", "--seq-length", str(case.seq),
        "--micro-batch-size", str(case.micro_batch), "--global-batch-size", str(case.micro_batch * ctx.world_size),
        "--train-iters", str(warmup + steps + profiler.extra_steps), "--lr", "1e-4", "--eval-iters", "0", "--num-workers", "2",
        "--log-interval", str(warmup + steps), *device_precision, *case.options.split(),
    ]
    times: list[float] = []

    def on_step(state, result) -> None:
        times.append(time.perf_counter())
        profiler.after_step()

    completed = False
    try:
        run_training(parse_run_config(argv, ctx.world_size), ctx, on_step)
        peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.device.type == "cuda" else 0.0
        completed = True
    finally:
        shutdown_distributed(completed)
    return {"step_s": (times[warmup + steps - 1] - times[warmup - 1]) / steps, "peak_gib": peak, "world": ctx.world_size,
            "rank": ctx.rank, "estimate_gib": dry_run_estimate(argv)}


def dry_run_estimate(argv: list[str]) -> float:
    """What `pretrain.py --dry-run` says the same run's peak memory per GPU is, GiB (the launcher's layout)."""
    from kotomamba import dry_run
    from kotomamba.arguments import parse_args

    return dry_run.plan(parse_args([*argv, "--dry-run"])).memory.total / 2**30


def run_recipe(case: Case, steps: int, warmup: int, profiler: StepProfiler) -> dict:
    import functools

    import torch
    import torch.nn.functional as F
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from kotomamba.distributed import init_distributed, shutdown_distributed
    from kotomamba.model import build_model

    ctx = init_distributed()
    from mamba_ssm.modules.block import Block

    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    model = build_model(model_config(case.model), device=ctx.device, seed=0).to(dtype)
    model = FullyShardedDataParallel(
        model,
        auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={Block}),
        mixed_precision=MixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=dtype),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        device_id=ctx.device if ctx.device.type == "cuda" else None,
        use_orig_params=False,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    times = _plain_loop(model, optimizer, case, steps, warmup, ctx.device, profiler,
                        lambda logits, labels: F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1)))
    peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.device.type == "cuda" else 0.0
    shutdown_distributed(completed=True)
    return {"step_s": times, "peak_gib": peak, "world": ctx.world_size, "rank": ctx.rank}


def run_hf(case: Case, steps: int, warmup: int, profiler: StepProfiler) -> dict:
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    config = model_config(case.model)
    if config.ssm_cfg.get("layer", "Mamba1") != "Mamba1":
        raise SystemExit("the hf runner covers Mamba-1 models only")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf_config = MambaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layer,
        state_size=config.ssm_cfg.get("d_state", 16), expand=config.ssm_cfg.get("expand", 2),
        conv_kernel=config.ssm_cfg.get("d_conv", 4), residual_in_fp32=True, tie_word_embeddings=True,
        pad_vocab_size_multiple=config.pad_vocab_size_multiple, use_cache=False,
    )
    torch.manual_seed(0)
    model = MambaForCausalLM(hf_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    times = _plain_loop(model, optimizer, case, steps, warmup, device, profiler, None, autocast)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {"step_s": times, "peak_gib": peak, "world": 1, "rank": 0}


def _plain_loop(model, optimizer, case: Case, steps: int, warmup: int, device, profiler: StepProfiler, loss_fn,
                autocast=None) -> float:
    """Mean seconds per optimizer step (one micro-batch per step) over `steps` steps after `warmup`."""
    import contextlib

    import torch

    generator = torch.Generator().manual_seed(0)
    marks: list[float] = []  # when the warm-up steps and the timed steps had completed

    def mark() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    for step in range(warmup + steps + profiler.extra_steps):
        tokens = torch.randint(0, VOCAB, (case.micro_batch, case.seq + 1), generator=generator).to(device)
        with autocast or contextlib.nullcontext():
            if loss_fn is None:  # Hugging Face computes its own shifted loss
                loss = model(tokens[:, :-1], labels=tokens[:, :-1]).loss
            else:
                loss = loss_fn(model(tokens[:, :-1]).logits, tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the step is complete when its loss is known, as in every training loop
        if step + 1 in (warmup, warmup + steps):
            mark()
        profiler.after_step()
    return (marks[1] - marks[0]) / steps


def worker(args: argparse.Namespace) -> None:
    case = Case(**json.loads(args.worker))
    from kotomamba.kernels import select_kernel_backend

    import torch

    # The peers run mamba-ssm's kernels as they ship; ours the scan its options ask for (as pretrain.py would).
    scan, documents = "mamba-ssm", False
    if case.runner == "kotomamba":
        options = case.options.split()
        scan = options[options.index("--selective-scan") + 1] if "--selective-scan" in options else "auto"
        documents = "--reset-state-at-eod" in options
    select_kernel_backend("cuda" if torch.cuda.is_available() else "cpu", selective_scan=scan, documents=documents)
    profiler = StepProfiler(args.profile, case.label, args.warmup + args.steps, int(os.environ.get("RANK", "0")))
    if case.runner == "kotomamba":
        config = model_config(case.model)
        config_path = Path(args.workdir) / f"{case.model}.json"
        config_path.write_text(json.dumps({**asdict(config), "vocab_size": VOCAB}))
        result = run_kotomamba(case, args.steps, args.warmup, args.data_prefix, str(config_path), profiler)
    elif case.runner == "recipe":
        result = run_recipe(case, args.steps, args.warmup, profiler)
    else:
        result = run_hf(case, args.steps, args.warmup, profiler)
    if result["rank"] == 0:
        print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# Driver


def measure(case: Case, args: argparse.Namespace, data_prefix: str) -> dict:
    worker_args = ["--worker", json.dumps(asdict(case)), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--data-prefix", data_prefix, "--workdir", args.workdir,
                   *(["--profile", args.profile] if args.profile else [])]
    script = str(Path(__file__).resolve())
    if case.gpus > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={case.gpus}",
                   script, *worker_args]
    else:
        command = [sys.executable, script, *worker_args]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.case_timeout)
        output = completed.stdout + completed.stderr
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        return {"status": f"timeout after {args.case_timeout}s", "wall_s": time.perf_counter() - started}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result.update(status="ok", wall_s=time.perf_counter() - started)
            return result
    status = "out of memory" if "OutOfMemoryError" in output or "out of memory" in output else "failed"
    Path(args.workdir, f"failed_{abs(hash(case.label))}.log").write_text(output[-20000:])
    return {"status": status, "error_tail": output[-1500:], "wall_s": time.perf_counter() - started}


def summarize(rows: list[tuple[int, Case, dict]], gpu_name: str) -> str:
    """The table of (run, case, result) rows. Ratios and scaling compare rows of the same run only:
    separate runs may land on different machines of the same kind."""
    from kotomamba.flops import flops_per_token, peak_flops

    from benchmarks.report import markdown_table

    several_runs = len({run for run, _, _ in rows}) > 1
    peak = peak_flops(gpu_name, "bfloat16")
    table = []
    ours_best = {}  # (run, model, GPUs, seq) -> our best tokens/s per GPU over micro batches and options
    ours_by_shape = {}  # (run, model, seq, micro batch, options) -> {GPUs: tokens/s per GPU}
    for run, case, result in rows:
        row = [run] if several_runs else []
        row += [case.runner, case.model, case.gpus, case.seq, case.micro_batch, case.options or "-"]
        if result.get("status") != "ok":
            table.append((run, case, None, row + [result.get("status"), "", "", "", "", ""]))
            continue
        tokens_per_gpu = case.micro_batch * case.seq / result["step_s"]
        flops = flops_per_token(model_config(case.model), case.seq)
        mfu = f"{100 * tokens_per_gpu * flops / peak:.1f}%" if peak else "n/a"
        if case.runner == "kotomamba":
            ours_by_shape.setdefault((run, case.model, case.seq, case.micro_batch, case.options), {})[case.gpus] = tokens_per_gpu
            key = (run, case.model, case.gpus, case.seq)
            ours_best[key] = max(tokens_per_gpu, ours_best.get(key, 0.0))
        estimate = f"{result['estimate_gib']:.1f}" if "estimate_gib" in result else ""
        table.append((run, case, tokens_per_gpu, row + [f"{tokens_per_gpu:,.0f}", mfu, f"{result['peak_gib']:.1f}",
                                                        estimate, f"{result['step_s']:.3f}", ""]))
    for run, case, tokens_per_gpu, row in table:
        ours = ours_best.get((run, case.model, case.gpus, case.seq))
        if case.runner != "kotomamba" and ours and tokens_per_gpu:
            row[-1] = f"{ours / tokens_per_gpu:.2f}×"
    header = (["run"] if several_runs else []) + [
        "runner", "model", "GPUs", "seq", "micro batch", "options", "tokens/s per GPU", "MFU", "peak GiB", "dry-run GiB",
        "s/step", "ours (best mb) ÷ this" + (" (same run)" if several_runs else "")]
    lines = [markdown_table(header, [row for _, _, _, row in table])]
    for (run, model, seq, micro_batch, options), per_gpu in ours_by_shape.items():
        if 1 in per_gpu and 2 in per_gpu:
            where = f"run {run}, " if several_runs else ""
            lines.append(f"\nOurs, 1→2 GPU scaling, {where}{model} seq {seq} micro batch {micro_batch} {options}".rstrip()
                         + f": {2 * per_gpu[2] / per_gpu[1]:.2f}× the total throughput")
    return "\n".join(lines)


def measured_environment() -> dict[str, str]:
    """The facts printed above the table, read on the machine that measures."""
    from benchmarks.report import environment

    from importlib import metadata

    facts = environment()
    for package in ("mamba-ssm", "causal-conv1d", "transformers"):
        try:
            facts[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            facts[package] = "not installed"
    return facts


def read_results(path: str) -> list[dict]:
    """The records of a --results file (one run); ValueError naming the file, and line, it cannot read."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise ValueError(f"{path}: {error.strerror or error}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not a result record ({error.msg})") from None
            if not (isinstance(record, dict) and isinstance(record.get("case"), dict) and "result" in record):
                raise ValueError(f"{path}, line {number}: not a result record (no case and result)")
            records.append(record)
    return records


def table_rows(runs: list[list[dict]]) -> list[tuple[int, Case, dict]]:
    """(run, case, result) rows of records grouped by run, runs numbered from 1."""
    return [(run, Case(**r["case"]), r["result"]) for run, records in enumerate(runs, start=1) for r in records]


# The docs/benchmarks.md section of the plans that have their own (with --report-from, give the same --plan).
SECTIONS = {"documents": "train_throughput_documents", "launch": "train_throughput_launch"}


def write_report(runs: list[list[dict]], section: str = "train_throughput") -> None:
    """docs/benchmarks.md's section from the records of one or more runs (a live run is one); the
    documents plan has a section of its own."""
    from benchmarks.report import write_section

    facts = runs[-1][-1].get("environment", {})
    gpu_name = facts.get("gpu", "cpu").split("x ", 1)[-1]
    body = summarize(table_rows(runs), gpu_name)
    print(body)
    commands = [" ; ".join(dict.fromkeys(r.get("command", "") for r in records)) for records in runs]
    command = commands[0] if len(runs) == 1 else " ; ".join(f"run {run}: {c}" for run, c in enumerate(commands, start=1))
    title = {"train_throughput": "Training throughput",
             "train_throughput_documents": "Training throughput with packed documents kept apart",
             "train_throughput_launch": "Training throughput of launch-bound cases: FSDP units of several Blocks"}[section]
    write_section(section, f"{title} ({gpu_name})", __doc__.split("\n\n", 2)[2] + "\n" + body,
                  facts=facts, command=command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default="standard", choices=("tiny", "quick", "scan", "documents", "launch", "memory", "standard"))
    parser.add_argument("--only", default=None, help="Run only cases whose label contains this text.")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--case-timeout", type=int, default=300)
    parser.add_argument("--results", default=None, help="Append each case's result to this JSONL file.")
    parser.add_argument("--no-report", action="store_true", help="Do not write docs/benchmarks.md.")
    parser.add_argument("--report-from", nargs="+", default=None, metavar="RESULTS",
                        help="Write docs/benchmarks.md from --results files of earlier runs, one file per run (ratios "
                             "and scaling compare rows of the same run); measure nothing.")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help=f"After the timed steps, profile {PROFILED_STEPS} more and write DIR/CASE.txt: time per "
                             "kernel category and the top kernels.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data-prefix", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error(f"--warmup {args.warmup} --steps {args.steps}: both must be at least 1 (the timed steps "
                     "start from the end of a completed warm-up step)")
    if args.profile:
        args.profile = str(Path(args.profile).resolve())
    if args.worker:
        worker(args)
        return
    if args.report_from:
        try:
            runs = [records for records in map(read_results, args.report_from) if records]
        except ValueError as error:
            parser.error(f"--report-from {error}")
        if not runs:
            parser.error(f"--report-from {' '.join(args.report_from)}: no results in these files")
        write_report(runs, SECTIONS.get(args.plan, "train_throughput"))
        return

    import torch

    from benchmarks.report import command_line

    available = torch.cuda.device_count() if torch.cuda.is_available() else 2
    cases = [c for c in plan(args.plan) if c.gpus <= available and (args.only is None or args.only in c.label)]
    if not cases:
        parser.error(f"no case of --plan {args.plan} matches --only {args.only!r} on {available} GPU(s)")
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="kotomamba-bench-")
    longest = max(c.seq for c in cases)
    needed = max((args.warmup + args.steps + PROFILED_STEPS) * c.micro_batch * c.gpus * (c.seq + 1) for c in cases)
    data_prefix = random_dataset(Path(args.workdir), max(needed * 2, longest * 64))
    facts, command = measured_environment(), command_line()
    records = []
    for case in cases:
        result = measure(case, args, data_prefix)
        record = {"case": asdict(case), "result": result, "environment": facts, "command": command}
        records.append(record)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items() if k != "error_tail"}
        print(f"{case.label}: {shown}", flush=True)
        if result.get("status") not in ("ok", "out of memory"):
            print(result.get("error_tail", ""), flush=True)
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps(record) + "\n")
    if args.no_report:
        print(summarize(table_rows([records]), facts.get("gpu", "cpu")))
    else:
        write_report([records], SECTIONS.get(args.plan, "train_throughput"))


if __name__ == "__main__":
    main()
