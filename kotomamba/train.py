"""The pretraining loop, readable top to bottom.

`pretrain(args)` sets up (distributed, kernels, model, FSDP, optimizer, data), then for each
iteration: accumulate micro-batches, reduce, check for non-finite gradients, clip, step, log,
evaluate. Model building, parallelism, precision, optimization, data and metrics each live in their
own module; this file only wires them together.
"""
from __future__ import annotations

import json
import logging
import math
import time
from argparse import Namespace
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kotomamba import arguments, metrics
from kotomamba.distributed import DistributedContext, all_ranks_agree, init_distributed, shutdown_distributed

logger = logging.getLogger("kotomamba")


class TrainingError(RuntimeError):
    """A problem found during setup or training that every rank reports the same way."""


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True)


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1))


@dataclass
class TrainState:
    """Progress counters; everything a resume needs besides model, optimizer and scaler state."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_iterations: int = 0
    consecutive_skips: int = 0


@dataclass
class StepResult:
    loss: float  # mean over the global batch
    grad_norm: float  # global L2 norm before clipping, after unscaling
    skipped: bool  # non-finite gradients: the optimizer did not step
    loss_scale: float  # the scale this step's backward used (1 without fp16)


def check_on_every_rank(ok: bool, message: str, ctx: DistributedContext) -> None:
    """Raise on every rank when the check fails on any rank, so no rank is left waiting in a collective."""
    if not all_ranks_agree(ok, ctx.device):
        raise TrainingError(message if not ok else "a check failed on another rank; see its log")


def build_model_and_tokenizer(args: Namespace, ctx: DistributedContext):
    """Tokenizer first (it fixes the vocabulary), then mamba-ssm's model: from a base model's weights,
    or freshly initialized from a preset / config.json (on the meta device first with --low-cpu-fsdp)."""
    from megatron_lm.tokenizer import build_tokenizer
    from kotomamba.model import build_model, load_base_model, load_model_config, materialize_and_init

    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, vocab_size=args.vocab_size)
    if args.base_model and not args.from_scratch:
        model = load_base_model(args.base_model, tokenizer.vocab_size, device=ctx.device)
    else:
        config = load_model_config(args.base_model or args.model, tokenizer.vocab_size)
        if args.low_cpu_fsdp:
            # Host memory never holds the weights: they are allocated and initialized on the device.
            model = materialize_and_init(build_model(config, on_meta=True), ctx.device, args.seed)
        else:
            model = build_model(config, device=ctx.device, seed=args.seed)
    embedding_rows = model.backbone.embedding.weight.shape[0]
    check_on_every_rank(
        tokenizer.vocab_size <= embedding_rows,
        f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only {embedding_rows} rows",
        ctx,
    )
    return model, model.config, tokenizer


def build_datasets(args: Namespace):
    from megatron_lm.data_builder import DataConfig, build_train_valid_test_datasets, samples_per_split

    num_samples = samples_per_split(args.train_iters, args.eval_interval, args.eval_iters, args.global_batch_size)
    config = DataConfig(
        data_path=args.data_path,
        train_data_path=args.train_data_path,
        valid_data_path=args.valid_data_path,
        test_data_path=args.test_data_path,
        split=args.split,
        seq_length=args.seq_length,
        seed=args.seed,
        cache_path=args.data_cache_path,
    )
    return build_train_valid_test_datasets(config, num_samples)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[dict], num_micro_batches: int, ctx: DistributedContext,
             autocast) -> dict[str, float]:
    """Mean loss over `num_micro_batches` micro-batches per rank, reduced across ranks; per blend
    component as well (`loss/dataset<i>`, in --*-data-path order)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, token count
    per_dataset: dict[int, torch.Tensor] = defaultdict(lambda: torch.zeros(2, dtype=torch.float64, device=ctx.device))
    for _ in range(num_micro_batches):
        batch = next(batches)
        tokens, labels = batch["tokens"].to(ctx.device), batch["labels"].to(ctx.device)
        with autocast():
            logits = model(tokens).logits
        per_token = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), reduction="none")
        per_sample = per_token.view(labels.shape).sum(dim=1).double()
        total[0] += per_sample.sum()
        total[1] += labels.numel()
        for dataset_id, loss_sum in zip(batch.get("dataset_id", torch.zeros(0)).tolist(), per_sample):
            per_dataset[dataset_id][0] += loss_sum
            per_dataset[dataset_id][1] += labels.shape[1]
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


def cycle(loader) -> Iterator[dict]:
    """Evaluation iterators continue across evaluations (Megatron's behaviour) and wrap at the end."""
    while True:
        yield from loader


def in_skip_ranges(iteration: int, ranges: list[list[int]] | None) -> bool:
    """--skip-batch FIRST LAST ranges are inclusive and count iterations from 1."""
    return any(first <= iteration <= last for first, last in ranges or ())


StepCallback = Callable[[TrainState, "StepResult | None"], None]


