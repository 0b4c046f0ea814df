"""``pretrain.py --dry-run``: what a run will do and about how much it needs, without running it.

Usable on a login node: no GPU, no process group, no data files. The model is mamba-ssm's own
``MambaLMHeadModel`` built on the meta device (no memory is allocated), so the parameter count is
exact. Memory figures are estimates; the report states what they count and what they leave out.

The world size comes from the launcher when there is one (torchrun: WORLD_SIZE / LOCAL_WORLD_SIZE;
mpirun: OMPI_COMM_WORLD_SIZE / OMPI_COMM_WORLD_LOCAL_SIZE), else from ``--dry-run-world-size`` and
``--dry-run-gpus-per-node``, else 1. Under a launcher only rank 0 prints.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kotomamba import arguments
from kotomamba.arguments import ArgumentError
from kotomamba.checkpoint_layout import ADAM_BYTES, CHECKPOINT_BYTES, MASTER_BYTES, saves_ahead
from kotomamba.config import RunConfig, build_run_config, config_dict
from kotomamba.errors import KotomambaError
from kotomamba.launcher import launcher_rank
from kotomamba.presets import MODEL_PRESETS

if TYPE_CHECKING:  # both import torch or mamba-ssm; the functions import them when called
    from mamba_ssm.models.config_mamba import MambaConfig

    from kotomamba.precision import PrecisionPolicy

# The GPT-NeoX-20B tokenizer's size, the vocabulary of the state-spaces/mamba-* checkpoints.
DEFAULT_VOCAB_SIZE = 50277

# Bytes per parameter of the state FSDP shards: every precision preset keeps fp32 master weights
# (kotomamba.precision), their gradients in fp32, and AdamW's two fp32 moments.
GRADIENT_BYTES = 4
STATE_BYTES = MASTER_BYTES + GRADIENT_BYTES + ADAM_BYTES

# mamba-ssm's selective-scan kernel keeps fp32 chunk states for backward, one chunk per 2048 tokens
# (csrc/selective_scan/selective_scan.cpp: n_chunks = (seqlen + 2048 - 1) / 2048).
SCAN_CHUNK_TOKENS = 2048

# (launcher, world-size variable, processes-per-node variable); mpirun is looked at first under --use-mpi.
_LAUNCHER_VARIABLES = (
    ("torchrun", "WORLD_SIZE", "LOCAL_WORLD_SIZE"),
    ("mpirun", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"),
)


class DryRunError(KotomambaError, ValueError):
    """The configuration cannot run as given; the message names the flag or variable."""


@dataclass(frozen=True)
class WorldLayout:
    world_size: int
    gpus_per_node: int
    source: str  # where the numbers came from, for the report

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.gpus_per_node


@dataclass(frozen=True)
class ModelSummary:
    description: str
    vocab_size: int
    vocab_note: str
    embedding_rows: int
    parameters: int
    embedding_parameters: int
    root_parameters: int  # FSDP's root unit: embedding (tied lm_head) and final norm
    largest_block_parameters: int
    fp32_sensitive_parameters: int  # A_log, D, dt_bias: kept whole in fp32 under low-precision compute
    flops_per_token: float  # training (forward + backward), kotomamba.flops conventions
    activation_bytes: int
    activation_note: str


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU; ``host_state`` is what --fsdp-cpu-offload moves to CPU memory instead.

    ``sharded_state`` includes the fp32 gradient shards (``sharded_gradients``). They are not there at the
    same time as the activations: backward frees the activations layer by layer while FSDP reduce-scatters
    each layer's gradients into their shards, so the peak holds the larger of the two (measured on one
    H100: this agrees with torch's peak allocation within 10%, where adding both overestimated by 20%)."""

    sharded_state: int
    replicated_state: int
    gathered: int
    activations: int
    host_state: int
    sharded_gradients: int

    @property
    def total(self) -> int:
        persistent = self.sharded_state - self.sharded_gradients  # fp32 weights and AdamW moments
        return persistent + self.replicated_state + self.gathered + max(self.activations, self.sharded_gradients)


@dataclass
class Plan:
    """Everything the report shows, as numbers (the tests check these)."""

    config: RunConfig  # resolved for the assumed world layout
    layout: WorldLayout
    accumulation: int
    tokens_per_iteration: int
    total_tokens: int | None
    model: ModelSummary
    precision: PrecisionPolicy
    shard_group_size: int
    memory: MemoryEstimate
    checkpoint_bytes: int
    save_free_bytes: int | None  # free space now where --save is (its nearest existing directory), if given
    data_lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# World layout


