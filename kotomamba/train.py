"""The pretraining loop, readable top to bottom: set up, then for each iteration accumulate
micro-batches, reduce, check, clip, step, log, evaluate."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kotomamba import arguments, metrics
from kotomamba.distributed import DistributedContext, all_ranks_agree, init_distributed, shutdown_distributed

logger = logging.getLogger("kotomamba")


class TrainingError(RuntimeError):
    """A problem found during setup or training that every rank reports the same way."""


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True)


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1))


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_iterations: int = 0
    consecutive_skips: int = 0


def _check_everywhere(ok: bool, message: str, ctx: DistributedContext) -> None:
    """Raise on every rank when the check fails on any rank, so no rank is left waiting in a collective."""
    if not all_ranks_agree(ok, ctx.device):
        raise TrainingError(message if not ok else "a check failed on another rank; see its log")


def build_model_and_tokenizer(args: Namespace, ctx: DistributedContext):
    from megatron_lm.tokenizer import build_tokenizer
    from kotomamba.model import build_model, load_base_model, load_model_config

    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, vocab_size=args.vocab_size)
    if args.base_model and not args.from_scratch:
        model = load_base_model(args.base_model, tokenizer.vocab_size, device=ctx.device)
        config = model.config
    else:
        source = args.base_model if args.base_model else args.model
        config = load_model_config(source, tokenizer.vocab_size)
        torch.manual_seed(args.seed)
        model = build_model(config, device=ctx.device, on_meta=args.low_cpu_fsdp, seed=args.seed)
    embedding_rows = model.backbone.embedding.weight.shape[0]
    _check_everywhere(
        tokenizer.vocab_size <= embedding_rows,
        f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only {embedding_rows} rows",
        ctx,
    )
    return model, config, tokenizer


def build_datasets(args: Namespace, tokenizer, ctx: DistributedContext):
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
def evaluate(model, batches, num_iterations: int, ctx: DistributedContext) -> dict[str, float]:
    """Mean loss over `num_iterations` global batches, reduced across ranks; per dataset as well."""
    from collections import defaultdict

    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    per_dataset: dict[int, torch.Tensor] = defaultdict(lambda: torch.zeros(2, dtype=torch.float64, device=ctx.device))
    for _ in range(num_iterations):
        batch = next(batches)
        tokens, labels = batch["tokens"].to(ctx.device), batch["labels"].to(ctx.device)
        logits = model(tokens).logits
        per_token = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), reduction="none")
        per_sample = per_token.view(labels.shape).sum(dim=1).double()
        totals += torch.stack([per_sample.sum(), torch.tensor(labels.numel(), dtype=torch.float64, device=ctx.device)])
        if "dataset_id" in batch:
            for dataset_id, loss_sum in zip(batch["dataset_id"].tolist(), per_sample):
                per_dataset[dataset_id] += torch.stack([loss_sum, torch.tensor(labels.shape[1], dtype=torch.float64, device=ctx.device)])
    dist.all_reduce(totals)
    result = {"loss": (totals[0] / totals[1]).item()}
    # Every rank must reduce the same set of keys: agree on the dataset ids first.
    ids = sorted(per_dataset)
    gathered: list[list[int]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, ids)
    for dataset_id in sorted({i for part in gathered for i in part}):
        sums = per_dataset[dataset_id]
        dist.all_reduce(sums)
        result[f"loss/dataset{dataset_id}"] = (sums[0] / sums[1]).item()
    model.train()
    return result


def cycle(loader):
    """Evaluation iterators continue across evaluations (Megatron's behaviour) and wrap at the end."""
    while True:
        yield from loader


def pretrain(args: Namespace) -> TrainState:
    ctx = init_distributed(args.use_mpi)
    setup_logging(ctx.rank)
    try:
        return _pretrain(args, ctx)
    finally:
        shutdown_distributed()


def _pretrain(args: Namespace, ctx: DistributedContext) -> TrainState:
    from kotomamba.kernels import configure_triton_cache, select_kernel_backend

    configure_triton_cache(ctx.rank)
    backend = select_kernel_backend(ctx.device)
    from kotomamba import data as data_lib
    from kotomamba.flops import flops_per_token, peak_flops
    from kotomamba.optim import LRSchedule, apply_lr, build_optimizer, clip_grad_norm
    from kotomamba.parallel import parallelize
    from kotomamba.precision import DynamicLossScaler, NoLossScaler, resolve_precision

    config_dump = arguments.resolved_config(args)
    logger.info("resolved config:\n%s", json.dumps(config_dump, indent=2, sort_keys=True, default=str))
    accumulation = arguments.gradient_accumulation_steps(args.global_batch_size, args.micro_batch_size, ctx.world_size)

    model, model_config, tokenizer = build_model_and_tokenizer(args, ctx)
    policy = resolve_precision(args.precision, args.param_dtype, args.reduce_dtype, device_type=ctx.device.type)
    sharded = parallelize(
        model, ctx, strategy=args.sharding_strategy, param_dtype=policy.param_dtype,
        reduce_dtype=policy.reduce_dtype, activation_checkpointing=args.fsdp_activation_checkpointing,
        cpu_offload=args.fsdp_cpu_offload,
    )
    model = sharded.module
    optimizer = build_optimizer(
        model, lr=args.lr, weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps
    )
    schedule = LRSchedule(
        max_lr=args.lr, min_lr=args.min_lr, warmup_iters=args.lr_warmup_iters, decay_iters=args.lr_decay_iters,
        style=args.lr_decay_style, wsd_decay_iters=args.lr_wsd_decay_iters,
    )
    scaler = (
        DynamicLossScaler(initial_scale=args.initial_loss_scale, min_scale=args.min_loss_scale,
                          growth_interval=args.loss_scale_window, hysteresis=args.hysteresis)
        if policy.use_loss_scaling else NoLossScaler()
    )

    train_ds, valid_ds, test_ds = build_datasets(args, tokenizer, ctx)
    state = TrainState()
    loader_kwargs = dict(micro_batch_size=args.micro_batch_size, dp_rank=ctx.rank, dp_size=ctx.world_size,
                         num_workers=args.num_workers, pin_memory=ctx.device.type == "cuda")
    train_batches = iter(data_lib.build_loader(train_ds, state.consumed_samples, **loader_kwargs))
    valid_batches = cycle(data_lib.build_loader(valid_ds, 0, **loader_kwargs)) if valid_ds is not None else None

    tokens_per_iteration = args.global_batch_size * args.seq_length
    model_flops_per_token = flops_per_token(model_config, args.seq_length)
    device_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    peak = peak_flops(device_name, str(policy.compute_dtype).replace("torch.", ""), args.peak_tflops)
    logger.info(
        "kernels=%s precision=%s world_size=%d micro_batch=%d accumulation=%d global_batch=%d seq_length=%d "
        "tokens/iteration=%d model FLOPs/token=%.3g",
        backend, policy.name, ctx.world_size, args.micro_batch_size, accumulation, args.global_batch_size,
        args.seq_length, tokens_per_iteration, model_flops_per_token,
    )

    parameters = [p for p in model.parameters() if p.requires_grad]
    meter = metrics.IntervalMeter()
    run_started = time.perf_counter()
    model.train()
    while state.iteration < args.train_iters:
        lr = schedule.lr_at(state.iteration)
        apply_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=ctx.device, dtype=torch.float32)
        for micro_step in range(accumulation):
            wait_started = time.perf_counter()
            batch = next(train_batches)
            meter.data_wait_seconds += time.perf_counter() - wait_started
            tokens = batch["tokens"].to(ctx.device, non_blocking=True)
            labels = batch["labels"].to(ctx.device, non_blocking=True)
            sharded.set_gradient_sync(micro_step == accumulation - 1)
            loss = language_model_loss(model(tokens).logits, labels)
            scaler.scale_loss(loss / accumulation).backward()
            loss_sum += loss.detach()
        sharded.sync_replicated_gradients()
        found_inf = scaler.unscale_and_check(parameters)
        grad_norm = clip_grad_norm(parameters, args.grad_clip_norm).item()
        skip = found_inf or not math.isfinite(grad_norm)
        if skip:
            state.skipped_iterations += 1
            state.consecutive_skips += 1
            logger.warning("iteration %d: non-finite gradients (loss scale %g): step skipped", state.iteration + 1, scaler.scale)
        else:
            optimizer.step()
            state.consecutive_skips = 0
        scaler.update(found_inf)
        optimizer.zero_grad(set_to_none=True)

        dist.all_reduce(loss_sum)
        mean_loss = loss_sum.item() / (accumulation * ctx.world_size)
        state.iteration += 1
        state.consumed_samples += args.global_batch_size
        state.consumed_tokens += tokens_per_iteration
        meter.iterations += 1
        meter.tokens += tokens_per_iteration
        meter.loss_sum += mean_loss
        meter.loss_count += 1
        meter.skipped += int(skip)

        if args.max_consecutive_skips and state.consecutive_skips >= args.max_consecutive_skips:
            raise TrainingError(
                f"{state.consecutive_skips} consecutive iterations had non-finite gradients "
                f"(--max-consecutive-skips {args.max_consecutive_skips}); stopping at iteration {state.iteration}"
            )

        if state.iteration % args.log_interval == 0 or state.iteration == args.train_iters:
            elapsed = time.perf_counter() - meter.started
            rates = metrics.throughput(meter.tokens, elapsed, ctx.world_size, model_flops_per_token, peak)
            allocated, reserved = metrics.peak_memory_gib(ctx.device)
            loss_avg = meter.loss_sum / meter.loss_count
            total_elapsed = time.perf_counter() - run_started
            eta = total_elapsed / state.iteration * (args.train_iters - state.iteration)
            mfu = f"{100 * rates['mfu']:.1f}%" if "mfu" in rates else "n/a"
            logger.info(
                "iteration %d/%d | tokens %s | loss %.4f | ppl %.2f | lr %.3e | grad norm %.3f | loss scale %g | "
                "skipped %d | %.0f tokens/s (%.0f per GPU) | %.2f TFLOP/s per GPU | MFU %s | data wait %.0f%% | "
                "peak mem %.1f/%.1f GiB | elapsed %s | ETA %s",
                state.iteration, args.train_iters, f"{state.consumed_tokens:,}", loss_avg,
                math.exp(min(loss_avg, 50)), lr, grad_norm, scaler.scale, meter.skipped,
                rates["tokens_per_s"], rates["tokens_per_s_per_gpu"], rates["tflops_per_gpu"], mfu,
                100 * meter.data_wait_seconds / elapsed if elapsed else 0.0, allocated, reserved,
                metrics.format_duration(total_elapsed), metrics.format_duration(eta),
            )
            meter.reset()

        if valid_batches is not None and args.eval_interval and state.iteration % args.eval_interval == 0:
            result = evaluate(model, valid_batches, args.eval_iters * accumulation, ctx)
            logger.info("validation at iteration %d | %s", state.iteration, _format_eval(result))

    if test_ds is not None and args.eval_iters:
        test_batches = cycle(data_lib.build_loader(test_ds, 0, **loader_kwargs))
        result = evaluate(model, test_batches, args.eval_iters * accumulation, ctx)
        logger.info("test at iteration %d | %s", state.iteration, _format_eval(result))
    return state


def _format_eval(result: dict[str, float]) -> str:
    return " | ".join(f"{name} {value:.4f} (ppl {math.exp(min(value, 50)):.2f})" for name, value in result.items())
