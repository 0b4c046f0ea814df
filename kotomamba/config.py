"""The run's configuration: frozen, typed, built once from the parsed flags and the world size.

``build_run_config(args, data_parallel_size)`` turns the validated flags of ``pretrain.py`` (see
:mod:`kotomamba.arguments`) into a :class:`RunConfig`, computing every value that depends on others
or on the world size (global batch, accumulation steps, the iteration schedule) here and nowhere
else. Its sections follow the groups of ``pretrain.py --help``; a flag's field has the flag's
``dest`` name (``--micro-batch-size`` is ``config.batch.micro_batch_size``) and its documentation is
the flag's help text, so each is documented once, where the flag is defined. Fields that no flag sets
are documented below. Each component of a run takes only the sections it reads;
``config_dict(config)`` is the resolved configuration a checkpoint saves (``config.yaml``).
Nothing here imports torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Any

from kotomamba.arguments import ArgumentError, parse_args
from kotomamba.data_schedule import Stage, load_data_schedule


@dataclass(frozen=True)
class ModelSection:
    """The "model" flags. ``model`` is a preset name or a config path (never None once resolved)."""

    model: str | None
    base_model: str | None
    from_scratch: bool
    vocab_size: int | None


@dataclass(frozen=True)
class TokenizerSection:
    """The "tokenizer" flags; ``tokenizer_type`` is inferred from ``--tokenizer-model`` when not given."""

    tokenizer_type: str
    tokenizer_model: str | None


@dataclass(frozen=True)
class DataSection:
    """The "data" flags. Dataset lists are tuples of the flag's words (weights and prefixes)."""

    data_path: tuple[str, ...] | None
    data_schedule: str | None
    # The stages of --data-schedule, their lengths in samples (kotomamba.data_schedule); None without one.
    stages: tuple[Stage, ...] | None
    split: str | None
    train_data_path: tuple[str, ...] | None
    valid_data_path: tuple[str, ...] | None
    test_data_path: tuple[str, ...] | None
    data_cache_path: str | None
    data_allow_extra_bin_bytes: bool
    reset_state_at_eod: bool
    eod_mask_loss: bool
    num_workers: int
    seq_length: int
    seed: int

    @property
    def flags(self) -> str:
        """The data flags as given, for messages (``--data-path a b``)."""
        return " ".join(f"--{name.replace('_', '-')} {' '.join(values)}" for name, values in (
            ("data_path", self.data_path), ("train_data_path", self.train_data_path),
            ("valid_data_path", self.valid_data_path), ("test_data_path", self.test_data_path)) if values)


@dataclass(frozen=True)
class BatchSection:
    """The "batch size and training length" flags, resolved for one world size."""

    micro_batch_size: int
    # Samples per optimizer step over all ranks: --global-batch-size, or micro batch x
    # --gradient-accumulation-steps (default 1) x data_parallel_size (Megatron's rule).
    global_batch_size: int
    # Micro-batches each rank accumulates per optimizer step: global batch / (micro batch x ranks).
    gradient_accumulation_steps: int
    # Ranks the global batch is split over (every rank: FSDP shards, it never splits a model).
    data_parallel_size: int
    # Iterations of the run: --train-iters, --train-samples // global batch, --train-tokens over the tokens
    # of an iteration or the --data-schedule's samples over the global batch, rounded up. None only in a
    # dry run without a length.
    train_iters: int | None
    train_samples: int | None
    train_tokens: int | None


@dataclass(frozen=True)
class OptimizerSection:
    """The "optimizer and learning-rate schedule" flags. The ``lr_*_iters`` fields are resolved: from
    their ``*_samples`` flags with ``--train-samples``, decay defaulting to the run's length, warmup to
    ``--lr-warmup-fraction`` of the decay (else 0)."""

    lr: float | None
    min_lr: float
    lr_decay_style: str
    lr_decay_iters: int | None
    lr_decay_samples: int | None
    lr_warmup_iters: int | None
    lr_warmup_fraction: float | None
    lr_warmup_samples: int | None
    lr_warmup_init: float
    lr_wsd_decay_style: str
    lr_wsd_decay_iters: int | None
    lr_wsd_decay_samples: int | None
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    weight_decay: float
    grad_clip_norm: float


