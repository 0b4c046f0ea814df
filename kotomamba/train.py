"""The pretraining loop, readable top to bottom.

`pretrain(config)` sets up (distributed, kernels, model, FSDP, optimizer, data), then for each
iteration: accumulate micro-batches, reduce, check for non-finite gradients, clip, step, log,
evaluate. Model building, parallelism, precision, optimization, data and metrics each live in their
own module; this file only wires them together.

A step never waits for the host: the skip decision, clipping and the loss scale live on the device,
and the step's numbers (loss, gradient norm, skip) are read back one iteration late, after the next
step has been queued (kotomamba.step_readback). Whatever needs them up to date (validation, a save,
a stop, the end) first reports the steps still pending.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from kotomamba import metrics
from kotomamba.config import DataSection, ModelSection, RunConfig, TokenizerSection, config_dict
from kotomamba.distributed import DistributedContext, init_distributed, raise_on_every_rank, shutdown_distributed
from kotomamba.loss import IGNORE_INDEX, LossFunction, training_loss
from kotomamba.sinks import MetricLogger
from kotomamba.state import StepResult, TrainState
from kotomamba.step_readback import QueuedStep
from kotomamba.errors import KotomambaError

logger = logging.getLogger("kotomamba")
# Each dataset's consumed tokens and epochs go to the log every this many --log-interval lines (the sinks
# get them at every one).
CONSUMPTION_LINE_INTERVALS = 10


class TrainingError(KotomambaError, RuntimeError):
    """A problem found during setup or training that every rank reports the same way."""


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True)


def build_model_and_tokenizer(model_flags: ModelSection, tokenizer_flags: TokenizerSection, ctx: DistributedContext,
                              seed: int, low_cpu_fsdp: bool = False):
    """Tokenizer first (it fixes the vocabulary), then mamba-ssm's model: from a base model's weights,
    or freshly initialized from a preset / config.json (on the meta device first with --low-cpu-fsdp)."""
    from megatron_lm.tokenizer import build_tokenizer
    from kotomamba.model import build_model, load_base_model, load_model_config, materialize_and_init

    tokenizer = build_tokenizer(tokenizer_flags.tokenizer_type, tokenizer_flags.tokenizer_model,
                                vocab_size=model_flags.vocab_size)
    if model_flags.base_model and not model_flags.from_scratch:
        model = load_base_model(model_flags.base_model, tokenizer.vocab_size, device=ctx.device)
    else:
        config = load_model_config(model_flags.base_model or model_flags.model, tokenizer.vocab_size)
        if low_cpu_fsdp:
            # Host memory never holds the weights: they are allocated and initialized on the device.
            model = materialize_and_init(build_model(config, on_meta=True), ctx.device, seed)
        else:
            model = build_model(config, device=ctx.device, seed=seed)
    embedding_rows = model.backbone.embedding.weight.shape[0]
    too_small = tokenizer.vocab_size > embedding_rows
    raise_on_every_rank(
        TrainingError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only "
                      f"{embedding_rows} rows") if too_small else None,
        TrainingError("a check failed on another rank; see its log"), ctx.device,
    )
    return model, model.config, tokenizer


def build_datasets(config: RunConfig, min_train_samples: int = 0):
    """Train/valid/test datasets sized as Megatron sizes them (the run's length, evaluation and global
    batch); `min_train_samples` is what a resumed run whose global batch size shrank reads in total (see
    CheckpointManager.train_samples_needed)."""
    from megatron_lm.data_builder import DataConfig, build_train_valid_test_datasets, samples_per_split

    data, batch, logging_flags = config.data, config.batch, config.logging
    num_samples = samples_per_split(batch.train_iters, logging_flags.eval_interval, logging_flags.eval_iters,
                                    batch.global_batch_size)
    num_samples = (max(num_samples[0], min_train_samples), *num_samples[1:])
    config = DataConfig(
        data_path=data.data_path,
        train_data_path=data.train_data_path,
        valid_data_path=data.valid_data_path,
        test_data_path=data.test_data_path,
        split=data.split,
        seq_length=data.seq_length,
        seed=data.seed,
        cache_path=data.data_cache_path,
        allow_extra_bin_bytes=data.data_allow_extra_bin_bytes,
        stages=[(stage.prefixes, stage.weights, stage.samples) for stage in data.stages] if data.stages else None,
    )
    return build_train_valid_test_datasets(config, num_samples)


@torch.no_grad()
def evaluate(model: nn.Module, compute_loss: LossFunction, batches: Iterator[dict], num_micro_batches: int,
             ctx: DistributedContext, autocast, documents: Documents | None = None) -> dict[str, float]:
    """Mean loss per target token over `num_micro_batches` micro-batches per rank, reduced across ranks;
    per blend component as well (`loss/dataset<i>`, in --*-data-path order). `documents`: as training
    treats packed documents (--reset-state-at-eod, --eod-mask-loss)."""
    from kotomamba.documents import packed_documents

    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, token count
    per_dataset: dict[int, torch.Tensor] = defaultdict(lambda: torch.zeros(2, dtype=torch.float64, device=ctx.device))
    for _ in range(num_micro_batches):
        batch = next(batches)
        tokens, labels = batch["tokens"].to(ctx.device), batch["labels"].to(ctx.device)
        labels, seq_idx = documents.prepare(tokens, labels) if documents is not None else (labels, None)
        with autocast(), packed_documents(seq_idx):
            per_sample = compute_loss(tokens, labels, reduction="none").sum(dim=1).double()
        targets = (labels != IGNORE_INDEX).sum(dim=1).double()
        total[0] += per_sample.sum()
        total[1] += targets.sum()
        for dataset_id, loss_sum, count in zip(batch.get("dataset_id", torch.zeros(0)).tolist(), per_sample, targets):
            per_dataset[dataset_id][0] += loss_sum
            per_dataset[dataset_id][1] += count
    dist.all_reduce(total)
    result = {"loss": (total[0] / total[1]).item()}
    # Each rank may have seen a different subset of components: agree on the ids before reducing.
    seen: list[list[int]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(seen, sorted(per_dataset))
    for dataset_id in sorted({i for ids in seen for i in ids}):
        sums = per_dataset[dataset_id]
        dist.all_reduce(sums)
        result[f"loss/dataset{dataset_id}"] = (sums[0] / sums[1]).item()
    model.train()
    return result


class Documents:
    """What --reset-state-at-eod and --eod-mask-loss do to a micro-batch on the device: its document index
    for the Mamba kernels, and its labels with the token after each EOD ignored."""

    def __init__(self, eod: int, reset_state: bool, mask_loss: bool) -> None:
        self.eod, self.reset_state, self.mask_loss = eod, reset_state, mask_loss

    def prepare(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        from kotomamba.documents import document_index

        if self.mask_loss:  # Megatron: no loss where the input token is the EOD
            labels = labels.masked_fill(tokens == self.eod, IGNORE_INDEX)
        return labels, document_index(tokens, self.eod) if self.reset_state else None


def cycle(loader, first_pass=None) -> Iterator[dict]:
    """Evaluation iterators continue across evaluations (Megatron's behaviour) and wrap at the end;
    `first_pass`, a loader starting mid-way, is where a resumed run's stream continues before wrapping."""
    if first_pass is not None:
        yield from first_pass
    while True:
        yield from loader


def check_token_ids(batch: dict, embedding_rows: int, split: str, tokenizer_name: str, data_flags: str) -> dict:
    """`batch`, unless it holds token ids the embedding does not have (data tokenized with another
    tokenizer), which would otherwise fail as an index error deep inside the model. A min and a max over
    the batch on the CPU: microseconds."""
    ids = (batch["tokens"], batch["labels"])
    low, high = min(int(t.min()) for t in ids), max(int(t.max()) for t in ids)
    if low < 0 or high >= embedding_rows:
        raise TrainingError(
            f"the {split} data holds token id {high if high >= embedding_rows else low}, outside the model's "
            f"embedding of {embedding_rows} rows (tokenizer {tokenizer_name}): was {data_flags} tokenized with "
            f"another tokenizer?")
    return batch


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` can skip a step on the device (torch's fused AdamW reads a found_inf tensor):
    on a GPU kotomamba.optim builds it so; elsewhere the loop decides on the host."""
    return bool(optimizer.defaults.get("fused"))


def in_skip_ranges(iteration: int, ranges: tuple[tuple[int, int], ...] | None) -> bool:
    """--skip-batch FIRST LAST ranges are inclusive and count iterations from 1."""
    return any(first <= iteration <= last for first, last in ranges or ())


@dataclasses.dataclass
class PendingIteration:
    """An iteration queued on the device but not yet reported: its counters as they stood after it, and
    its step (None for --skip-batch), whose numbers are on their way to the host."""

    iteration: int
    consumed_samples: int
    consumed_tokens: int
    lr: float
    step: QueuedStep | None


StepCallback = Callable[[TrainState, "StepResult | None"], None]


def pretrain(config: RunConfig, on_step: StepCallback | None = None) -> TrainState:
    """Train as `config` says, in a process group set up from the launcher's environment."""
    ctx = init_distributed(config.parallel.use_mpi)
    setup_logging(ctx.rank)
    completed = False
    try:
        state = run_training(config, ctx, on_step)
        completed = True
        return state
    finally:
        shutdown_distributed(completed)


def run_training(config: RunConfig, ctx: DistributedContext, on_step: StepCallback | None = None) -> TrainState:
    """The whole run in an existing process group. `on_step(state, result)` is called once for every
    iteration, in order, when its numbers have reached the host (on a GPU, while the next iteration
    runs): `state` as it stood after that iteration, `result` None for a --skip-batch iteration."""
    # Opened first so that a missing package or a bad W&B flag stops the run before the model is built;
    # closed (the W&B run marked failed on an exception) whichever way training ends.
    # SIGTERM/SIGUSR1 (a scheduler's warning) become a save-and-exit at the next iteration boundary.
    from kotomamba.run_control import exit_signals_handled
    from kotomamba.run_lock import save_directory_locked

    if config.batch.data_parallel_size != ctx.world_size:
        raise TrainingError(f"the configuration was built for {config.batch.data_parallel_size} ranks but the "
                            f"process group has {ctx.world_size}")
    with (save_directory_locked(config.checkpoint.save, ctx), exit_signals_handled(),
          MetricLogger(config.logging, config.checkpoint.save, ctx) as metric_logger):
        return _train(config, ctx, metric_logger, on_step)


def _train(config: RunConfig, ctx: DistributedContext, metric_logger: MetricLogger,
           on_step: StepCallback | None) -> TrainState:
    """Set up, then per iteration: train (or skip) a global batch, report it, validate when due, and let
    the step boundary save and decide whether to stop."""
    from kotomamba.kernels import configure_triton_cache, select_kernel_backend

    configure_triton_cache(ctx.rank)
    # before mamba-ssm is imported
    select_kernel_backend(ctx.device, selective_scan=config.kernels.selective_scan,
                          documents=config.data.reset_state_at_eod)
    logger.info("resolved config:\n%s", json.dumps(config_dict(config), indent=2, default=str))
    trainer = Trainer(config, ctx, metric_logger, on_step)
    state = trainer.state
    trainer.start()
    while state.iteration < config.batch.train_iters:
        # Queues this iteration, then reports the previous one, whose numbers arrived meanwhile.
        trainer.run_iteration(state)
        trainer.validate_if_due(state)
        # Saves at --save-interval; True when the run must stop now (SIGTERM/SIGUSR1, --exit-*), after saving.
        if trainer.run_control.after_iteration(state, pause=trainer.meter.paused,  # saving is not training time
                                               settle=lambda: trainer.report_pending(state)):
            break
    trainer.finish(state)
    return state


class TokenIdCheck:
    """Refuses batches whose token ids the model's embedding does not have (see check_token_ids)."""

    def __init__(self, data: DataSection, embedding_rows: int, tokenizer_name: str) -> None:
        self.embedding_rows = embedding_rows
        self.tokenizer_name = tokenizer_name
        self.data_flags = data.flags

    def __call__(self, batch: dict, split: str) -> dict:
        return check_token_ids(batch, self.embedding_rows, split, self.tokenizer_name, self.data_flags)

    def stream(self, batches: Iterator[dict], split: str) -> Iterator[dict]:
        return (self(batch, split) for batch in batches)


class Trainer:
    """One run's model, optimizer, data streams, checkpointing and meters, built in the order the run
    needs them (the checkpoint is restored before the loaders are built: they start at its data
    position); each step of the loop in `_train` is one method."""

    def __init__(self, config: RunConfig, ctx: DistributedContext, metric_logger: MetricLogger,
                 on_step: StepCallback | None = None) -> None:
        from kotomamba.checkpoint import CheckpointManager
        from kotomamba.distributed import new_host_group
        from kotomamba.run_control import RunControl

        self.config, self.ctx, self.metric_logger, self.on_step = config, ctx, metric_logger, on_step
        self.accumulation = config.batch.gradient_accumulation_steps
        self.host_group = new_host_group()
        self._build_model_and_optimizer()
        self.checkpointer = CheckpointManager(config, ctx, self.model, self.optimizer, self.scaler, self.tokenizer,
                                              self.model_config)
        saving = config.checkpoint
        self.run_control = RunControl(self.checkpointer, config.batch.train_iters, saving.save_interval,
                                      saving.exit_interval, saving.exit_duration_in_mins, self.host_group)
        self.train_ds, self.valid_ds, self.test_ds = build_datasets(config, self.checkpointer.train_samples_needed())
        self.state = self.checkpointer.load(TrainState(), self.train_ds)
        self.checkpointer.check_disk_space(self.state)
        self._build_data_streams()
        self._describe_iteration_cost()

    # --- setup ----------------------------------------------------------------------------------

    def _build_model_and_optimizer(self) -> None:
        from kotomamba.lr_schedule import LRSchedule
        from kotomamba.optim import build_optimizer, marked_no_weight_decay_names
        from kotomamba.parallel import parallelize
        from kotomamba.precision import build_loss_scaler, resolve_precision

        config, ctx = self.config, self.ctx
        precision, parallel, opt = config.precision, config.parallel, config.optimizer
        self.policy = resolve_precision(precision.precision, precision.param_dtype, precision.reduce_dtype,
                                        device_type=ctx.device.type)
        model, self.model_config, self.tokenizer = build_model_and_tokenizer(
            config.model, config.tokenizer, ctx, seed=config.data.seed, low_cpu_fsdp=parallel.low_cpu_fsdp)
        no_decay_names = marked_no_weight_decay_names(model)  # fully_shard drops the markers
        self.sharded = parallelize(
            model, ctx, strategy=parallel.sharding_strategy, param_dtype=self.policy.param_dtype,
            reduce_dtype=self.policy.reduce_dtype,
            checkpointed_blocks=parallel.checkpointed_block_count(self.model_config.n_layer),
            cpu_offload=parallel.fsdp_cpu_offload, blocks_per_unit=parallel.fsdp_blocks_per_unit,
        )
        self.model = self.sharded.module
        self.compute_loss = training_loss(self.model, parallel.cross_entropy_chunk_tokens,
                                          masked=config.data.eod_mask_loss)
        self._check_documents()
        self.optimizer = build_optimizer(
            self.model, lr=opt.lr, weight_decay=opt.weight_decay, betas=(opt.adam_beta1, opt.adam_beta2),
            eps=opt.adam_eps, no_decay_names=no_decay_names,
        )
        self.schedule = LRSchedule(
            max_lr=opt.lr, min_lr=opt.min_lr, warmup_iters=opt.lr_warmup_iters, decay_iters=opt.lr_decay_iters,
            style=opt.lr_decay_style, wsd_decay_iters=opt.lr_wsd_decay_iters,
            wsd_decay_style=opt.lr_wsd_decay_style, warmup_init_lr=opt.lr_warmup_init,
        )
        self.scaler = build_loss_scaler(
            self.policy, ctx.device, initial_scale=precision.initial_loss_scale, min_scale=precision.min_loss_scale,
            growth_interval=precision.loss_scale_window, hysteresis=precision.hysteresis,
        )

    def _check_documents(self) -> None:
        """--reset-state-at-eod / --eod-mask-loss: the Documents step, where the model allows it."""
        data = self.config.data
        self.documents = None
        if not (data.reset_state_at_eod or data.eod_mask_loss):
            return
        attention = (getattr(self.model_config, "attn_layer_idx", None) or []) if data.reset_state_at_eod else []
        if attention:
            raise TrainingError(
                f"--reset-state-at-eod: this model has attention layers ({len(attention)}: attn_layer_idx "
                f"{list(attention)}); mamba-ssm's attention takes no per-document mask (it calls "
                f"scaled_dot_product_attention with is_causal only), so those layers would still see across "
                f"documents. Train it without --reset-state-at-eod (--eod-mask-loss alone is fine)")
        self.documents = Documents(self.tokenizer.eod, data.reset_state_at_eod, data.eod_mask_loss)

    def _build_data_streams(self) -> None:
        from kotomamba import data as data_lib
        from kotomamba.checkpoint import evaluation_resume_position

        config, ctx = self.config, self.ctx
        micro_batch_size = config.batch.micro_batch_size
        self.loader_options = dict(micro_batch_size=micro_batch_size, dp_rank=ctx.rank, dp_size=ctx.world_size,
                                   num_workers=config.data.num_workers, pin_memory=ctx.device.type == "cuda")
        self.check = TokenIdCheck(config.data, self.model.backbone.embedding.num_embeddings, self.tokenizer.name)
        # Unchecked: --skip-batch may step over any batch; train_step checks the ones it trains on.
        self.train_batches = iter(data_lib.build_loader(self.train_ds, self.state.consumed_samples,
                                                        **self.loader_options))
        self.evaluating = config.logging.eval_iters > 0
        self.valid_batches = None
        if self.evaluating and self.valid_ds is not None:
            valid_start = evaluation_resume_position(len(self.valid_ds), self.state.consumed_valid_samples,
                                                     micro_batch_size * ctx.world_size)
            resumed = (data_lib.build_loader(self.valid_ds, valid_start, **self.loader_options) if valid_start
                       else None)
            self.valid_batches = self.check.stream(
                cycle(data_lib.build_loader(self.valid_ds, 0, **self.loader_options), resumed), "validation")

    def _describe_iteration_cost(self) -> None:
        """What one iteration costs (tokens, FLOPs, the device's peak), logged once."""
        from kotomamba.flops import flops_per_token, peak_flops
        from kotomamba.kernels import kernel_summary

        ctx, policy, batch, seq_length = self.ctx, self.policy, self.config.batch, self.config.data.seq_length
        self.tokens_per_iteration = batch.global_batch_size * seq_length
        self.flops_per_token = flops_per_token(self.model_config, seq_length)
        device_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
        self.peak = peak_flops(device_name, str(policy.compute_dtype).removeprefix("torch."),
                               self.config.misc.peak_tflops)
        logger.info(
            "kernels %s | precision %s (params %s, reduce %s, compute %s) | world size %d | micro batch %d × "
            "accumulation %d × data parallel %d = global batch %d | seq length %d | %s tokens/iteration | "
            "%.3g FLOPs/token | peak %s | %s iterations = %s tokens planned%s",
            kernel_summary(), policy.name, policy.param_dtype, policy.reduce_dtype, policy.compute_dtype,
            ctx.world_size, batch.micro_batch_size, self.accumulation, ctx.world_size, batch.global_batch_size,
            seq_length, f"{self.tokens_per_iteration:,}", self.flops_per_token,
            f"{self.peak / 1e12:.0f} TFLOP/s" if self.peak else "unknown (no MFU; set --peak-tflops)",
            f"{batch.train_iters:,}", f"{batch.train_iters * self.tokens_per_iteration:,}",
            f" (--train-tokens {batch.train_tokens:,})" if batch.train_tokens is not None else "",
        )

    def start(self) -> None:
        """Just before the first iteration: the sinks open, the clocks start."""
        from kotomamba.optimizer_stats import OptimizerStats

        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer_stats = OptimizerStats(self.model, self.optimizer, self.ctx.device)
        self.metric_logger.start(self.state.iteration, config_dict(self.config))
        self.valid_names = metrics.blend_component_names(self.valid_ds)
        self.test_names = metrics.blend_component_names(self.test_ds)
        self.meter = metrics.IntervalMeter(device=self.ctx.device)
        self.consumption = metrics.DataConsumption(self.train_ds, self.config.data.seq_length)
        blend = getattr(self.train_ds, "datasets", None)
        # --log-loss-per-dataset: each dataset's (loss sum, target count) over the interval, on the host.
        self.dataset_losses = (torch.zeros(len(blend), 2, dtype=torch.float64)
                               if self.config.logging.log_loss_per_dataset and blend else None)
        self.pending: deque[PendingIteration] = deque()
        self.stage = None
        self._announce_stage(self.state)
        self.run_started = time.perf_counter()
        self.remaining_time = metrics.RemainingTime(self.state.iteration, self.run_started)
        self.model.train()

    def autocast(self):
        from kotomamba.precision import autocast_context

        return autocast_context(self.policy, self.ctx.device.type)

    # --- one iteration --------------------------------------------------------------------------

    def run_iteration(self, state: TrainState) -> None:
        """Queue training on (or, for --skip-batch, step over) the next global batch and count it in
        `state`; then report the iterations before it (their numbers are on the host by now)."""
        from kotomamba.optim import apply_lr

        logging_flags, iteration = self.config.logging, state.iteration + 1
        lr = self.schedule.lr_at(state.iteration)
        apply_lr(self.optimizer, lr)
        if in_skip_ranges(iteration, logging_flags.skip_batch):
            self.skip_global_batch()
            step = None
        else:
            stats_interval = logging_flags.optimizer_stats_interval
            try:
                step = self.train_step(collect_optimizer_stats=stats_interval > 0 and iteration % stats_interval == 0)
            except KotomambaError:  # e.g. a batch of foreign token ids: the iterations before it still get their line
                self.report_pending(state)
                raise
        state.iteration = iteration
        state.consumed_samples += self.config.batch.global_batch_size
        state.consumed_tokens += self.tokens_per_iteration
        self.report_pending(state)
        self.pending.append(PendingIteration(iteration, state.consumed_samples, state.consumed_tokens, lr, step))

    def report_pending(self, state: TrainState) -> None:
        """Report every iteration still pending, oldest first: count its skip in `state`, log it, call
        `on_step`. Waits for the device where the last step's numbers are not back yet."""
        while self.pending:
            self._report_iteration(state, self.pending.popleft())

    def _report_iteration(self, state: TrainState, pending: PendingIteration) -> None:
        result = pending.step.result() if pending.step is not None else None
        if result is None:
            logger.info("iteration %d: global batch skipped (--skip-batch)", pending.iteration)
            self.meter.record_skipped_batch()
        else:
            self._count_skipped_step(state, result, pending.iteration)
            self.meter.record(result, self.tokens_per_iteration, pending.step.data_wait_seconds)
            if self.dataset_losses is not None:
                self.dataset_losses.index_add_(0, pending.step.dataset_ids, pending.step.dataset_sums())
        reported = dataclasses.replace(state, iteration=pending.iteration, consumed_samples=pending.consumed_samples,
                                       consumed_tokens=pending.consumed_tokens)
        if self.on_step is not None:
            self.on_step(reported, result)
        self.report(reported, result, pending.lr)
        self._announce_stage(reported)

    def _announce_stage(self, state: TrainState) -> None:
        """--data-schedule: a log line when the next sample to train on is the first of another stage."""
        from kotomamba.data_schedule import stage_at

        stages = self.config.data.stages
        if not stages or state.iteration >= self.config.batch.train_iters:
            return
        stage = stage_at(stages, state.consumed_samples)
        if stage != self.stage:
            self.stage = stage
            blend = ", ".join(f"{weight / sum(stages[stage].weights):.0%} {prefix}"
                              for prefix, weight in zip(stages[stage].prefixes, stages[stage].weights))
            logger.info("iteration %d: data stage %d/%d (%s) from sample %d: %s", state.iteration + 1, stage + 1,
                        len(stages), stages[stage].name, state.consumed_samples, blend)

    def train_step(self, collect_optimizer_stats: bool = False) -> QueuedStep:
        """One global batch, queued on the device without a read back to the host: accumulate micro-batches
        (gradient reduction on the last one only), then unscale, check, clip, step and update the loss
        scale. The returned QueuedStep brings the step's numbers to the host."""
        from kotomamba.documents import packed_documents
        from kotomamba.optim import clip_grad_norm, scale_gradients_

        ctx, accumulation, scaler = self.ctx, self.accumulation, self.scaler
        masked = self.documents is not None and self.documents.mask_loss
        totals = torch.zeros(2, device=ctx.device, dtype=torch.float32)  # loss (sum, or of means), target tokens
        data_wait_seconds = 0.0
        dataset_sums, dataset_ids = [], []  # --log-loss-per-dataset: per sample, (loss sum, target count)
        for micro_step in range(accumulation):
            waiting = time.perf_counter()
            batch = self.check(next(self.train_batches), "training")
            data_wait_seconds += time.perf_counter() - waiting
            tokens = batch["tokens"].to(ctx.device, non_blocking=True)
            labels = batch["labels"].to(ctx.device, non_blocking=True)
            labels, seq_idx = self.documents.prepare(tokens, labels) if self.documents else (labels, None)
            self.sharded.set_gradient_sync(micro_step == accumulation - 1)
            with packed_documents(seq_idx):  # the backward too reads the document index
                with self.autocast():
                    # masked: the sum over the kept targets, scaled below to their mean over the global batch
                    reduction = "sum" if masked else "mean"
                    if self.dataset_losses is not None:
                        loss, token_losses = self.compute_loss(tokens, labels, reduction=reduction, token_losses=True)
                        dataset_sums.append(torch.stack([token_losses.sum(dim=1),
                                                         (labels != IGNORE_INDEX).sum(dim=1)], dim=1).double())
                        dataset_ids.append(batch["dataset_id"])
                    else:
                        loss = self.compute_loss(tokens, labels, reduction=reduction)
                scaler.scale_loss(loss / (labels.numel() * accumulation if masked else accumulation)).backward()
            totals[0] += loss.detach()
            totals[1] += (labels != IGNORE_INDEX).sum()
        self.sharded.sync_replicated_gradients()
        dist.all_reduce(totals)
        if masked:
            # The gradients are the mean over every label of the global batch: make it over the kept ones.
            scale_gradients_([p.grad for p in self.parameters if p.grad is not None],
                             (accumulation * ctx.world_size * labels.numel() / totals[1].double().clamp(min=1.0)).float())
        scaler.unscale_(self.parameters)
        grad_norm = clip_grad_norm(self.parameters, self.config.optimizer.grad_clip_norm).to(ctx.device)
        loss_total, targets = totals.double().unbind()
        mean_loss = loss_total / (targets if masked else accumulation * ctx.world_size)
        # A global batch without a target (under --eod-mask-loss, nothing but EODs): a non-finite loss, a skip.
        mean_loss = torch.where(targets > 0, mean_loss, math.nan)
        # The norm is reduced over every shard and rank: one inf/nan gradient anywhere (an fp16 overflow)
        # makes it non-finite everywhere, so every rank skips the same steps.
        skipped = ~torch.isfinite(grad_norm) | ~torch.isfinite(mean_loss)
        if skips_on_device(self.optimizer):
            # A fused AdamW skips on the device (found_inf: no update, its step count kept).
            self.optimizer.found_inf = skipped.float()
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not skipped.item():  # other optimizers (CPU runs, --fsdp-cpu-offload) need the host's word
            self.optimizer.step()
        loss_scale = scaler.scale_tensor.clone()
        scaler.update(skipped)
        # After the step (moments include it), before zero_grad (the gradients are still there).
        stats = self.optimizer_stats.compute() if collect_optimizer_stats else None
        self.optimizer.zero_grad(set_to_none=True)
        return QueuedStep(
            mean_loss, grad_norm, skipped, loss_scale, scaler.scale_tensor, data_wait_seconds=data_wait_seconds,
            optimizer_stats=stats, dataset_sums=torch.cat(dataset_sums) if dataset_sums else None,
            dataset_ids=torch.cat(dataset_ids) if dataset_ids else None,
        )

    def _dataset_loss_values(self) -> dict[str, float]:
        """Each dataset's mean training loss over the interval (all ranks), for the sinks; then restarts."""
        if self.dataset_losses is None:
            return {}
        if self.host_group is not None:
            dist.all_reduce(self.dataset_losses, group=self.host_group)
        values = {}
        for dataset_id, (loss_sum, count) in enumerate(self.dataset_losses.tolist()):
            if count:
                name = self.consumption.names.get(dataset_id, f"dataset{dataset_id}")
                values[f"train/{name}/loss"] = loss_sum / count
                values[f"train/{name}/perplexity"] = metrics.perplexity(loss_sum / count)
        self.dataset_losses.zero_()
        return values

    def skip_global_batch(self) -> None:
        """--skip-batch: draw this iteration's samples without training on them."""
        for _ in range(self.accumulation):
            next(self.train_batches)

    def _count_skipped_step(self, state: TrainState, result: StepResult, iteration: int) -> None:
        if result.skipped and math.isfinite(result.loss) and self.scaler.is_calibrating(result.loss_scale):
            # fp16 gradients overflowed and the loss scale came down: the scaler at work, not a failing run.
            state.skipped_iterations += 1
            logger.info("iteration %d: gradients overflowed at loss scale %g: step skipped, loss scale now %g",
                        iteration, result.loss_scale, result.next_loss_scale)
        elif result.skipped:
            state.skipped_iterations += 1
            state.consecutive_skips += 1
            logger.warning("iteration %d: non-finite loss or gradients (loss %s, grad norm %s, loss scale %g): "
                           "step skipped", iteration, result.loss, result.grad_norm, result.loss_scale)
        else:
            state.consecutive_skips = 0

    def report(self, state: TrainState, result: StepResult | None, lr: float) -> None:
        """Optimizer statistics when due, the log line at --log-interval; stops the run (TrainingError)
        after --max-consecutive-skips non-finite steps (the next step, already queued, is lost with the
        rest: nothing is saved on that path). `state` and `lr` as they were at that iteration."""
        logging_flags, train_iters, iteration = self.config.logging, self.config.batch.train_iters, state.iteration
        if result is not None and result.optimizer_stats is not None:
            from kotomamba.optimizer_stats import summary_line

            self.metric_logger.log(iteration, result.optimizer_stats, summary_line(iteration, result.optimizer_stats))
        max_skips = logging_flags.max_consecutive_skips
        stopping = max_skips > 0 and state.consecutive_skips >= max_skips
        if self.meter.last_result is not None and (iteration % logging_flags.log_interval == 0
                                                   or iteration == train_iters or stopping):
            consumed = self.consumption.update(state.consumed_samples)
            log_training(state, train_iters, self.meter, lr, self.ctx, self.metric_logger, self.flops_per_token,
                         self.peak, self.run_started, self.remaining_time, {**consumed, **self._dataset_loss_values()},
                         self.host_group)
            if iteration % (CONSUMPTION_LINE_INTERVALS * logging_flags.log_interval) == 0 or iteration == train_iters:
                logger.info("iteration %d: %s", iteration, self.consumption.line(consumed))
            self.meter.reset()
        if stopping:
            # Nothing is saved on this path: the last checkpoint, from before the skips, stays the one to resume.
            raise TrainingError(
                f"{state.consecutive_skips} consecutive iterations had non-finite loss or gradients "
                f"(--max-consecutive-skips {max_skips}); stopping at iteration {iteration}"
            )

    def validate_if_due(self, state: TrainState) -> None:
        eval_iters = self.config.logging.eval_iters
        if self.valid_batches is None or state.iteration % self.config.logging.eval_interval != 0:
            return
        self.report_pending(state)  # the training line of this iteration comes first
        with self.meter.paused():  # evaluation time is not training time
            evaluation = evaluate(self.model, self.compute_loss, self.valid_batches, eval_iters * self.accumulation,
                                  self.ctx, self.autocast, self.documents)
        state.consumed_valid_samples += eval_iters * self.config.batch.global_batch_size
        values = metrics.evaluation_metrics("valid", evaluation, self.valid_names)
        self.metric_logger.log(state.iteration, values, metrics.format_evaluation_line("valid", state.iteration, values))

    # --- the end ----------------------------------------------------------------------------------

    def finish(self, state: TrainState) -> None:
        """The last iterations reported, the final checkpoint (any background write completed), then the
        test evaluation unless the run stopped early."""
        from kotomamba import data as data_lib

        self.report_pending(state)
        self.checkpointer.finish(state)
        if self.host_group is not None:
            dist.barrier(group=self.host_group)  # no rank tears the group down while a peer still uses it
            dist.destroy_process_group(self.host_group)
            self.host_group = None
        if not self.evaluating or self.test_ds is None or self.run_control.exited:
            return
        test_batches = self.check.stream(cycle(data_lib.build_loader(self.test_ds, 0, **self.loader_options)), "test")
        evaluation = evaluate(self.model, self.compute_loss, test_batches, self.config.logging.eval_iters * self.accumulation,
                              self.ctx, self.autocast, self.documents)
        values = metrics.evaluation_metrics("test", evaluation, self.test_names)
        self.metric_logger.log(state.iteration, values, metrics.format_evaluation_line("test", state.iteration, values))


def log_training(state: TrainState, train_iters: int, meter: metrics.IntervalMeter, lr: float, ctx: DistributedContext,
                 metric_logger: MetricLogger, model_flops_per_token: float, peak: float | None, run_started: float,
                 remaining_time: metrics.RemainingTime, per_dataset: Mapping[str, float],
                 host_group: dist.ProcessGroup | None) -> None:
    """The interval's metrics (see kotomamba.metrics) to the log line and the sinks, with each dataset's
    consumption and (--log-loss-per-dataset) training loss, to the sinks only; on every rank."""
    values = metrics.training_metrics(
        meter, lr=lr, consumed_tokens=state.consumed_tokens, consumed_samples=state.consumed_samples,
        skipped_steps_total=state.skipped_iterations, world_size=ctx.world_size,
        flops_per_token=model_flops_per_token, peak_flops=peak, device=ctx.device, host_group=host_group,
    )
    values.update(per_dataset)
    now = time.perf_counter()
    run_seconds = now - run_started
    remaining = remaining_time.update(state.iteration, now, train_iters)
    line = metrics.format_training_line(state.iteration, train_iters, values, run_seconds, remaining)
    metric_logger.log(state.iteration, values, line)
