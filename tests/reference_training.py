"""The reference the metric tests compare against: the run pretrain.py arguments describe, written as a
plain PyTorch loop over an unsharded model, with every logged figure computed directly (float64 sums
over whole tensors, torch's own gradient clipping, losses grouped by blend component by hand)."""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from kotomamba.config import parse_run_config


def tensor_stats(tensor: torch.Tensor) -> dict[str, float]:
    values = tensor.detach().double().flatten()
    return {"l1": values.abs().sum().item(), "l2": values.pow(2).sum().sqrt().item(),
            "abs_max": values.abs().max().item()}


def group_members(name: str) -> list[str]:
    """The groups of kotomamba.optimizer_stats, spelled out for the tiny models' parameter names."""
    parts = name.split(".")
    if parts[:2] == ["backbone", "embedding"]:
        return ["all", "embedding"]
    if parts[:2] == ["backbone", "norm_f"]:
        return ["all", "norm_f"]
    if parts[:2] == ["backbone", "layers"]:
        return ["all", f"layers.{parts[2]}", "layers.*." + ".".join(parts[3:])]
    return ["all", parts[0]]


def grouped_stats(named_tensors: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """`optimizer/<group>/<quantity>/<statistic>` from whole tensors: {parameter name: {quantity: tensor}}."""
    joined: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)
    for name, quantities in named_tensors.items():
        for quantity, tensor in quantities.items():
            for group in group_members(name):
                joined[group, quantity].append(tensor.detach().double().flatten())
    return {
        f"optimizer/{group}/{quantity}/{statistic}": value
        for (group, quantity), tensors in joined.items()
        for statistic, value in tensor_stats(torch.cat(tensors)).items()
    }


def model_stats(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    named = {}
    for name, parameter in model.named_parameters():
        state = optimizer.state[parameter]
        named[name] = {"weight": parameter, "grad": parameter.grad, "exp_avg": state["exp_avg"],
                       "exp_avg_sq": state["exp_avg_sq"], "exp_avg_sq_sqrt": state["exp_avg_sq"].sqrt()}
    return grouped_stats(named)


def _batch(dataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    samples = [dataset[i] for i in indices]
    tokens = torch.stack([torch.as_tensor(s["tokens"], dtype=torch.int64) for s in samples])
    labels = torch.stack([torch.as_tensor(s["labels"], dtype=torch.int64) for s in samples])
    return tokens, labels, [int(s.get("dataset_id", 0)) for s in samples]


@torch.no_grad()
def evaluate_by_component(model, dataset, indices: list[int]) -> dict:
    """Mean loss over `indices` and per dataset id (every sample has the same number of tokens)."""
    tokens, labels, ids = _batch(dataset, indices)
    logits = model(tokens).logits.float()
    per_sample = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), reduction="none")
    per_sample = per_sample.view(labels.shape).double().mean(dim=1)
    by_id: dict[int, list[float]] = defaultdict(list)
    for dataset_id, loss in zip(ids, per_sample.tolist()):
        by_id[dataset_id].append(loss)
    return {"loss": per_sample.mean().item(), "components": {i: sum(v) / len(v) for i, v in by_id.items()}}


def plain_training(argv: list[str], stats_at: tuple[int, ...] = ()) -> dict:
    """Per iteration: lr, loss, grad norm (before clipping); optimizer stats at `stats_at` (after the
    step, before zero_grad); validation at every --eval-interval and test at the end, by component."""
    from kotomamba.model import build_model, load_model_config
    from kotomamba.lr_schedule import LRSchedule
    from kotomamba.optim import apply_lr, build_optimizer, marked_no_weight_decay_names
    from kotomamba.train import build_datasets
    from megatron_lm.tokenizer import build_tokenizer

    config = parse_run_config(argv, 1)
    tokenizer = build_tokenizer(config.tokenizer.tokenizer_type, config.tokenizer.tokenizer_model)
    model = build_model(load_model_config(config.model.model, tokenizer.vocab_size), seed=config.data.seed)
    opt = config.optimizer
    optimizer = build_optimizer(model, lr=opt.lr, weight_decay=opt.weight_decay,
                                betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps,
                                no_decay_names=marked_no_weight_decay_names(model))
    schedule = LRSchedule(max_lr=opt.lr, min_lr=opt.min_lr, warmup_iters=opt.lr_warmup_iters,
                          decay_iters=opt.lr_decay_iters, style=opt.lr_decay_style)
    train_ds, valid_ds, test_ds = build_datasets(config)
    batch = config.batch.global_batch_size
    eval_samples = config.logging.eval_iters * batch
    record: dict = {"lr": {}, "loss": {}, "grad_norm": {}, "stats": {}, "valid": {}, "test": None}
    valid_position = 0
    for iteration in range(1, config.batch.train_iters + 1):
        lr = schedule.lr_at(iteration - 1)
        apply_lr(optimizer, lr)
        tokens, labels, _ = _batch(train_ds, list(range((iteration - 1) * batch, iteration * batch)))
        logits = model(tokens).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))
        loss.backward()
        grad_norm = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in model.parameters()))
        if config.optimizer.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip_norm)
        optimizer.step()
        if iteration in stats_at:
            record["stats"][iteration] = model_stats(model, optimizer)
        optimizer.zero_grad()
        record["lr"][iteration], record["loss"][iteration], record["grad_norm"][iteration] = lr, loss.item(), grad_norm
        if eval_samples and valid_ds is not None and iteration % config.logging.eval_interval == 0:
            model.eval()
            indices = list(range(valid_position, valid_position + eval_samples))
            record["valid"][iteration] = evaluate_by_component(model, valid_ds, indices)
            valid_position += eval_samples
            model.train()
    if eval_samples and test_ds is not None:
        model.eval()
        record["test"] = evaluate_by_component(model, test_ds, list(range(eval_samples)))
    return record