@dataclass(frozen=True)
class PrecisionSection:
    """The "precision" flags; ``precision`` is what --bf16/--fp16/--fp32 chose ("auto" if none)."""

    precision: str
    param_dtype: str | None
    reduce_dtype: str | None
    initial_loss_scale: float
    min_loss_scale: float
    loss_scale_window: int
    hysteresis: int


@dataclass(frozen=True)
class KernelSection:
    """The "kernels" flags."""

    selective_scan: str


@dataclass(frozen=True)
class ParallelSection:
    """The "FSDP" flags (sharding, activation checkpointing, offload, launcher)."""

    sharding_strategy: str
    fsdp_activation_checkpointing: bool
    activation_checkpointing_layers: int | None
    cross_entropy_chunk_tokens: int
    fsdp_blocks_per_unit: int
    fsdp_cpu_offload: bool
    low_cpu_fsdp: bool
    use_mpi: bool

    def checkpointed_block_count(self, n_layer: int) -> int:
        """How many of the model's `n_layer` blocks (the first ones) recompute their activations in backward."""
        if not self.fsdp_activation_checkpointing:
            return 0
        count = self.activation_checkpointing_layers
        if count is None:
            return n_layer
        _check(count <= n_layer, f"--activation-checkpointing-layers {count}: the model has only {n_layer} Mamba blocks")
        return count


@dataclass(frozen=True)
class LoggingSection:
    """The "evaluation and logging" flags; ``skip_batch`` holds sorted inclusive (first, last) pairs."""

    eval_interval: int
    eval_iters: int
    log_interval: int
    wandb_entity: str | None
    wandb_project: str | None
    wandb_name: str | None
    tensorboard_dir: str | None
    optimizer_stats_interval: int
    skip_batch: tuple[tuple[int, int], ...] | None
    log_loss_per_dataset: bool
    max_consecutive_skips: int


@dataclass(frozen=True)
class CheckpointSection:
    """The "checkpointing" flags."""

    save: str | None
    load: str | None
    save_interval: int
    checkpoint_type: str
    async_save: bool
    keep_last_k: int | None
    exit_interval: int | None
    exit_duration_in_mins: float | None
    override_data_on_resume: bool


@dataclass(frozen=True)
class MiscSection:
    """The "miscellaneous" flags and ``--config`` (the YAML file the flags were merged from, if any)."""

    config: str | None
    dry_run: bool
    dry_run_world_size: int | None
    dry_run_gpus_per_node: int | None
    peak_tflops: float | None


@dataclass(frozen=True)
class RunConfig:
    """Everything a run was asked to do, resolved; one section per group of ``pretrain.py --help``."""

    model: ModelSection
    tokenizer: TokenizerSection
    data: DataSection
    batch: BatchSection
    optimizer: OptimizerSection
    precision: PrecisionSection
    kernels: KernelSection
    parallel: ParallelSection
    logging: LoggingSection
    checkpoint: CheckpointSection
    misc: MiscSection


SECTIONS: dict[str, type] = typing.get_type_hints(RunConfig)  # section name -> its dataclass


def gradient_accumulation_steps(global_batch_size: int, micro_batch_size: int, data_parallel_size: int) -> int:
    """Micro-batches each rank accumulates per optimizer step; ArgumentError if they do not divide."""
    for name, value in (("--global-batch-size", global_batch_size), ("--micro-batch-size", micro_batch_size),
                        ("data-parallel size", data_parallel_size)):
        if value < 1:
            raise ArgumentError(f"{name} must be at least 1, got {value}")
    per_step = micro_batch_size * data_parallel_size
    if global_batch_size % per_step:
        lower = global_batch_size // per_step * per_step
        nearest = f"{lower} or {lower + per_step}" if lower else f"{per_step}"
        raise ArgumentError(
            f"--global-batch-size {global_batch_size} is not a multiple of --micro-batch-size {micro_batch_size} "
            f"× data-parallel size {data_parallel_size} = {per_step} ({global_batch_size} = "
            f"{global_batch_size // per_step} × {per_step} + {global_batch_size % per_step}); use e.g. {nearest}"
        )
    return global_batch_size // per_step


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ArgumentError(message)