def pretrain(args: Namespace, on_step: StepCallback | None = None) -> TrainState:
    """Train as `args` say, in a process group set up from the launcher's environment."""
    ctx = init_distributed(args.use_mpi)
    setup_logging(ctx.rank)
    try:
        return run_training(args, ctx, on_step)
    finally:
        shutdown_distributed()


def run_training(args: Namespace, ctx: DistributedContext, on_step: StepCallback | None = None) -> TrainState:
    """The whole run in an existing process group. `on_step(state, result)` is called after every
    iteration (`result` is None for a --skip-batch iteration)."""
    from kotomamba import data as data_lib
    from kotomamba.flops import flops_per_token, peak_flops
    from kotomamba.kernels import configure_triton_cache, select_kernel_backend
    from kotomamba.optim import LRSchedule, apply_lr, build_optimizer, clip_grad_norm, marked_no_weight_decay_names
    from kotomamba.parallel import parallelize
    from kotomamba.precision import autocast_context, build_loss_scaler, resolve_precision

    configure_triton_cache(ctx.rank)
    backend = select_kernel_backend(ctx.device)
    accumulation = arguments.apply_data_parallel_size(args, ctx.world_size)
    logger.info("resolved config:\n%s", json.dumps(arguments.resolved_config(args), indent=2, default=str))

    # --- model, sharding, optimizer -------------------------------------------------------------
    policy = resolve_precision(args.precision, args.param_dtype, args.reduce_dtype, device_type=ctx.device.type)
    model, model_config, tokenizer = build_model_and_tokenizer(args, ctx)
    no_decay_names = marked_no_weight_decay_names(model)  # fully_shard drops the markers
    sharded = parallelize(
        model, ctx, strategy=args.sharding_strategy, param_dtype=policy.param_dtype,
        reduce_dtype=policy.reduce_dtype, activation_checkpointing=args.fsdp_activation_checkpointing,
        cpu_offload=args.fsdp_cpu_offload,
    )
    model = sharded.module
    optimizer = build_optimizer(
        model, lr=args.lr, weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_eps, no_decay_names=no_decay_names,
    )
    schedule = LRSchedule(
        max_lr=args.lr, min_lr=args.min_lr, warmup_iters=args.lr_warmup_iters, decay_iters=args.lr_decay_iters,
        style=args.lr_decay_style, wsd_decay_iters=args.lr_wsd_decay_iters,
        wsd_decay_style=args.lr_wsd_decay_style, warmup_init_lr=args.lr_warmup_init,
    )
    scaler = build_loss_scaler(
        policy, initial_scale=args.initial_loss_scale, min_scale=args.min_loss_scale,
        growth_interval=args.loss_scale_window, hysteresis=args.hysteresis,
    )

    def autocast():
        return autocast_context(policy, ctx.device.type)

    # --- data -----------------------------------------------------------------------------------
    train_ds, valid_ds, test_ds = build_datasets(args)
    state = TrainState()
    loader_options = dict(micro_batch_size=args.micro_batch_size, dp_rank=ctx.rank, dp_size=ctx.world_size,
                          num_workers=args.num_workers, pin_memory=ctx.device.type == "cuda")
    train_batches = iter(data_lib.build_loader(train_ds, state.consumed_samples, **loader_options))
    evaluating = args.eval_iters > 0
    valid_batches = None
    if evaluating and valid_ds is not None:
        valid_batches = cycle(data_lib.build_loader(valid_ds, 0, **loader_options))

    # --- what one iteration costs -----------------------------------------------------------------
    tokens_per_iteration = args.global_batch_size * args.seq_length
    model_flops_per_token = flops_per_token(model_config, args.seq_length)
    device_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    peak = peak_flops(device_name, str(policy.compute_dtype).removeprefix("torch."), args.peak_tflops)
    logger.info(
        "kernels %s | precision %s (params %s, reduce %s, compute %s) | world size %d | micro batch %d × "
        "accumulation %d × data parallel %d = global batch %d | seq length %d | %s tokens/iteration | "
        "%.3g FLOPs/token | peak %s",
        backend, policy.name, policy.param_dtype, policy.reduce_dtype, policy.compute_dtype, ctx.world_size,
        args.micro_batch_size, accumulation, ctx.world_size, args.global_batch_size, args.seq_length,
        f"{tokens_per_iteration:,}", model_flops_per_token,
        f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (no MFU; set --peak-tflops)",
    )

    parameters = [p for p in model.parameters() if p.requires_grad]

    def train_step() -> StepResult:
        """One global batch: accumulate micro-batches (gradient reduction on the last one only), then
        unscale, check, clip and step."""
        loss_sum = torch.zeros((), device=ctx.device, dtype=torch.float32)
        for micro_step in range(accumulation):
            with meter.waiting_for_data():
                batch = next(train_batches)
            tokens = batch["tokens"].to(ctx.device, non_blocking=True)
            labels = batch["labels"].to(ctx.device, non_blocking=True)
            sharded.set_gradient_sync(micro_step == accumulation - 1)
            with autocast():
                logits = model(tokens).logits
            loss = language_model_loss(logits, labels)
            scaler.scale_loss(loss / accumulation).backward()
            loss_sum += loss.detach()
        sharded.sync_replicated_gradients()
        found_inf = scaler.unscale_and_check(parameters)
        grad_norm = clip_grad_norm(parameters, args.grad_clip_norm).item()
        skipped = found_inf or not math.isfinite(grad_norm)
        if not skipped:
            optimizer.step()
        loss_scale = scaler.scale
        scaler.update(skipped)
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(loss_sum)
        return StepResult(loss_sum.item() / (accumulation * ctx.world_size), grad_norm, skipped, loss_scale)

    def skip_global_batch() -> None:
        """--skip-batch: draw this iteration's samples without training on them."""
        for _ in range(accumulation):
            next(train_batches)

    # --- the loop -----------------------------------------------------------------------------
    meter = metrics.IntervalMeter()
    run_started = time.perf_counter()
    model.train()
    while state.iteration < args.train_iters:
        iteration = state.iteration + 1
        lr = schedule.lr_at(state.iteration)
        apply_lr(optimizer, lr)
        if in_skip_ranges(iteration, args.skip_batch):
            skip_global_batch()
            logger.info("iteration %d: global batch skipped (--skip-batch)", iteration)
            result = None
        else:
            result = train_step()
            if result.skipped:
                state.skipped_iterations += 1
                state.consecutive_skips += 1
                logger.warning("iteration %d: non-finite loss or gradients (grad norm %s, loss scale %g): step skipped",
                               iteration, result.grad_norm, result.loss_scale)
            else:
                state.consecutive_skips = 0
            meter.record(result.loss, result.skipped)
        state.iteration = iteration
        state.consumed_samples += args.global_batch_size
        state.consumed_tokens += tokens_per_iteration
        meter.tokens += tokens_per_iteration
        if on_step is not None:
            on_step(state, result)

        if args.max_consecutive_skips and state.consecutive_skips >= args.max_consecutive_skips:
            raise TrainingError(
                f"{state.consecutive_skips} consecutive iterations had non-finite loss or gradients "
                f"(--max-consecutive-skips {args.max_consecutive_skips}); stopping at iteration {iteration}"
            )

        if result is not None and (iteration % args.log_interval == 0 or iteration == args.train_iters):
            log_training(state, args, meter, lr, result, ctx, model_flops_per_token, peak, run_started)
            meter.reset()

        if valid_batches is not None and iteration % args.eval_interval == 0:
            evaluation = evaluate(model, valid_batches, args.eval_iters * accumulation, ctx, autocast)
            logger.info("validation at iteration %d | %s", iteration, format_evaluation(evaluation))

    if evaluating and test_ds is not None:
        test_batches = cycle(data_lib.build_loader(test_ds, 0, **loader_options))
        evaluation = evaluate(model, test_batches, args.eval_iters * accumulation, ctx, autocast)
        logger.info("test at iteration %d | %s", state.iteration, format_evaluation(evaluation))
    return state