def _int_variable(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        number = int(value)
    except ValueError:
        raise DryRunError(f"environment variable {name}={value!r} is not an integer") from None
    if number < 1:
        raise DryRunError(f"environment variable {name}={value} must be at least 1")
    return number


def _default_gpus_per_node(world_size: int) -> int:
    # One node when it fits on one 8-GPU node, else the largest usual node size that divides the world.
    if world_size <= 8:
        return world_size
    return math.gcd(world_size, 8)


def world_layout(args: argparse.Namespace, environ: Mapping[str, str] | None = None,
                 warnings: list[str] | None = None) -> WorldLayout:
    """Processes and processes per node: the launcher's environment first, then the dry-run flags."""
    environ = os.environ if environ is None else environ
    launchers = _LAUNCHER_VARIABLES[::-1] if args.use_mpi else _LAUNCHER_VARIABLES
    flags_given = args.dry_run_world_size is not None or args.dry_run_gpus_per_node is not None
    for launcher, world_name, local_name in launchers:
        if world_name not in environ:
            continue
        world = _int_variable(environ, world_name)
        local = _int_variable(environ, local_name) if local_name in environ else world
        source = f"{launcher} environment ({world_name}={world}, {local_name}={local})"
        if flags_given and warnings is not None:
            warnings.append(f"--dry-run-world-size/--dry-run-gpus-per-node are ignored: {source} takes precedence")
        return _checked_layout(world, local, source, world_name, local_name)

    world = args.dry_run_world_size
    local = args.dry_run_gpus_per_node
    if world is None:
        world = 1 if local is None else local
    if local is None:
        local = _default_gpus_per_node(world)
        source = ("default: one process" if args.dry_run_world_size is None
                  else f"--dry-run-world-size {world}, {local} per node assumed (set --dry-run-gpus-per-node)")
    else:
        source = f"--dry-run-world-size {world} --dry-run-gpus-per-node {local}"
    return _checked_layout(world, local, source, "--dry-run-world-size", "--dry-run-gpus-per-node")


def _checked_layout(world: int, local: int, source: str, world_name: str, local_name: str) -> WorldLayout:
    if local > world:
        raise DryRunError(f"{local_name} {local} is more than {world_name} {world}")
    if world % local:
        raise DryRunError(
            f"{world_name} {world} is not a multiple of {local_name} {local}: every node runs the same "
            f"number of processes"
        )
    return WorldLayout(world, local, source)


# ----------------------------------------------------------------------------------------------
# Model


def _vocabulary(config: RunConfig, warnings: list[str], continual: bool) -> tuple[int, str, bool]:
    """(vocab size, where it came from, whether a real tokenizer gave it)."""
    from megatron_lm.tokenizer import TokenizerError, build_tokenizer

    tokenizer_type, tokenizer_model = config.tokenizer.tokenizer_type, config.tokenizer.tokenizer_model
    if tokenizer_type == "NullTokenizer":
        vocab_size = config.model.vocab_size
        tokenizer = build_tokenizer("NullTokenizer", vocab_size=vocab_size)
        return tokenizer.vocab_size, f"NullTokenizer --vocab-size {vocab_size} plus its end-of-document id", True
    note = "assumed, the tokenizer could not be read here (GPT-NeoX's, as in the state-spaces/mamba checkpoints)"
    consequence = ("whether it fits the base model's embedding is not checked" if continual else
                   f"the vocabulary size is assumed to be {DEFAULT_VOCAB_SIZE}; parameter count and memory "
                   f"change with it")
    if not Path(tokenizer_model).exists():
        warnings.append(f"--tokenizer-model {tokenizer_model}: not found here, so {consequence}")
        return DEFAULT_VOCAB_SIZE, note, False
    try:
        tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    except TokenizerError as error:
        warnings.append(f"--tokenizer-model {tokenizer_model}: {error}; so {consequence}")
        return DEFAULT_VOCAB_SIZE, note, False
    return tokenizer.vocab_size, f"{tokenizer_type} {tokenizer_model}", True


def _model_config(config: RunConfig, vocab_size: int) -> tuple[MambaConfig, str]:
    """The MambaConfig train.py will build: the base model's own vocabulary when continuing from it."""
    from kotomamba.model import load_model_config

    base_model = config.model.base_model
    if base_model and not config.model.from_scratch:
        config_path = Path(base_model) / "config.json"
        try:
            values = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DryRunError(f"--base-model {base_model}: cannot read {config_path}: {error}") from None
        if not isinstance(values, dict) or not isinstance(values.get("vocab_size"), int):
            raise DryRunError(f"--base-model {base_model}: {config_path} has no integer vocab_size")
        return load_model_config(base_model, values["vocab_size"]), f"--base-model {base_model} (its weights)"
    if base_model:
        return load_model_config(base_model, vocab_size), f"--base-model {base_model} --from-scratch"
    kind = "preset" if config.model.model in MODEL_PRESETS else "config"
    return load_model_config(config.model.model, vocab_size), f"{kind} {config.model.model}"


def _architecture(config: MambaConfig) -> str:
    ssm = dict(config.ssm_cfg or {})
    layer = ssm.get("layer", "Mamba1")
    parts = [layer, f"d_model {config.d_model}", f"{config.n_layer} layers"]
    parts += [f"{key} {ssm[key]}" for key in ("d_state", "expand", "headdim") if key in ssm]
    if config.attn_layer_idx:
        parts.append(f"attention at layers {list(config.attn_layer_idx)}")
    if config.d_intermediate:
        parts.append(f"MLP {config.d_intermediate}")
    return ", ".join(parts)


def _layer_activation_bytes(config: MambaConfig, layer_idx: int, compute: int, residual: int, seq_length: int,
                            own_scan: bool = False) -> tuple[int, int]:
    """(bytes per token, bytes per sequence) one layer keeps for backward without checkpointing.

    Counted from what mamba-ssm's training path saves: the fused add+norm keeps the residual sum
    (fp32 with residual_in_fp32); the mixer's input projection keeps the normed input. Mamba-1
    (mamba_inner_fn): in_proj output xz, x_proj output, B and C, the scan output and the scan's fp32
    chunk states (conv and delta are recomputed); on kotomamba's scan (``own_scan``) neither the scan
    output (its backward recomputes it) nor more than the final state. Mamba-2 (mamba_split_conv1d_scan_combined):
    in_proj output and the pre-norm output. Attention: q, k, v and its output (flash attention, no
    L x L matrix). GatedMLP: its add+norm, fc1's output and the activation.
    """
    d = config.d_model
    ssm = dict(config.ssm_cfg or {})
    add_norm = residual * d + compute * d
    per_sequence = 0
    if layer_idx in set(config.attn_layer_idx or ()):
        attn = config.attn_cfg or {}
        heads = attn.get("num_heads", 1)
        heads_kv = attn.get("num_heads_kv") or heads
        head_dim = attn.get("head_dim") or d // heads
        mixer = compute * (head_dim * (heads + 2 * heads_kv) + 2 * head_dim * heads + attn.get("mlp_dim", 0)) + 4 * heads
    elif ssm.get("layer", "Mamba1") == "Mamba2":
        d_inner = int(ssm.get("expand", 2) * d)
        d_ssm = ssm.get("d_ssm") or d_inner
        d_state, ngroups = ssm.get("d_state", 128), ssm.get("ngroups", 1)
        in_proj = 2 * d_inner + 2 * ngroups * d_state + d_ssm // ssm.get("headdim", 64)
        mixer = compute * (in_proj + d_ssm) + 4 * ngroups
    else:
        d_inner = int(ssm.get("expand", 2) * d)
        d_state = ssm.get("d_state", 16)
        dt_rank = ssm.get("dt_rank", "auto")
        dt_rank = math.ceil(d / 16) if dt_rank == "auto" else dt_rank
        scan_output = 0 if own_scan else d_inner
        mixer = compute * (2 * d_inner + dt_rank + 2 * d_state + 2 * d_state + scan_output)
        chunks = 1 if own_scan else math.ceil(seq_length / SCAN_CHUNK_TOKENS)
        per_sequence = 4 * d_inner * 2 * d_state * chunks
    mlp = 0
    if config.d_intermediate:
        hidden = math.ceil(config.d_intermediate / 128) * 128  # GatedMLP rounds like mamba-ssm
        mlp = add_norm + compute * 3 * hidden
    return add_norm + mixer + mlp, per_sequence


def activation_bytes(config: MambaConfig, micro_batch_size: int, seq_length: int, compute: int,
                     checkpointed_blocks: int, embedding_rows: int, loss_chunk_tokens: int = 0,
                     selective_scan: str = "auto") -> tuple[int, str]:
    """Activation memory of one micro-batch on one GPU, and the assumptions behind it.

    ``selective_scan`` is the --selective-scan choice; "auto" counts as mamba-ssm's kernel, which keeps more
    (the dry run does not know the GPU; where kotomamba.kernels.SCAN_MEASURED_FASTER puts ours, less is used)."""
    residual = 4 if config.residual_in_fp32 else compute
    own_scan = selective_scan.startswith("kotomamba")
    layers = [_layer_activation_bytes(config, i, compute, residual, seq_length, own_scan)
              for i in range(config.n_layer)]
    tokens = micro_batch_size * seq_length
    # Final norm and lm_head input, then the logits: compute-dtype logits, their fp32 copy for the
    # loss (log-softmax) and the fp32 gradient that backward starts from.
    logits_per_token = (compute + 8) * embedding_rows
    head = residual * config.d_model + compute * config.d_model + logits_per_token
    head_once = 0
    if loss_chunk_tokens:
        # kotomamba.loss keeps one fp32 log-normalizer per token; the logits exist for one chunk at a
        # time, next to an fp32 accumulator for the output layer's gradient.
        head = residual * config.d_model + compute * config.d_model + 4
        head_once = min(loss_chunk_tokens, tokens) * logits_per_token + 4 * embedding_rows * config.d_model
    if checkpointed_blocks:
        # A checkpointed block keeps only its inputs (hidden states and residual); backward recomputes one
        # block at a time. The other blocks keep their saved tensors.
        recomputed, kept = layers[:checkpointed_blocks], layers[checkpointed_blocks:]
        largest = max(recomputed, key=lambda layer: layer[0] * tokens + layer[1] * micro_batch_size)
        total = (tokens * (checkpointed_blocks * (compute + residual) * config.d_model + largest[0]
                           + sum(layer[0] for layer in kept) + head)
                 + micro_batch_size * (largest[1] + sum(layer[1] for layer in kept)) + head_once)
        if kept:
            note = (f"activation checkpointing on the first {checkpointed_blocks} of {config.n_layer} blocks: their "
                    "inputs plus one recomputed block, and the other blocks' saved tensors")
        else:
            note = "activation checkpointing on: block inputs of every layer plus one recomputed layer"
    else:
        total = (tokens * (sum(layer[0] for layer in layers) + head) + micro_batch_size * sum(layer[1] for layer in layers)
                 + head_once)
        note = "no activation checkpointing: every layer's saved tensors"
    if loss_chunk_tokens:
        note += f"; logits of {min(loss_chunk_tokens, tokens):,} tokens at a time ({head_once:,} B)"
    else:
        note += f"; logits {logits_per_token:,} B per token"
    return total, note


def summarize_model(run: RunConfig, precision: PrecisionPolicy, warnings: list[str]) -> ModelSummary:
    """Builds the model on the meta device and counts it."""
    from kotomamba.flops import flops_per_token
    from kotomamba.model import build_model, count_parameters
    from kotomamba.parallel import is_fp32_sensitive

    import torch

    continual = bool(run.model.base_model) and not run.model.from_scratch
    vocab_size, vocab_note, from_tokenizer = _vocabulary(run, warnings, continual)
    config, description = _model_config(run, vocab_size)
    model = build_model(config, on_meta=True)
    embedding_rows = model.backbone.embedding.num_embeddings
    if from_tokenizer and vocab_size > embedding_rows:
        raise DryRunError(
            f"the tokenizer has {vocab_size} tokens but the model's embedding only {embedding_rows} rows "
            f"(--base-model {run.model.base_model} keeps its vocabulary); use its tokenizer or add --from-scratch"
        )
    parameters = count_parameters(model)
    blocks = [count_parameters(block) for block in model.backbone.layers]
    sensitive = 0
    if precision.param_dtype != torch.float32:  # kotomamba.parallel keeps these out of the low-precision cast
        sensitive = sum(p.numel() for name, p in model.named_parameters() if is_fp32_sensitive(name))
    compute = precision.compute_dtype.itemsize
    activations, activation_note = activation_bytes(
        config, run.batch.micro_batch_size, run.data.seq_length, compute,
        run.parallel.checkpointed_block_count(config.n_layer), embedding_rows, run.parallel.cross_entropy_chunk_tokens, run.kernels.selective_scan,
    )
    if continual:
        vocab_note = f"{run.model.base_model}/config.json; " + (
            f"the tokenizer's {vocab_size:,} fit" if from_tokenizer else "the tokenizer was not read here")
    return ModelSummary(
        description=f"{description}: {_architecture(config)}",
        vocab_size=config.vocab_size,
        vocab_note=vocab_note,
        embedding_rows=embedding_rows,
        parameters=parameters,
        embedding_parameters=model.backbone.embedding.weight.numel(),
        root_parameters=parameters - sum(blocks),
        largest_block_parameters=max(blocks, default=0),
        fp32_sensitive_parameters=sensitive,
        flops_per_token=flops_per_token(config, run.data.seq_length),
        activation_bytes=activations,
        activation_note=activation_note,
    )


# ----------------------------------------------------------------------------------------------
# Memory


def shard_group_size(strategy: str, layout: WorldLayout) -> int:
    """Ranks one parameter is split over: all, the node (hybrid), or none (NO_SHARD) — the "shard"
    dimension of the device mesh training builds."""
    from kotomamba.parallel import mesh_layout

    shape, _ = mesh_layout(strategy, layout.world_size, layout.gpus_per_node)
    return shape[-1]


def estimate_memory(config: RunConfig, model: ModelSummary, precision: PrecisionPolicy,
                    group: int) -> MemoryEstimate:
    sharded_parameters = model.parameters - model.fp32_sensitive_parameters
    state = math.ceil(sharded_parameters / group) * STATE_BYTES
    gradients = math.ceil(sharded_parameters / group) * GRADIENT_BYTES
    replicated = model.fp32_sensitive_parameters * STATE_BYTES
    gather = precision.param_dtype.itemsize
    reduce = precision.reduce_dtype.itemsize
    # Units in flight: the root (embedding, tied lm_head, final norm) and two units of Blocks (computing,
    # prefetched).
    in_flight = model.root_parameters + 2 * config.parallel.fsdp_blocks_per_unit * model.largest_block_parameters
    if config.parallel.sharding_strategy in ("SHARD_GRAD_OP", "_HYBRID_SHARD_ZERO2"):
        # ZeRO-2: parameters stay gathered from forward until backward.
        gathered = sharded_parameters * gather + in_flight * reduce
    else:
        gathered = in_flight * (gather + reduce)
    host = 0
    if config.parallel.fsdp_cpu_offload:
        state, host, gradients = 0, state, 0
    return MemoryEstimate(state, replicated, gathered, model.activation_bytes, host, gradients)


# ----------------------------------------------------------------------------------------------
# Data


def _dataset_tokens(prefix: str, flag: str, allow_extra_bin_bytes: bool, warnings: list[str]) -> int | None:
    """The tokens of one dataset prefix, or None (with a warning) where it cannot be read here."""
    from megatron_lm.indexed_dataset import IndexedDataset, IndexedDatasetError

    if not IndexedDataset.exists(prefix):
        warnings.append(f"{flag}: {prefix}.bin/.idx not found here (fine if the compute nodes see "
                        f"other paths; the run itself fails without them)")
        return None
    try:
        with IndexedDataset(prefix, allow_extra_bin_bytes=allow_extra_bin_bytes) as dataset:
            return dataset.num_tokens
    except (IndexedDatasetError, OSError) as error:
        warnings.append(f"{flag}: {prefix}: {error}")
        return None


def _epochs_note(flag: str, prefix: str, tokens: float, size: int, share: float, warnings: list[str]) -> str:
    """", E epochs of its training part" for `tokens` read from a dataset of `size` tokens."""
    epochs = tokens / (size * share)
    if epochs > MANY_EPOCHS:
        warnings.append(
            f"{flag}: the plan reads {prefix} {epochs:,.1f} times over ({_tokens(tokens)} tokens from it); more "
            f"than {MANY_EPOCHS} epochs of the same text usually means a wrong run length or a wrong dataset")
    return f", {epochs:.2f} epochs of its training part"


def _data_report(config: RunConfig, total_tokens: int | None, warnings: list[str]) -> list[str]:
    data = config.data
    if data.stages:
        return _schedule_report(config, warnings)
    lines = []
    for flag, values in (("--data-path", data.data_path), ("--train-data-path", data.train_data_path),
                         ("--valid-data-path", data.valid_data_path), ("--test-data-path", data.test_data_path)):
        if values is None:
            continue
        prefixes, weights = arguments.parse_blend(values, flag)
        share = 1.0
        header = f"{flag}: {len(prefixes)} dataset(s)"
        if flag == "--data-path":
            share = arguments.parse_split(data.split)[0]
            header += f", --split {data.split} (training gets {share:.1%} of each)"
        lines.append(header)
        sizes = [_dataset_tokens(prefix, flag, data.data_allow_extra_bin_bytes, warnings) for prefix in prefixes]
        known = [size for size in sizes if size is not None]
        if weights is None:  # unweighted prefixes are drawn in proportion to their size, like Megatron-LM
            weights = [float(size) for size in sizes] if len(known) == len(sizes) else [1.0] * len(sizes)
        weight_sum = sum(weights) or 1.0
        for prefix, weight, size in zip(prefixes, weights, sizes):
            fraction = weight / weight_sum
            if size is None:
                lines.append(f"  {fraction:6.1%}  {prefix}  (not found)")
                continue
            detail = f"{_tokens(size)} tokens"
            if flag in ("--data-path", "--train-data-path") and total_tokens is not None and size > 0:
                detail += _epochs_note(flag, prefix, fraction * total_tokens, size, share, warnings)
            lines.append(f"  {fraction:6.1%}  {prefix}  ({detail})")
    if not lines:
        lines.append("no data paths given (allowed with --dry-run)")
    return lines


def _schedule_report(config: RunConfig, warnings: list[str]) -> list[str]:
    """Each stage (length, iterations, shares), then each dataset (tokens read over the run, epochs)."""
    from kotomamba.data_schedule import schedule_prefixes

    data, global_batch = config.data, config.batch.global_batch_size
    flag = f"--data-schedule {data.data_schedule}"
    share = arguments.parse_split(data.split)[0]
    lines = [f"{flag}: {len(data.stages)} stage(s), --split {data.split} (training gets {share:.1%} of each dataset)"]
    read: dict[str, float] = {}
    start = 0
    for number, stage in enumerate(data.stages, start=1):
        total = sum(stage.weights)
        end = start + stage.samples
        lines.append(f"  stage {number} {stage.name}: {_tokens(stage.samples * data.seq_length)} tokens, iterations "
                     f"{start // global_batch + 1:,}-{-(-end // global_batch):,}: " + ", ".join(
                         f"{weight / total:.1%} {prefix}" for prefix, weight in zip(stage.prefixes, stage.weights)))
        for prefix, weight in zip(stage.prefixes, stage.weights):
            read[prefix] = read.get(prefix, 0.0) + weight / total * stage.samples * data.seq_length
        start = end
    for prefix in schedule_prefixes(data.stages):
        size = _dataset_tokens(prefix, flag, data.data_allow_extra_bin_bytes, warnings)
        detail = f"{_tokens(read[prefix])} tokens over the run"
        if size:
            detail += f" of its {_tokens(size)}" + _epochs_note(flag, prefix, read[prefix], size, share, warnings)
        lines.append(f"  {prefix}: {detail}")
    return lines


MANY_EPOCHS = 4  # repeating a dataset more often than this gets a warning in the dry run

# ----------------------------------------------------------------------------------------------
# Plan and report


def _save_free_bytes(config: RunConfig, checkpoint_bytes: int, warnings: list[str]) -> int | None:
    """Free space where --save will be, with a warning when the checkpoints the run keeps at once do not fit."""
    saving, train_iters = config.checkpoint, config.batch.train_iters
    if saving.save is None:
        return None
    existing = next((path for path in (Path(saving.save), *Path(saving.save).absolute().parents) if path.is_dir()), None)
    if existing is None or train_iters is None:
        return None
    free = shutil.disk_usage(existing).free
    saves = saves_ahead(0, train_iters, saving.save_interval)
    at_once = saves if saving.keep_last_k is None else min(saves, saving.keep_last_k + 1)
    if at_once * checkpoint_bytes > free:
        warnings.append(f"--save {saving.save}: {_bytes(free)} free there now, the {at_once:,} checkpoints kept at once "
                        f"need {_bytes(at_once * checkpoint_bytes)} (the run checks again before training and before "
                        f"every save, and stops rather than write a checkpoint that does not fit)")
    return free


def plan(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Plan:
    """Every number of the report for parsed pretrain.py flags; raises DryRunError/ArgumentError for a
    configuration that cannot run."""
    from kotomamba.precision import resolve_precision

    warnings: list[str] = []
    layout = world_layout(args, environ, warnings)
    # FSDP makes every rank a data-parallel rank, whatever the sharding strategy.
    config = build_run_config(args, layout.world_size)
    batch = config.batch
    tokens_per_iteration = batch.global_batch_size * config.data.seq_length
    total_tokens = None if batch.train_iters is None else batch.train_iters * tokens_per_iteration
    if batch.train_iters is None:
        warnings.append("no training length (--train-iters, --train-samples or --train-tokens): token budget not "
                        "computed")
    if config.optimizer.lr is None:
        warnings.append("no --lr: the real run needs it")

    # Without a GPU, auto resolves like on Ampere or newer; a V100 run resolves to fp16 (give --fp16).
    flags = config.precision
    preset = "bf16" if flags.precision == "auto" else flags.precision
    precision = resolve_precision(preset, flags.param_dtype, flags.reduce_dtype, device_type="cpu")
    model = summarize_model(config, precision, warnings)
    group = shard_group_size(config.parallel.sharding_strategy, layout)
    memory = estimate_memory(config, model, precision, group)
    data_lines = _data_report(config, total_tokens, warnings)
    checkpoint_bytes = model.parameters * CHECKPOINT_BYTES
    return Plan(
        config=config, layout=layout, accumulation=batch.gradient_accumulation_steps,
        tokens_per_iteration=tokens_per_iteration,
        total_tokens=total_tokens, model=model, precision=precision, shard_group_size=group, memory=memory,
        checkpoint_bytes=checkpoint_bytes, save_free_bytes=_save_free_bytes(config, checkpoint_bytes, warnings),
        data_lines=data_lines, warnings=warnings,
    )


def _count(number: int) -> str:
    return f"{number:,} ({_tokens(number)})"


def _tokens(number: float) -> str:
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if number >= size:
            return f"{number / size:.2f}{suffix}"
    return f"{number:g}"


def _bytes(number: float) -> str:
    for size, unit in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if number >= size:
            return f"{number / size:.2f} {unit}"
    return f"{number:.0f} B"


def _dtype(dtype: object) -> str:
    return {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(dtype), str(dtype))


def _section(title: str, rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(key) for key, _ in rows)
    return ["", title] + [f"  {key:<{width}}  {value}" for key, value in rows]


def _lr_schedule(config: RunConfig) -> str:
    opt = config.optimizer
    if opt.lr is None or config.batch.train_iters is None:
        return "not set"
    text = (f"{opt.lr:g} -> {opt.min_lr:g}, {opt.lr_decay_style} decay to iteration {opt.lr_decay_iters:,}, "
            f"{opt.lr_warmup_iters:,} warmup iterations")
    if opt.lr_decay_style == "WSD":
        text += f", anneal over the last {opt.lr_wsd_decay_iters:,}"
    return text


def format_plan(result: Plan) -> str:
    """The report for a computed Plan."""
    import yaml

    config, layout, model, memory, policy = result.config, result.layout, result.model, result.memory, result.precision
    lines = ["kotomamba dry run: configuration checked, nothing trained (no GPU, process group or data used).",
             "", "Resolved configuration"]
    config_text = yaml.safe_dump(config_dict(config), sort_keys=True, default_flow_style=None, width=1000)
    lines += ["  " + line for line in config_text.splitlines()]

    strategy = config.parallel.sharding_strategy
    sharding = {1: "nothing sharded: every rank holds everything"}.get(
        result.shard_group_size, f"parameters, gradients and optimizer state split over {result.shard_group_size} ranks")
    lines += _section("World layout", [
        ("source", layout.source),
        ("processes (GPUs)", f"{layout.world_size} = {layout.num_nodes} node(s) x {layout.gpus_per_node} per node"),
        ("data parallel", f"{layout.world_size} (under FSDP every rank is a data-parallel rank)"),
        ("sharding", f"{strategy}: {sharding}"),
    ])

    mbs, gbs, dp = config.batch.micro_batch_size, config.batch.global_batch_size, layout.world_size
    lines += _section("Batch", [
        ("micro batch", f"{mbs} samples per rank per forward/backward"),
        ("gradient accumulation", f"{result.accumulation} = global batch {gbs} / (micro batch {mbs} x data parallel {dp})"),
        ("global batch", f"{gbs:,} samples x {config.data.seq_length} tokens = {result.tokens_per_iteration:,} tokens per iteration"),
    ])

    train_iters, planned = config.batch.train_iters, config.batch.train_tokens
    iterations = "not set" if train_iters is None else f"{train_iters:,}"
    if planned is not None:
        iterations += (f" = --train-tokens {planned:,} / {result.tokens_per_iteration:,} tokens per iteration, "
                       f"rounded up")
    length = [("iterations", iterations)]
    if result.total_tokens is not None:
        total = f"{_count(result.total_tokens)} = {train_iters:,} x {result.tokens_per_iteration:,}"
        if planned is not None:
            total += f" ({result.total_tokens - planned:,} past the {_count(planned)} planned, to end on an iteration)"
        length.append(("total tokens", total))
    length.append(("learning rate", _lr_schedule(config)))
    lines += _section("Training length", length)

    flops_per_iteration = model.flops_per_token * result.tokens_per_iteration
    model_rows = [
        ("model", model.description),
        ("vocabulary", f"{model.vocab_size:,} ({model.vocab_note}); {model.embedding_rows:,} embedding rows (padded)"),
        ("parameters", f"{_count(model.parameters)}; embedding (tied with lm_head) {_count(model.embedding_parameters)}"),
        ("FLOPs per token", f"{model.flops_per_token:.4g} (forward + backward = 3 x forward, kotomamba.flops)"),
        ("FLOPs per iteration", f"{flops_per_iteration:.4g}"),
    ]
    if result.total_tokens is not None:
        model_rows.append(("FLOPs in total", f"{model.flops_per_token * result.total_tokens:.4g}"))
    lines += _section("Model", model_rows)

    gather, reduce, compute = _dtype(policy.param_dtype), _dtype(policy.reduce_dtype), _dtype(policy.compute_dtype)
    sharded = model.parameters - model.fp32_sensitive_parameters
    in_flight = model.root_parameters + 2 * config.parallel.fsdp_blocks_per_unit * model.largest_block_parameters
    memory_rows = [
        ("precision", f"{policy.name}{' (auto, as on A100/H100; V100 runs need --fp16)' if config.precision.precision == 'auto' else ''}: "
                      f"compute {compute}, parameters gathered in {gather}, gradients reduced in {reduce}, "
                      f"fp32 master weights"),
        ("sharded state", f"{_bytes(memory.sharded_state)} = {sharded:,} parameters x {STATE_BYTES} B (fp32 weight "
                          f"{MASTER_BYTES} + gradient {GRADIENT_BYTES} + AdamW moments {ADAM_BYTES}) / {result.shard_group_size}"
                          + (" -> in CPU memory (--fsdp-cpu-offload)" if config.parallel.fsdp_cpu_offload else "")),
    ]
    if model.fp32_sensitive_parameters:
        memory_rows.append(("replicated fp32", f"{_bytes(memory.replicated_state)} = {model.fp32_sensitive_parameters:,} "
                                               f"A_log/D/dt_bias parameters x {STATE_BYTES} B on every rank"))
    if strategy in ("SHARD_GRAD_OP", "_HYBRID_SHARD_ZERO2"):
        gathered_note = f"all {sharded:,} parameters in {gather} (kept from forward to backward) + gradients in {reduce}"
    else:
        gathered_note = (f"{in_flight:,} parameters in flight (root unit + 2 units of "
                         f"{config.parallel.fsdp_blocks_per_unit} block(s)) x ({gather} + {reduce} gradient)")
    memory_rows += [
        ("gathered", f"{_bytes(memory.gathered)} = {gathered_note}"),
        ("activations", f"{_bytes(memory.activations)} = micro batch {mbs} x {config.data.seq_length} tokens; {model.activation_note}"),
        ("total", f"{_bytes(memory.total)} per GPU: the state without its gradients, gathered, and the larger of "
                  f"the activations and the gradient shards ({_bytes(memory.sharded_gradients)}), which backward "
                  f"trades one for the other"
                  + (f"; plus {_bytes(memory.host_state)} of CPU memory per rank" if memory.host_state else "")),
        ("not counted", "CUDA context and kernel workspaces (about 1-2 GiB), NCCL buffers, allocator fragmentation, "
                        "temporaries inside one kernel"),
    ]
    lines += _section("Memory per GPU (estimate)", memory_rows)

    checkpoint_rows = [("size", f"{_bytes(result.checkpoint_bytes)} per checkpoint (fp32 weights {MASTER_BYTES} B + AdamW "
                                f"moments {ADAM_BYTES} B per parameter), {config.checkpoint.checkpoint_type}")]
    saving, train_iters = config.checkpoint, config.batch.train_iters
    if saving.checkpoint_type != "FULL_STATE_DICT":
        checkpoint_rows.append(("per rank", f"{_bytes(result.checkpoint_bytes / layout.world_size)} written by each of "
                                            f"{layout.world_size} ranks"))
    if saving.save is not None and train_iters is not None:
        count = saves_ahead(0, train_iters, saving.save_interval)
        kept = count if saving.keep_last_k is None else min(count, saving.keep_last_k)
        checkpoint_rows.append(("on disk", f"{count:,} saves every {saving.save_interval:,} iterations, {kept:,} kept: "
                                           f"{_bytes(kept * result.checkpoint_bytes)} in {saving.save}"
                                           + ("" if saving.keep_last_k else " (--keep-last-k bounds it)")
                                           + (f"; {_bytes(result.save_free_bytes)} free there now"
                                              if result.save_free_bytes is not None else "")))
    lines += _section("Checkpoints", checkpoint_rows)

    lines += ["", "Data"] + ["  " + line for line in result.data_lines]
    if result.warnings:
        lines += ["", "Warnings"] + [f"  - {warning}" for warning in result.warnings]
    return "\n".join(lines)


def describe(args: argparse.Namespace) -> str:
    """The dry-run report for parsed pretrain.py arguments; raises DryRunError/ArgumentError/ValueError."""
    return format_plan(plan(args))


def run(args: argparse.Namespace) -> int:
    """Print the report (rank 0 only under a launcher); 0, or 2 with an error message."""
    if launcher_rank() != 0:
        return 0
    from kotomamba.flops import FlopsConfigError
    from kotomamba.model import ModelConfigError
    from kotomamba.precision import PrecisionConfigError

    try:
        report = describe(args)
    except (DryRunError, ArgumentError, ModelConfigError, PrecisionConfigError, FlopsConfigError) as error:
        print(f"pretrain.py: error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0