def _schedule(flags: argparse.Namespace, global_batch: int, stages: tuple[Stage, ...] | None) -> dict[str, int | None]:
    """train_iters and the lr_*_iters fields, from iterations, samples, tokens or the data schedule;
    ArgumentError when they conflict."""
    values = {name: getattr(flags, name) for name in
              ("train_iters", "lr_decay_iters", "lr_warmup_iters", "lr_wsd_decay_iters")}
    if stages is not None:
        values["train_iters"] = -(-sum(stage.samples for stage in stages) // global_batch)
    if flags.train_tokens is not None:
        values["train_iters"] = -(-flags.train_tokens // (global_batch * flags.seq_length))
    if values["train_iters"] is None and flags.train_samples is None:
        return values  # a dry run without a training length
    if flags.train_samples is not None:
        _check(flags.train_samples >= global_batch,
               f"--train-samples {flags.train_samples} is less than one global batch ({global_batch})")
        values["train_iters"] = flags.train_samples // global_batch
        decay_samples = flags.lr_decay_samples if flags.lr_decay_samples is not None else flags.train_samples
        values["lr_decay_iters"] = max(1, decay_samples // global_batch)
        if flags.lr_warmup_samples is not None:
            values["lr_warmup_iters"] = flags.lr_warmup_samples // global_batch
        if flags.lr_wsd_decay_samples is not None:
            values["lr_wsd_decay_iters"] = max(1, flags.lr_wsd_decay_samples // global_batch)
    elif values["lr_decay_iters"] is None:
        values["lr_decay_iters"] = values["train_iters"]
    decay, wsd = values["lr_decay_iters"], values["lr_wsd_decay_iters"]
    if flags.lr_warmup_fraction is not None:
        values["lr_warmup_iters"] = int(flags.lr_warmup_fraction * decay)
    elif values["lr_warmup_iters"] is None:
        values["lr_warmup_iters"] = 0
    warmup = values["lr_warmup_iters"]
    _check(warmup <= decay,
           f"warmup ({warmup} iterations) is longer than the decay ({decay} iterations, --lr-decay-iters)")
    if flags.lr_decay_style == "WSD":
        _check(wsd is not None,
               "--lr-decay-style WSD needs --lr-wsd-decay-iters (or --lr-wsd-decay-samples with --train-samples)")
        _check(decay - wsd >= warmup,
               f"--lr-wsd-decay-iters {wsd} starts the anneal at iteration {decay - wsd}, before the warmup ends "
               f"({warmup})")
    return values


def _frozen(value: Any) -> Any:
    return tuple(_frozen(item) for item in value) if isinstance(value, list) else value


def build_run_config(flags: argparse.Namespace, data_parallel_size: int) -> RunConfig:
    """The run's configuration for `data_parallel_size` ranks, from `flags` (``arguments.parse_args``'s
    result, left unchanged); raises ArgumentError naming the flags when the batch or schedule conflict."""
    explicit_accumulation = flags.gradient_accumulation_steps
    global_batch = flags.global_batch_size
    if global_batch is None:
        global_batch = flags.micro_batch_size * (explicit_accumulation or 1) * data_parallel_size
    accumulation = gradient_accumulation_steps(global_batch, flags.micro_batch_size, data_parallel_size)
    values = {name: _frozen(value) for name, value in vars(flags).items()}
    stages = (load_data_schedule(flags.data_schedule, flags.seq_length, global_batch)
              if flags.data_schedule is not None else None)
    values.update(_schedule(flags, global_batch, stages), global_batch_size=global_batch, stages=stages,
                  gradient_accumulation_steps=accumulation, data_parallel_size=data_parallel_size)
    sections = {}
    for section_name, section_type in SECTIONS.items():
        names = [field.name for field in fields(section_type)]
        sections[section_name] = section_type(**{name: values[name] for name in names})
    return RunConfig(**sections)


def parse_run_config(argv: list[str] | None, data_parallel_size: int) -> RunConfig:
    """``build_run_config(parse_args(argv), data_parallel_size)``."""
    return build_run_config(parse_args(argv), data_parallel_size)


def config_dict(config: RunConfig) -> dict[str, dict[str, Any]]:
    """The resolved configuration as plain YAML/JSON values, one mapping per section (saved with every
    checkpoint as config.yaml, printed at the start of a run)."""
    def plain(value: Any) -> Any:
        return [plain(item) for item in value] if isinstance(value, tuple) else value

    return {section: {name: plain(value) for name, value in values.items()}
            for section, values in dataclasses.asdict(config).items()}