def log_training(state: TrainState, args: Namespace, meter: metrics.IntervalMeter, lr: float, result: StepResult,
                 ctx: DistributedContext, model_flops_per_token: float, peak: float | None,
                 run_started: float) -> None:
    elapsed = meter.elapsed()
    rates = metrics.throughput(meter.tokens, elapsed, ctx.world_size, model_flops_per_token, peak)
    allocated, reserved = metrics.peak_memory_gib(ctx.device)
    loss = meter.mean_loss()
    total_elapsed = time.perf_counter() - run_started
    remaining = total_elapsed / state.iteration * (args.train_iters - state.iteration)
    logger.info(
        "iteration %d/%d | consumed tokens %s | loss %.4f | ppl %.2f | lr %.3e | grad norm %.3f | loss scale %g | "
        "skipped %d (total %d) | %.0f tokens/s (%.0f per GPU) | %.2f TFLOP/s per GPU | MFU %s | data wait %.0f%% | "
        "peak memory %.1f/%.1f GiB | elapsed %s | remaining %s",
        state.iteration, args.train_iters, f"{state.consumed_tokens:,}", loss, math.exp(min(loss, 50)), lr,
        result.grad_norm, result.loss_scale, meter.skipped, state.skipped_iterations, rates["tokens_per_s"],
        rates["tokens_per_s_per_gpu"], rates["tflops_per_gpu"],
        f"{100 * rates['mfu']:.1f}%" if "mfu" in rates else "n/a",
        100 * meter.data_wait_seconds / elapsed if elapsed else 0.0, allocated, reserved,
        metrics.format_duration(total_elapsed), metrics.format_duration(remaining),
    )


def format_evaluation(result: dict[str, float]) -> str:
    return " | ".join(f"{name} {value:.4f} (ppl {math.exp(min(value, 50)):.2f})" for name, value in result.items())
